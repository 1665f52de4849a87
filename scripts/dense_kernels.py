"""Batch-1 matmul kernels per matrix shape: how fast each reads its weights, against this machine's read-bandwidth probe.

One decode row x [1, in] through one [out, in] matrix, for every candidate kernel: torch's float gemv (bf16, float32),
the engine's int8 / int4 kernels (`experts/kernels.py`: `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, and on
AVX512-BF16 the project's tiled int8 / int4 kernels, built into the compiled-code cache on first use), and
candidates the engine does not use: inductor-compiled dequantize-and-reduce kernels written in torch ops (int8, int4),
fbgemm's dynamic int8 linear (which also quantizes the activations to 8 bits: different numerics) and torch's
`_dyn_quant_matmul_4bit`. Each candidate cycles through copies of its matrix totalling >= 128 MiB, so the weights come
from DRAM as in a decode step, not from the cache; rounds interleave the candidates and the probe (`memory_probe_gb_s`
over 256 MiB, the same threads); the table shows medians over rounds: ms per call, GB/s (the matrix's bytes / time) and
that as a share of the probe.

Usage: PYTHONPATH=. python scripts/dense_kernels.py [--threads 1] [--rounds 5] [--shapes head,qkv,o,up,down] [--kernels ...]
(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 for torch's and oneDNN's AVX2 kernels; the compiled candidates then
compile for AVX2 too: inductor follows ATEN_CPU_CAPABILITY, and this script keeps inductor's cache off, whose key does
not tell the two apart.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mobile_moe.bench.roofline import memory_probe_gb_s
from mobile_moe.experts.formats import Int4Format, Int8Format
from mobile_moe.experts.kernels import FusedInt4, FusedInt8, TiledInt4, TiledInt8, compute_format, int4_block_rows

SHAPES = {"head": (50304, 2048), "qkv": (6144, 2048), "o": (2048, 2048), "up": (1024, 2048), "down": (2048, 1024)}
NAMES = {"head": "LM head", "qkv": "fused q/k/v", "o": "o_proj", "up": "OLMoE expert gate/up", "down": "OLMoE expert down"}
KERNELS = ("bf16", "f32", "int8", "int8-tiled", "int4", "int4-tiled", "int8-compiled", "int4-compiled", "int8-fbgemm-dynamic", "int4-dyn-quant")
DEFAULT_KERNELS = ("bf16", "f32", "int8", "int8-tiled", "int4", "int4-tiled", "int8-compiled", "int4-compiled", "int8-fbgemm-dynamic")
ROTATE_BYTES = 128 << 20  # each candidate cycles through copies of its matrix totalling at least this many bytes
PROBE_BYTES = 256 << 20


class Candidate:
    """One kernel on one shape: copies of its packed matrix, how to call it on x, and the bytes one call reads."""

    def __init__(self, name: str, copies: list[tuple], call: Callable[..., torch.Tensor], nbytes: int = 0) -> None:
        self.name, self.copies, self.call = name, copies, call
        self.nbytes = nbytes or sum(t.numel() * t.element_size() for t in copies[0])  # opaque packings: their format's bytes
        self.seconds: list[float] = []

    def round(self) -> None:
        """One pass over every copy; records seconds per call."""
        start = time.perf_counter()
        for parts in self.copies:
            self.call(*parts)
        self.seconds.append((time.perf_counter() - start) / len(self.copies))


def weight(out: int, inp: int, seed: int) -> torch.Tensor:
    """A random [out, inp] float32 matrix of decode-like scale."""
    return 0.02 * torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def copies_of(make: Callable[[int], tuple], nbytes: int) -> list[tuple]:
    """At least two copies, and enough that they total ROTATE_BYTES."""
    return [make(i) for i in range(max(2, -(-ROTATE_BYTES // nbytes)))]


def int8_reduce(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [in], q [out, in] int8, scale [out] -> [1, out]: (q * x) summed over in, times the scale (to compile)."""
    return ((x.float() * q.float()).sum(-1) * scale.float()).to(x.dtype)[None]


