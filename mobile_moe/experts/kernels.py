"""Fused weight-only expert kernels: quantized experts multiplied without dequantizing them into float temporaries.

Checkpoints (`mobile-moe quantize`) and the loader keep the portable layouts of formats.py. When the compute
device has a fused kernel for the format and dtype, the host store is repacked once at load into that kernel's
layout (`compute_format` + `ExpertStore.repack`); every expert keeps one contiguous buffer of the same size, so
the cache and the copies are unchanged. On CPU with bf16 / fp16 activations:

- int8 -> torch's `_weight_int8pack_mm` (codes as stored, scales in the compute dtype);
- int4 -> torch's `_weight_int4pack_mm_for_cpu` (codes in the kernel's blocked layout, whose block of rows follows the
  CPU feature set torch's kernels run (torch 2.14.1: 64 rows under AVX512, 32 under AVX2) and is probed; (scale, zero)
  pairs [in / group, out, 2] in the compute dtype, w = (q - 8) * scale + zero).

Both kernels are matrix-vector kernels: their time grows with the rows, so a call with more than the format's
`max_rows` (a long prompt's rows of one expert) dequantizes once and runs a dense matmul instead. The crossovers
were measured on a 2048 x 2048 matrix with 2 threads (AVX512-BF16): int8 ~24 rows, int4 ~64; and again on OLMoE expert
shapes with 1 thread (`scripts/kernel_rows.py`, AVX512 bf16 and AVX2 float32): int8 8-32 rows, int4 64-128.
float32 compute uses the same kernels with bf16 activations (x is rounded to bf16 for the call, the result cast
back): the kernels take no float32 input worth using, and even where bf16 is emulated (an AVX2 CPU without
AVX512-BF16) the int4 kernel took 0.38 ms against 14 ms for dequantize-then-matmul on a 2048 x 2048 matrix (2 threads),
an error far below the 4-bit quantization's own.
On CPUs where torch runs AVX2 or AVX512, int4 and int8 with bf16 or float32 compute go instead through the project's own
tiled kernels (`TiledInt4`, `TiledInt8`; experts/native/tiled.cpp, built once per machine), which read the weights at
the memory's speed where torch's convert every code to float; docs/design.md §4 has their layout.
On CUDA with bf16 (or float32, through bf16) compute:

- int4 -> torch's `_weight_int4pack_mm` (tinygemm; sm80+): the same (scale, zero) pairs and w = (q - 8) * scale + zero,
  codes in the kernel's tiled int32 layout, which only `_convert_weight_to_int4pack` on the device writes, so the
  store is repacked through the device once at load. Every load first checks the kernel against the reference path on
  a random matrix of each expert shape (`cuda_int4_agrees`); where it disagrees or fails, int4 keeps the reference path.
  Its speed against dequantize-then-matmul and the row crossover are pending a GPU run: until then every row count
  goes through the kernel.
- int8 has no CUDA weight-only kernel in torch (`_weight_int8pack_mm` is CPU / MPS); it keeps the reference path.

MXFP4 has no fused kernel in torch on either device; it keeps the reference path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mobile_moe.errors import InvalidParameter
from mobile_moe.experts.formats import ExpertFormat, Field, Int4Format, Int8Format, make_format, unpack_int4
from mobile_moe.experts.native import tiled_ops
from mobile_moe.experts.store import MATRICES, ExpertStore

EVERY_ROW = 1 << 30  # a kernel's max_rows when every row count runs on the codes
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # compute dtypes with a fused path (float32: through bf16)
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu accepts
INT4_BLOCKS = (64, 32)  # the CPU kernel's packing interleaves output rows in blocks of this many: 64 under torch's AVX512 kernels, 32 under AVX2
INT4_OFFSET = 8  # the kernel's codes are centred: w = (q - 8) * scale + zero
INT8_OFFSET = 128  # the tiled int8 kernel's codes are offset binary: u = q + 128
TILE_ROWS, TILE_COLUMNS = 16, 8  # the tiled int4 kernel: rows per tile (one float lane each), input columns per 64-byte block

log = logging.getLogger("mobile_moe")


def fused_kernels_available() -> bool:
    """Whether this torch build has the CPU weight-only kernels."""
    ops = torch.ops.aten
    return all(hasattr(ops, name) for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"))


class FusedFormat(ExpertFormat):
    """A format in a kernel's layout: filled only by `from_portable`, multiplied by the kernel for few rows."""

    portable: ExpertFormat
    dtype: torch.dtype
    kernel: str
    max_rows: int  # calls with more rows dequantize, then run one dense matmul

    def from_portable(self, parts: list[torch.Tensor], out: int, inp: int) -> list[torch.Tensor]:
        """One matrix's fields in the portable layout -> its fields in this kernel's layout."""
        raise NotImplementedError

    def fused(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        """x: [M, in] in the compute dtype -> x @ w.T [M, out] through the kernel."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if x.shape[0] <= self.max_rows and x.dtype == self.dtype:
            return self.fused(x, parts)
        if x.shape[0] <= self.max_rows and x.dtype == torch.float32:  # float32 compute: the kernel on bf16 activations
            return self.fused(x.to(self.dtype), parts).to(torch.float32)
        return F.linear(x, self.dequantize(parts, dtype))

    def quantize(self, w: torch.Tensor) -> list[torch.Tensor]:
        out, inp = w.shape
        return self.from_portable(self.portable.quantize(w), out, inp)

    def config(self) -> dict:
        return self.portable.config()

    @property
    def layout_id(self) -> str:
        return f"{self.name}:{self.kernel}"

    def dequant_bytes(self, out: int, inp: int, dtype: torch.dtype) -> int:
        return out * inp * (4 + dtype.itemsize)  # prompts: one float32 copy of the codes, dequantized in place, and the matrix

    def __repr__(self) -> str:
        return f"{self.portable!r}, fused {self.kernel} kernel"


class FusedInt8(FusedFormat):
    """Per-channel int8 for `_weight_int8pack_mm`: codes [out, in] as stored, scales [out] in the compute dtype."""

    name = "int8"
    kernel = "_weight_int8pack_mm"
    max_rows = 16

    def __init__(self, dtype: torch.dtype) -> None:
        self.portable, self.dtype = Int8Format(), dtype

    def fields(self, out: int, inp: int) -> list[Field]:
        return [Field("qweight", torch.int8, (out, inp)), Field("scales", self.dtype, (out,))]

    def from_portable(self, parts: list[torch.Tensor], out: int, inp: int) -> list[torch.Tensor]:
        q, scale = parts
        return [q, scale.to(self.dtype)]

    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        q, scale = parts
        return q.to(dtype).mul_(scale.to(dtype)[..., None])  # int8 codes are exact in bf16: one rounding, as the float path

    def fused(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        q, scale = parts
        return torch.ops.aten._weight_int8pack_mm(x, q, scale)


class FusedInt4(FusedFormat):
    """Group-wise int4 for `_weight_int4pack_mm_for_cpu`: the kernel's packed codes [out, in / 2] and (scale, zero) [in / g, out, 2]."""

    name = "int4"
    kernel = "_weight_int4pack_mm_for_cpu"
    max_rows = 64

    def __init__(self, portable: Int4Format, dtype: torch.dtype, block: int = INT4_BLOCKS[0]) -> None:
        self.portable, self.dtype, self.group_size = portable, dtype, portable.group_size
        self.block = block  # rows per interleaved block of the running torch's packing (`int4_block_rows`)

    @property
    def layout_id(self) -> str:
        return f"int4:{self.kernel}" + ("" if self.block == INT4_BLOCKS[0] else f":b{self.block}")

    def fields(self, out: int, inp: int) -> list[Field]:
        return [Field("packed", torch.uint8, (out, inp // 2)), Field("scale_zeros", self.dtype, (inp // self.group_size, out, 2))]

    def from_portable(self, parts: list[torch.Tensor], out: int, inp: int) -> list[torch.Tensor]:
        packed, scale, zero = parts  # [out, in/2] uint8, [out, G] fp16, [out, G] fp16: w = (q - zero) * scale
        codes = unpack_int4(packed).to(torch.int32)  # [out, in]
        return [torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2), centred_scale_zeros(scale, zero, self.dtype)]

    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The matrix [out, in] in `dtype`, as a transposed view of its [in, out] copy: the kernel's layout unpacks to
        input-major codes without a byte transpose, and (q - 8) * scale + zero is one float32 pass, rounded once."""
        packed, sz = parts  # [out, in/2], [G, out, 2]
        out, inp = packed.shape[0], 2 * packed.shape[1]
        w = unpack_kernel_int4_columns(packed, out, inp, self.block).view(-1, self.group_size, out).float()  # [G, g, out] codes
        scale, zero = sz.float().unbind(-1)  # [G, out] each
        torch.addcmul((zero - INT4_OFFSET * scale)[:, None], w, scale[:, None], out=w)  # in place: q * scale + (zero - 8 scale)
        return w.view(inp, out).to(dtype).t()

    def fused(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        packed, sz = parts
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, sz)


class TiledFormat(FusedFormat):
    """The project's tiled kernels (experts/native/tiled.cpp): bf16 activations (quantized to int8 inside on the AVX2
    path), float32 sums rounded once to the compute dtype; every row count on the codes (a prompt chunk is a GEMM on them: no dequantized copy to plan for).
    On AVX512-BF16 they beat dequantize-then-matmul at every row count measured (1-512); on the AVX2 path, whose
    activations are quantized to int8, by 1.5-20x at 16-512 rows (2048 x 2048 and 1024 x 2048, 2 threads)."""

    max_rows = EVERY_ROW

    def dequant_bytes(self, out: int, inp: int, dtype: torch.dtype) -> int:
        return 0

    def linear(self, x: torch.Tensor, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return self.fused(x.to(self.dtype).contiguous(), parts).to(x.dtype)  # float32 sums, rounded once


class TiledInt4(TiledFormat):
    """Group-wise int4 for the project's tiled kernel (experts/native/tiled.cpp; AVX512-BF16, else AVX2): codes in tiles of 16 rows
    [out, in / 2] (the same bytes as the portable layout, reordered) and (scale, zero) pairs in bf16, tile-major
    [out / 16, in / g, 16, 2], so a thread streams its tiles' codes and pairs front to back."""

    name = "int4"
    kernel = "int4_tiles_mm"

    def __init__(self, portable: Int4Format, ops: Any) -> None:
        self.portable, self.dtype, self.group_size = portable, torch.bfloat16, portable.group_size
        self.mm: Callable[..., torch.Tensor] = ops.int4_tiles_mm  # x [M, in] bf16 -> [M, out] float32 (a slot pool's: experts/dispatch.py)

    def fields(self, out: int, inp: int) -> list[Field]:
        return [Field("packed", torch.uint8, (out, inp // 2)), Field("scale_zeros", self.dtype, (out // TILE_ROWS, inp // self.group_size, TILE_ROWS, 2))]

    def from_portable(self, parts: list[torch.Tensor], out: int, inp: int) -> list[torch.Tensor]:
        packed, scale, zero = parts  # [out, in/2] uint8, [out, G] fp16, [out, G] fp16: w = (q - zero) * scale
        pairs = centred_scale_zeros(scale, zero, self.dtype)  # [G, out, 2]
        return [tile_int4(unpack_int4(packed)), pairs.view(-1, out // TILE_ROWS, TILE_ROWS, 2).transpose(0, 1).contiguous()]

    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The matrix [out, in] in `dtype`, as a transposed view of its [in, out] copy (the layout unpacks input-major as
        cheaply), (q - 8) * scale + zero in one float32 pass, rounded once."""
        packed, sz = parts  # [out, in/2], [T, G, 16, 2]
        out, inp = packed.shape[0], 2 * packed.shape[1]
        w = untile_int4_columns(packed).view(-1, self.group_size, out).float()  # [G, g, out] codes
        scale, zero = sz.float().transpose(0, 1).reshape(-1, out, 2).unbind(-1)  # [G, out] each
        torch.addcmul((zero - INT4_OFFSET * scale)[:, None], w, scale[:, None], out=w)  # in place: q * scale + (zero - 8 scale)
        return w.view(inp, out).to(dtype).t()

    def fused(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        packed, sz = parts
        return self.mm(x, packed, sz, self.group_size)  # [M, out] float32


class TiledInt8(TiledFormat):
    """Per-channel int8 for the project's tiled kernel (experts/native/tiled.cpp): codes + 128 as uint8 in tiles of
    16 rows [out, in] (64-byte blocks of 16 rows x 4 columns) and scales [out] in bf16."""

    name = "int8"
    kernel = "int8_tiles_mm"

    def __init__(self, ops: Any) -> None:
        self.portable, self.dtype = Int8Format(), torch.bfloat16
        self.mm: Callable[..., torch.Tensor] = ops.int8_tiles_mm  # x [M, in] bf16 -> [M, out] float32

    def fields(self, out: int, inp: int) -> list[Field]:
        return [Field("qweight", torch.uint8, (out, inp)), Field("scales", self.dtype, (out,))]

    def from_portable(self, parts: list[torch.Tensor], out: int, inp: int) -> list[torch.Tensor]:
        q, scale = parts  # [out, in] int8, [out]: w = q * scale
        return [tile_int8(q), scale.to(self.dtype)]

    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The matrix [out, in] in `dtype`, as a transposed view of its [in, out] copy, rounded once."""
        codes, scale = parts
        w = untile_int8_columns(codes).float().sub_(INT8_OFFSET)  # [in, out]
        return w.mul_(scale.float()).to(dtype).t()

    def fused(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        codes, scale = parts
        return self.mm(x, codes, scale)  # [M, out] float32


def tile_int8(q: torch.Tensor) -> torch.Tensor:
    """codes int8 [out, in] (out % 16 == 0, in % 4 == 0) -> the tiled int8 kernel's bytes [out, in]: u = q + 128, 64-byte
    blocks of 16 rows x 4 columns whose 16-bit word 2r + c holds row r's u of column c (low byte) and of column 2 + c."""
    out, inp = q.shape
    u = (q.view(torch.uint8) ^ INT8_OFFSET).view(out // TILE_ROWS, TILE_ROWS, inp // 4, 2, 2)  # [T, r, in/4, half, c]
    return u.permute(0, 2, 1, 4, 3).contiguous().view(out, inp)  # [T, in/4, r, c, half]: the half is the word's byte


def untile_int8_columns(codes: torch.Tensor) -> torch.Tensor:
    """The tiled int8 kernel's bytes [out, in] -> u = q + 128 as uint8 [in, out] (`tile_int8` undone, transposed)."""
    out, inp = codes.shape
    b = codes.view(out // TILE_ROWS, inp // 4, TILE_ROWS, 2, 2)  # [T, in/4, r, c, half]
    return b.permute(1, 4, 3, 0, 2).reshape(inp, out)  # [in/4, half, c, T, r]: column 4b + 2 half + c, row 16T + r


def tile_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [out, in] (out % 16 == 0, in % 8 == 0) -> the tiled kernel's bytes [out, in / 2]: 64-byte blocks of 16
    rows x 8 columns, whose 16-bit word 2r + c holds, in nibble j, row r's code of column 2j + c (little-endian)."""
    out, inp = codes.shape
    q = codes.view(out // TILE_ROWS, TILE_ROWS, inp // TILE_COLUMNS, 4, 2).permute(0, 2, 1, 4, 3)  # [T, in/8, 16 (r), 2 (c), 4 (j)]
    return torch.stack((q[..., 0] | (q[..., 1] << 4), q[..., 2] | (q[..., 3] << 4)), -1).view(out, inp // 2)  # bytes: j = 0, 1 | 2, 3


def untile_int4_columns(packed: torch.Tensor) -> torch.Tensor:
    """The tiled kernel's bytes [out, in / 2] -> codes uint8 [in, out] (`tile_int4` undone, transposed)."""
    out, inp = packed.shape[0], 2 * packed.shape[1]
    b = packed.view(out // TILE_ROWS, inp // TILE_COLUMNS, TILE_ROWS, 2, 2)  # [T, in/8, 16 (r), 2 (c), 2 (byte: j // 2)]
    nibbles = torch.stack((b & 15, b >> 4), -1)  # [T, in/8, r, c, j // 2, j % 2]
    return nibbles.permute(1, 4, 5, 3, 0, 2).reshape(inp, out)  # [in/8, j, c, T, r]: column 8b + 2j + c, row 16T + r


def centred_scale_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Portable (scale, zero) [out, G] each, w = (q - zero) * scale -> both int4 kernels' pairs [G, out, 2] in `dtype`,
    w = (q - 8) * scale + zero': zero' = (8 - zero) * scale."""
    s = scale.float()
    return torch.stack((s, (INT4_OFFSET - zero.float()) * s), -1).transpose(0, 1).to(dtype).contiguous()


def unpack_kernel_int4(packed: torch.Tensor, out: int, inp: int, block: int) -> torch.Tensor:
    """The CPU kernel's packed codes [out, in / 2] -> codes uint8 [out, in].

    Full blocks of `block` rows: byte (b, k, j) holds row j (low nibble) and row block / 2 + j (high) of column k. The
    remaining rows: byte (k, r) holds rows 2r (low) and 2r + 1 (high). `int4_block_rows` finds the block size of the
    running torch before any store is repacked.
    """
    full = out // block * block
    flat = packed.reshape(-1)
    blocks = flat[: full * inp // 2].view(-1, inp, block // 2)  # [B, in, block / 2]
    head = torch.cat((blocks & 15, blocks >> 4), -1).transpose(1, 2).reshape(full, inp)  # [full, in]
    if full == out:
        return head
    tail = flat[full * inp // 2 :].view(inp, (out - full) // 2)  # [in, rest/2]
    rest = torch.stack((tail & 15, tail >> 4), -1).view(inp, out - full).t()  # [rest, in]
    return torch.cat((head, rest))


def unpack_kernel_int4_columns(packed: torch.Tensor, out: int, inp: int, block: int) -> torch.Tensor:
    """The CPU kernel's packed codes [out, in / 2] -> codes uint8 [in, out] (`unpack_kernel_int4` transposed): a full block's
    bytes for one column are contiguous, so input-major codes need no byte-wise transpose."""
    full = out // block * block
    flat = packed.reshape(-1)
    blocks = flat[: full * inp // 2].view(-1, inp, block // 2).transpose(0, 1)  # [in, B, block / 2]
    head = torch.cat((blocks & 15, blocks >> 4), -1).view(inp, full)  # [in, full]
    if full == out:
        return head
    tail = flat[full * inp // 2 :].view(inp, (out - full) // 2)  # [in, rest/2]
    return torch.cat((head, torch.stack((tail & 15, tail >> 4), -1).view(inp, out - full)), 1)  # [in, out]


def int4_block_rows(out: int, inp: int) -> int | None:
    """Probe: the block size whose unpacking of torch's packing of random codes (a full block and `out`'s row tail) gives
    the same codes back, or None when no known layout does (then int4 keeps the reference path)."""
    for block in INT4_BLOCKS:
        rows = max(INT4_BLOCKS) + out % block
        codes = torch.randint(0, 16, (rows, inp), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            if torch.equal(unpack_kernel_int4(packed, rows, inp, block).int(), codes):
                return block
        except (RuntimeError, ValueError):
            return None
    return None


class CudaInt4(FusedFormat):
    """Group-wise int4 for CUDA's `_weight_int4pack_mm`: tiled codes stored as int32 [out, in / 8] (the kernel's
    [out / 8, in / (16 t), 32, t / 2] tiles, t = inner k tiles) and (scale, zero) [in / g, out, 2] in bf16."""

    name = "int4"
    kernel = "_weight_int4pack_mm"
    max_rows = EVERY_ROW  # every row count through the kernel until a GPU run measures the crossover

    def __init__(self, portable: Int4Format, device: torch.device, inner_k_tiles: int) -> None:
        self.portable, self.dtype, self.group_size = portable, torch.bfloat16, portable.group_size
        self.device, self.inner_k_tiles = device, inner_k_tiles

    @property
    def layout_id(self) -> str:
        return f"int4:{self.kernel}:t{self.inner_k_tiles}"

    def fields(self, out: int, inp: int) -> list[Field]:
        return [Field("tiles", torch.int32, (out, inp // 8)), Field("scale_zeros", self.dtype, (inp // self.group_size, out, 2))]

    def from_portable(self, parts: list[torch.Tensor], out: int, inp: int) -> list[torch.Tensor]:
        packed, scale, zero = parts  # [out, in/2] uint8 (even column low), [out, G] fp16 each: w = (q - zero) * scale
        swapped = (packed >> 4) | (packed << 4)  # the kernel reads the even column from the high nibble
        tiles = self.convert(swapped.to(self.device))
        return [tiles.reshape(out, inp // 8).to(packed.device), centred_scale_zeros(scale, zero, self.dtype)]

    def fused(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        tiles, sz = parts  # [out, in/8] int32, [G, out, 2]
        out, inp = tiles.shape[0], tiles.shape[1] * 8
        t = self.inner_k_tiles
        return self.matmul(x.contiguous(), tiles.reshape(out // 8, inp // (16 * t), 32, t // 2), sz)

    def convert(self, codes: torch.Tensor) -> torch.Tensor:
        """codes uint8 [out, in / 2] (even column high) on the device -> the kernel's tiles."""
        return torch.ops.aten._convert_weight_to_int4pack(codes, self.inner_k_tiles)

    def matmul(self, x: torch.Tensor, tiles: torch.Tensor, scale_zeros: torch.Tensor) -> torch.Tensor:
        """x [M, in] bf16 -> x @ w.T [M, out] bf16 through the kernel."""
        return torch.ops.aten._weight_int4pack_mm(x, tiles, self.group_size, scale_zeros)

    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The tiled layout has no unpacking op: the kernel times an identity gives w.T, rounded to bf16."""
        inp = parts[0].shape[1] * 8
        return self.fused(torch.eye(inp, dtype=self.dtype, device=parts[0].device), parts).t().to(dtype)  # [out, in]


def inner_k_tiles(inputs: list[int]) -> int | None:
    """The most inner k tiles (8, 4 or 2; 16 input columns each) whose tile divides every input dim, or None."""
    return next((t for t in (8, 4, 2) if all(inp % (16 * t) == 0 for inp in inputs)), None)


def cuda_int4(fmt: Int4Format, dtype: torch.dtype, device: torch.device, shapes: list[tuple[int, int]]) -> CudaInt4 | None:
    """The CUDA int4 kernel layout for these expert shapes, when the kernel takes them and agrees with the reference."""
    if dtype not in (torch.bfloat16, torch.float32) or fmt.group_size not in INT4_KERNEL_GROUPS or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return None
    tiles = inner_k_tiles([inp for _, inp in shapes])
    if tiles is None or not all(out % 8 == 0 and inp % fmt.group_size == 0 for out, inp in shapes):
        return None
    kernel = CudaInt4(fmt, device, tiles)
    return kernel if cuda_int4_agrees(kernel, shapes) else None


def cuda_int4_agrees(kernel: CudaInt4, shapes: list[tuple[int, int]]) -> bool:
    """Load-time check on the device: a random matrix of each shape through the kernel (4 rows) and through
    dequantize-then-matmul agree within bf16 rounding; a kernel error or a layout mismatch says no."""
    gen = torch.Generator().manual_seed(0)
    try:
        for out, inp in shapes:
            parts = kernel.portable.quantize(torch.randn(out, inp, generator=gen))
            x = torch.randn(4, inp, generator=gen).to(kernel.device, torch.bfloat16)
            want = x.float() @ kernel.portable.dequantize([p.to(kernel.device) for p in parts], torch.float32).t()  # [4, out]
            got = kernel.fused(x, [p.to(kernel.device) for p in kernel.from_portable(parts, out, inp)]).float()
            if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().mean())):
                log.warning("int4 experts: %s disagrees with the reference path on %d x %d; using the reference path", kernel.kernel, out, inp)
                return False
    except RuntimeError as exc:
        log.warning("int4 experts: %s is unavailable (%s); using the reference path", kernel.kernel, str(exc).splitlines()[0])
        return False
    return True


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation (and scale) dtype of the fused kernels for a compute dtype: float32 goes through bf16."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


INT8_KERNEL_STEP = 16  # `_weight_int8pack_mm` on CPU is right only for input widths that are multiples of this


def compute_format(fmt: ExpertFormat, dtype: torch.dtype, device: torch.device, shapes: list[tuple[int, int]]) -> FusedFormat | None:
    """The fused layout to repack `fmt` experts into for compute in `dtype` on `device`, or None (keep the reference path).

    shapes: the [out, in] of every expert matrix; each must suit the kernel."""
    if device.type == "cuda" and type(fmt) is Int4Format:
        return cuda_int4(fmt, dtype, device, shapes)
    if device.type != "cpu" or dtype not in FUSED_DTYPES or not fused_kernels_available():
        return None
    tiled = tiled_int8(dtype, shapes) if type(fmt) is Int8Format else tiled_int4(fmt, dtype, shapes) if type(fmt) is Int4Format else None
    if tiled is not None:
        return tiled
    if type(fmt) is Int8Format:  # the kernel reads inputs in steps of 16: other widths give inf/NaN or crash
        return FusedInt8(kernel_dtype(dtype)) if all(inp % INT8_KERNEL_STEP == 0 for _, inp in shapes) else None
    if type(fmt) is Int4Format and fmt.group_size in INT4_KERNEL_GROUPS:
        if not all(inp % fmt.group_size == 0 and out % 2 == 0 for out, inp in shapes):
            return None
        blocks = {int4_block_rows(out, inp) for out, inp in shapes}
        if len(blocks) == 1 and None not in blocks:
            return FusedInt4(fmt, kernel_dtype(dtype), blocks.pop())
    return None


def tiled_int4(fmt: Int4Format, dtype: torch.dtype, shapes: list[tuple[int, int]]) -> TiledInt4 | None:
    """The tiled int4 layout for these shapes (rows in tiles of 16, groups of whole blocks), where the tiled kernels run here."""
    if dtype not in (torch.bfloat16, torch.float32) or fmt.group_size % TILE_COLUMNS:
        return None
    if not all(out % TILE_ROWS == 0 and inp % fmt.group_size == 0 for out, inp in shapes):
        return None
    ops = tiled_ops()
    return None if ops is None else TiledInt4(fmt, ops)


def tiled_int8(dtype: torch.dtype, shapes: list[tuple[int, int]]) -> TiledInt8 | None:
    """The tiled int8 layout for these shapes (rows in tiles of 16, inputs in blocks of 4), where the tiled kernels run here."""
    if dtype not in (torch.bfloat16, torch.float32) or not all(out % TILE_ROWS == 0 and inp % 4 == 0 for out, inp in shapes):
        return None
    ops = tiled_ops()
    return None if ops is None else TiledInt8(ops)


def layout_format(layout_id: str, group_size: int, dtype: torch.dtype) -> ExpertFormat:
    """The format whose `layout_id` this is (group_size: int4 only; dtype: the compute dtype a kernel layout was packed for)."""
    if layout_id == f"int8:{FusedInt8.kernel}":
        return FusedInt8(kernel_dtype(dtype))
    if layout_id.startswith(f"int4:{CudaInt4.kernel}:t"):
        return CudaInt4(Int4Format(group_size), torch.device("cuda"), int(layout_id.removeprefix(f"int4:{CudaInt4.kernel}:t")))
    if layout_id in (f"int4:{TiledInt4.kernel}", f"int8:{TiledInt8.kernel}"):
        ops = tiled_ops()
        if ops is None:
            raise InvalidParameter("this store is packed for the tiled CPU kernels, which do not run here (they need AVX2 and a C++ compiler); rebuild it")
        return TiledInt8(ops) if layout_id.startswith("int8") else TiledInt4(Int4Format(group_size), ops)
    if layout_id.startswith(f"int4:{FusedInt4.kernel}"):
        block = layout_id.removeprefix(f"int4:{FusedInt4.kernel}").removeprefix(":b") or INT4_BLOCKS[0]
        return FusedInt4(Int4Format(group_size), kernel_dtype(dtype), int(block))
    return make_format(layout_id, dtype, group_size if layout_id == "int4" else None)


def use_fused_kernels(store: ExpertStore, dtype: torch.dtype, device: torch.device, progress: bool = False) -> bool:
    """Repack a filled store into the fused kernel layout for `dtype` on `device`, where one exists; returns whether it did."""
    fmt = compute_format(store.format, dtype, device, [store.shape.matrix_shape(m) for m in MATRICES])
    if fmt is not None:
        store.repack(fmt, progress)
    return fmt is not None
