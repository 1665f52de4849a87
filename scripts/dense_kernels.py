"""One decode row through one dense matrix at OLMoE-1B-7B shapes: bf16 against the int8 / int4 kernels (best of 30, 2 threads).

Usage: python scripts/dense_kernels.py   (ATEN_CPU_CAPABILITY=avx2 for torch's AVX2 kernels)
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mobile_moe.loading.dense import DenseChoice, dense_formats, pack_dense, replace_linears

SHAPES = [(50304, 2048, "LM head"), (6144, 2048, "fused q/k/v"), (2048, 2048, "o_proj")]


def packed(out: int, inp: int, name: str) -> nn.Module:
    """A one-linear module with a random [out, inp] weight, in bf16 or packed as `name` for its kernel."""
    m = nn.Sequential(nn.Linear(inp, out, bias=False)).to(torch.bfloat16)
    if name != "bf16":
        replace_linears(m, dense_formats(m, DenseChoice(name)), quantize=True)
        pack_dense(m, torch.bfloat16, torch.device("cpu"))
    return m


def best_seconds(m: nn.Module, x: torch.Tensor, calls: int = 30) -> float:
    """Fastest of `calls` calls of m(x), after 3 warm-up calls."""
    for _ in range(3):
        m(x)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        m(x)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    torch.set_num_threads(2)
    print("kernels", torch.backends.cpu.get_cpu_capability())
    for out, inp, what in SHAPES:
        row = []
        for name in ("bf16", "int8", "int4"):
            m = packed(out, inp, name)
            nbytes = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
            s = best_seconds(m, torch.randn(1, inp).bfloat16())
            row.append(f"{name} {s * 1e3:.2f} ms {nbytes / s / 1e9:.1f} GB/s")
        print(f"{what} {out}x{inp}: " + " | ".join(row))


if __name__ == "__main__":
    main()