def int4_reduce(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """x [in], packed [out, in / 2] (byte j: column j low, column j + in / 2 high), scale / zero [out, G] with w = q * scale + zero
    -> [1, out]: each nibble dequantized in registers and reduced over its row (to compile)."""
    out, half = packed.shape
    groups = 2 * half // group
    xf = x.float()
    lo, hi = (packed & 15).float().view(out, groups // 2, group), (packed >> 4).float().view(out, groups // 2, group)
    s, z = scale.float()[..., None], zero.float()[..., None]  # [out, G, 1]
    w_lo, w_hi = lo * s[:, : groups // 2] + z[:, : groups // 2], hi * s[:, groups // 2 :] + z[:, groups // 2 :]
    acc = (w_lo * xf[:half].view(groups // 2, group)).sum((-1, -2)) + (w_hi * xf[half:].view(groups // 2, group)).sum((-1, -2))
    return acc.to(x.dtype)[None]


def engine_int4(out: int, inp: int, group: int) -> FusedInt4:
    """The engine's int4 CPU kernel layout for this shape."""
    return FusedInt4(Int4Format(group), torch.bfloat16, int4_block_rows(out, inp) or 64)


def make_candidate(kind: str, out: int, inp: int, group: int) -> Candidate | None:
    """The candidate `kind` on an [out, inp] matrix, or None where it does not apply."""
    x = torch.randn(1, inp, generator=torch.Generator().manual_seed(1)).bfloat16()
    if kind in ("bf16", "f32"):
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        xd = x.to(dtype)
        return Candidate(kind, copies_of(lambda i: (weight(out, inp, i).to(dtype),), out * inp * dtype.itemsize), lambda w: F.linear(xd, w))
    if kind == "int8":
        fmt = FusedInt8(torch.bfloat16)
        return Candidate(f"int8 {fmt.kernel}", copies_of(lambda i: tuple(fmt.quantize(weight(out, inp, i))), out * inp), lambda q, s: fmt.fused(x, [q, s]))
    if kind == "int4":
        fmt = engine_int4(out, inp, group)
        return Candidate(
            f"int4 g{group} {fmt.kernel}", copies_of(lambda i: tuple(fmt.quantize(weight(out, inp, i))), out * inp // 2), lambda p, sz: fmt.fused(x, [p, sz])
        )
    if kind == "int4-tiled":
        tiled = compute_format(Int4Format(group), torch.bfloat16, torch.device("cpu"), [(out, inp)])
        if not isinstance(tiled, TiledInt4):  # no AVX512-BF16, or the kernel could not be built
            return None
        made = copies_of(lambda i: tuple(tiled.quantize(weight(out, inp, i))), out * inp // 2)
        return Candidate(f"int4 g{group} {tiled.kernel} (tiled)", made, lambda p, sz: tiled.fused(x, [p, sz]))
    if kind == "int8-tiled":
        tiled8 = compute_format(Int8Format(), torch.bfloat16, torch.device("cpu"), [(out, inp)])
        if not isinstance(tiled8, TiledInt8):
            return None
        made = copies_of(lambda i: tuple(tiled8.quantize(weight(out, inp, i))), out * inp)
        return Candidate(f"int8 {tiled8.kernel} (tiled)", made, lambda q, s: tiled8.fused(x, [q, s]))
    if kind == "int8-compiled":
        fn, fmt = torch.compile(int8_reduce, dynamic=False), FusedInt8(torch.bfloat16)
        return Candidate("int8 inductor reduce", copies_of(lambda i: tuple(fmt.quantize(weight(out, inp, i))), out * inp), lambda q, s: fn(x[0], q, s))
    if kind == "int4-compiled":
        fn = torch.compile(int4_reduce, dynamic=False)
        return Candidate(
            f"int4 g{group} inductor reduce",
            copies_of(lambda i: halves_int4(weight(out, inp, i), group), out * inp // 2),
            lambda p, s, z: fn(x[0], p, s, z, group),
        )
    if kind == "int8-fbgemm-dynamic":
        xf = x.float()
        return Candidate(
            "int8 fbgemm dynamic (8-bit x)",
            copies_of(lambda i: (fbgemm_packed(weight(out, inp, i)),), out * inp),
            lambda p: torch.ops.quantized.linear_dynamic(xf, p, False),
            out * inp + 4 * out,
        )
    if kind == "int4-dyn-quant":
        xf = x.float()
        return Candidate(
            f"int4 g{group} _dyn_quant_matmul_4bit",
            copies_of(lambda i: (dyn_quant_packed(weight(out, inp, i), group),), out * inp // 2),
            lambda p: torch.ops.aten._dyn_quant_matmul_4bit(xf, p, group, inp, out),
            out * inp // 2 + out * inp // group * 4,
        )
    return None


def halves_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> int4_reduce's fields: packed [out, in / 2], scale and zero [out, G] in bf16."""
    packed, scale, zero = Int4Format(group).quantize(w)
    codes = torch.stack((packed & 15, packed >> 4), -1).flatten(-2)  # [out, in]
    half = codes.shape[1] // 2
    return (codes[:, :half] | (codes[:, half:] << 4)).contiguous(), scale.bfloat16(), (-zero.float() * scale.float()).bfloat16()


def fbgemm_packed(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] -> fbgemm's packed per-channel int8 weight (the engine's int8 scales)."""
    q, scale = Int8Format().quantize(w)
    qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def dyn_quant_packed(w: torch.Tensor, group: int) -> torch.Tensor:
    """w [out, in] -> `_dyn_quant_pack_4bit_weight`'s packing of symmetric 4-bit codes (codes + 8 in [0, 15])."""
    g = w.view(w.shape[0], -1, group)
    scale = (g.abs().amax(-1) / 7).clamp_min(1e-8)  # [out, G]
    codes = (torch.round(g / scale[..., None]).clamp(-8, 7) + 8).to(torch.uint8).view(w.shape)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return torch.ops.aten._dyn_quant_pack_4bit_weight(packed, scale.float(), None, group, w.shape[1], w.shape[0])


def measure(shape: str, kinds: list[str], group: int, rounds: int) -> None:
    """Time every candidate on one shape in interleaved rounds and print the table."""
    out, inp = SHAPES[shape]
    cands = [c for c in (make_candidate(k, out, inp, group) for k in kinds) if c is not None]
    for c in cands:  # warm-up (and compilation) outside the timed rounds
        for parts in c.copies[:2]:
            c.call(*parts)
    probes = []
    for _ in range(rounds):
        probes.append(memory_probe_gb_s(PROBE_BYTES))
        for c in cands:
            c.round()
    probe = statistics.median(probes)
    print(f"\n{NAMES[shape]} {out} x {inp}: probe median {probe:.1f} GB/s (rounds {' '.join(f'{p:.1f}' for p in probes)})")
    for c in cands:
        s = statistics.median(c.seconds)
        print(f"  {c.name:40s} {s * 1e3:8.3f} ms {c.nbytes / s / 1e9:6.1f} GB/s {100 * c.nbytes / s / 1e9 / probe:5.0f}%")
        c.copies.clear()


def main() -> None:
    """Parse the flags and measure each shape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the least disturbed by other work)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--group-size", type=int, default=64, help="int4 group size")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--kernels", default=",".join(DEFAULT_KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._inductor.config.fx_graph_cache = False  # its key misses ATEN_CPU_CAPABILITY: an AVX512 kernel could answer an AVX2 run
    torch._functorch.config.enable_autograd_cache = False
    print(f"kernels {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, {args.rounds} interleaved rounds, torch {torch.__version__}")
    for shape in args.shapes.split(","):
        measure(shape, args.kernels.split(","), args.group_size, args.rounds)


if __name__ == "__main__":
    main()
