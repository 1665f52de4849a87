"""Prompt rows through one quantized CPU matrix: torch's weight-only kernel against dequantize-then-matmul, by row count.

For the engine's int8 and int4 kernel layouts (`experts/kernels.py`) on OLMoE-1B-7B expert and attention shapes, times
at 1 to 512 rows: the kernel (`fused`), the engine's path above `max_rows` (dequantize the matrix in the compute dtype,
then one dense matmul: `dequant`), and the same with the dequantization compiled by inductor (`compiled`, one kernel per
shape, compiled before the rounds). Each path cycles through copies of its matrix totalling >= 64 MiB (a prompt chunk
reads each expert from DRAM); rounds interleave the paths; medians are printed, the fastest path per row count marked.
Also checks each path against the float32 reference (x @ dequantize(w).T).

Usage: PYTHONPATH=. python scripts/kernel_rows.py [--threads 1] [--rounds 5] [--dtype bfloat16|float32] [--formats int8,int4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mobile_moe.experts.formats import Int4Format
from mobile_moe.experts.kernels import FusedFormat, FusedInt4, FusedInt8, int4_block_rows

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SHAPES = {"up": (1024, 2048), "down": (2048, 1024), "o": (2048, 2048)}
ROTATE_BYTES = 64 << 20


def kernel_format(name: str, out: int, inp: int, group: int) -> FusedFormat:
    """The engine's CPU kernel layout of `name` for this shape (bf16 activations and scales)."""
    if name == "int8":
        return FusedInt8(torch.bfloat16)
    return FusedInt4(Int4Format(group), torch.bfloat16, int4_block_rows(out, inp) or 64)


def paths(fmt: FusedFormat, dtype: torch.dtype) -> dict:
    """name -> fn(x, parts) for the three paths, x in the compute dtype."""
    compiled = torch.compile(lambda parts: fmt.dequantize(parts, dtype), dynamic=False)

    def fused(x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        return fmt.fused(x, parts) if x.dtype == fmt.dtype else fmt.fused(x.to(fmt.dtype), parts).to(x.dtype)

    return {
        "fused": fused,
        "dequant": lambda x, parts: F.linear(x, fmt.dequantize(parts, dtype)),
        "compiled": lambda x, parts: F.linear(x, compiled(parts)),
    }


def measure(name: str, shape: str, dtype: torch.dtype, group: int, rounds: int) -> None:
    """One format on one shape: every path at every row count, in interleaved rounds."""
    out, inp = SHAPES[shape]
    fmt = kernel_format(name, out, inp, group)
    nbytes = sum(f.nbytes for f in fmt.fields(out, inp))
    gen = torch.Generator().manual_seed(0)
    copies = [fmt.quantize(0.02 * torch.randn(out, inp, generator=gen)) for _ in range(max(2, -(-ROTATE_BYTES // nbytes)))]
    fns = paths(fmt, dtype)
    xs = {rows: torch.randn(rows, inp, generator=gen).to(dtype) for rows in ROWS}
    want = {rows: x.float() @ fmt.dequantize(copies[0], torch.float32).t() for rows, x in xs.items()}
    errors = {}
    for p, fn in fns.items():  # warm-up, compilation and the check
        for rows, x in xs.items():
            got = fn(x, copies[0]).float()
            errors[p, rows] = float((got - want[rows]).norm() / want[rows].norm())
    times: dict = {(p, rows): [] for p in fns for rows in ROWS}
    for _ in range(rounds):
        for rows, x in xs.items():
            for p, fn in fns.items():
                start = time.perf_counter()
                for parts in copies:
                    fn(x, parts)
                times[p, rows].append((time.perf_counter() - start) / len(copies))
    print(f"\n{name}{f' g{group}' if name == 'int4' else ''} {out} x {inp}, {str(dtype).removeprefix('torch.')} compute, engine max_rows {fmt.max_rows}")
    print(f"  {'rows':>5} " + " ".join(f"{p + ' ms':>12}" for p in fns) + "  fastest   max rel. error")
    for rows in ROWS:
        med = {p: statistics.median(times[p, rows]) for p in fns}
        best = min(med, key=med.get)
        print(f"  {rows:5d} " + " ".join(f"{1e3 * med[p]:12.3f}" for p in fns) + f"  {best:9s} {max(errors[p, rows] for p in fns):.1e}")


def main() -> None:
    """Parse the flags and measure each format and shape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype (float32: the kernels on bf16 activations)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--formats", default="int8,int4")
    parser.add_argument("--shapes", default="up,down", help=f"comma-separated, of {', '.join(SHAPES)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._inductor.config.fx_graph_cache = False  # its key misses ATEN_CPU_CAPABILITY (see scripts/dense_kernels.py)
    torch._functorch.config.enable_autograd_cache = False
    print(f"kernels {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, {args.rounds} interleaved rounds, torch {torch.__version__}")
    for name in args.formats.split(","):
        for shape in args.shapes.split(","):
            measure(name, shape, getattr(torch, args.dtype), args.group_size, args.rounds)


if __name__ == "__main__":
    main()
