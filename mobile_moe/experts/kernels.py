"""Fused weight-only expert kernels: quantized experts multiplied without dequantizing them into float temporaries.

Checkpoints (`mobile-moe quantize`) and the loader keep the portable layouts of formats.py. When the compute
device has a fused kernel for the format and dtype, the host store is repacked once at load into that kernel's
layout (`compute_format` + `ExpertStore.repack`); every expert keeps one contiguous buffer of the same size, so
the cache and the copies are unchanged. On CPU with bf16 / fp16 activations:

- int8 -> torch's `_weight_int8pack_mm` (codes as stored, scales in the compute dtype);
- int4 -> torch's `_weight_int4pack_mm_for_cpu` (codes in the kernel's blocked layout, whose block of rows changed
  between torch releases and is probed; (scale, zero) pairs [in / group, out, 2] in the compute dtype,
  w = (q - 8) * scale + zero).

Both kernels are matrix-vector kernels: their time grows with the rows, so a call with more than the format's
`max_rows` (a long prompt's rows of one expert) dequantizes once and runs a dense matmul instead. The crossovers
were measured on a 2048 x 2048 matrix with 2 threads (AVX512-BF16): int8 ~24 rows, int4 ~64.
float32 compute uses the same kernels with bf16 activations (x is rounded to bf16 for the call, the result cast
back): the kernels take no float32 input worth using, and even where bf16 is emulated (an AVX2 CPU without
AVX512-BF16) the int4 kernel took 0.38 ms against 14 ms for dequantize-then-matmul on a 2048 x 2048 matrix (2 threads),
an error far below the 4-bit quantization's own.
On CUDA nothing is repacked yet (pending a GPU run to choose among torch / torchao / gemlite kernels).
MXFP4 has no fused CPU kernel in torch; it keeps the reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mobile_moe.experts.formats import ExpertFormat, Field, Int4Format, Int8Format, make_format, unpack_int4
from mobile_moe.experts.store import MATRICES, ExpertStore

FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # compute dtypes with a fused path (float32: through bf16)
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu accepts
INT4_BLOCKS = (64, 32)  # the CPU kernel's packing interleaves output rows in blocks of this many: 64 in torch 2.13, 32 in 2.14
INT4_OFFSET = 8  # the kernel's codes are centred: w = (q - 8) * scale + zero


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
        return out * inp * (4 + dtype.itemsize)  # prompts: one int32/float code copy and the matrix

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
        return q.to(dtype) * scale.to(dtype)[..., None]  # int8 codes are exact in bf16: one rounding, as the float path

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
        s = scale.float()
        z = (INT4_OFFSET - zero.float()) * s  # (q - zero) * s = (q - 8) * s + (8 - zero) * s
        return [torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2), torch.stack((s, z), -1).transpose(0, 1).to(self.dtype).contiguous()]

    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        packed, sz = parts  # [out, in/2], [G, out, 2]
        out, inp = packed.shape[0], 2 * packed.shape[1]
        codes = unpack_kernel_int4(packed, out, inp, self.block).view(out, -1, self.group_size).to(dtype)  # [out, G, g]
        scale, zero = sz.transpose(0, 1).to(dtype).unbind(-1)  # [out, G] each
        return ((codes - INT4_OFFSET) * scale[..., None] + zero[..., None]).view(out, inp)

    def fused(self, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        packed, sz = parts
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, sz)


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


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation (and scale) dtype of the fused kernels for a compute dtype: float32 goes through bf16."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


def compute_format(fmt: ExpertFormat, dtype: torch.dtype, device: torch.device, shapes: list[tuple[int, int]]) -> FusedFormat | None:
    """The fused layout to repack `fmt` experts into for compute in `dtype` on `device`, or None (keep the reference path).

    shapes: the [out, in] of every expert matrix; each must suit the kernel."""
    if device.type != "cpu" or dtype not in FUSED_DTYPES or not fused_kernels_available():
        return None
    if type(fmt) is Int8Format:
        return FusedInt8(kernel_dtype(dtype))
    if type(fmt) is Int4Format and fmt.group_size in INT4_KERNEL_GROUPS:
        if not all(inp % fmt.group_size == 0 and out % 2 == 0 for out, inp in shapes):
            return None
        blocks = {int4_block_rows(out, inp) for out, inp in shapes}
        if len(blocks) == 1 and None not in blocks:
            return FusedInt4(fmt, kernel_dtype(dtype), blocks.pop())
    return None


def layout_format(layout_id: str, group_size: int, dtype: torch.dtype) -> ExpertFormat:
    """The format whose `layout_id` this is (group_size: int4 only; dtype: the compute dtype a kernel layout was packed for)."""
    if layout_id == f"int8:{FusedInt8.kernel}":
        return FusedInt8(kernel_dtype(dtype))
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
