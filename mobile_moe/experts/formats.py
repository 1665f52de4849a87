"""Expert formats: how one expert's weights are packed into bytes and turned back into matrices on the device.

A format quantizes a weight matrix [out, in] row by row into a few fields, each [out, ...]; rows are
independent, so a projection (gate, up or down) can be packed on its own as the checkpoint streams by.
The store, the cache slots and the copies only ever see the packed bytes.

- float (bf16 / fp16 / fp32): the weights themselves; read in place when they are in the compute dtype.
- int8: per output channel, symmetric: w = q * scale, q in [-127, 127], scale float32 [out].
- int4: groups of `group_size` along the input dim, asymmetric: w = (q - zero) * scale, q in [0, 15]
  two per byte (even column in the low nibble), scale and zero float16 [out, in / group_size].
- mxfp4 (OCP Microscaling, gpt-oss checkpoints): blocks of 32 along the input dim, FP4 E2M1 codes two per byte
  (even column in the low nibble), one E8M0 exponent per block: w = fp4(code) * 2^(scale - 127).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mobile_moe.config import EXPERT_DTYPES
from mobile_moe.errors import CheckpointError, InvalidParameter

FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_GROUP_SIZE = 64  # int4: measured on the demo model (docs/evaluation.md); 64 keeps int4 under 0.3x the bytes of bf16
QUANT_METHOD = "mobile-moe"  # quantization_config.quant_method of checkpoints `mobile-moe quantize` writes
MXFP4_METHOD = "mxfp4"  # quantization_config.quant_method of the hub's gpt-oss checkpoints
MX_BLOCK = 32  # values sharing one E8M0 exponent (OCP Microscaling)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes of codes 0..7; bit 3 is the sign
FP4_EMAX = 2  # exponent of the largest E2M1 normal (6 = 1.5 * 2^2)


@dataclass(frozen=True)
class Field:
    """One packed piece of a matrix: rows first, so row ranges can be written independently."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the field."""
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class ExpertFormat(ABC):
    """How weight matrices are packed (`quantize`) and restored (`dequantize`)."""

    name: str
    quantized: bool = True
    bias_dtype: torch.dtype = torch.float32  # expert biases (gpt-oss) are packed beside the weights in this dtype

    @abstractmethod
    def fields(self, out: int, inp: int) -> list[Field]:
        """The packed fields of one [out, inp] matrix."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> list[torch.Tensor]:
        """w: [..., out, in] -> one tensor per field, leading dims kept."""

    @abstractmethod
    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Fields of [..., out, in] matrices -> the weights [..., out, in] in `dtype` (a new tensor)."""

    def linear(self, x: torch.Tensor, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """x: [M, in] in `dtype` -> x @ w.T [M, out]; the reference path dequantizes the matrix first."""
        return F.linear(x, self.dequantize(parts, dtype))

    @property
    def layout_id(self) -> str:
        """Names the packed layout exactly (what `layout_format` rebuilds the format from, with the group size and dtype)."""
        return self.name

    def check(self, out: int, inp: int, what: str) -> None:
        """Raise InvalidParameter when a matrix shape cannot be packed."""

    def config(self) -> dict:
        """The `quantization_config` block of a checkpoint holding experts in this format."""
        return {"quant_method": QUANT_METHOD, "expert_format": self.name, "modules": "routed_experts"}

    def reads_in_place(self, dtype: torch.dtype) -> bool:
        """Whether packed weights already are the matrices in `dtype` (no dequantization needed)."""
        return False

    def dequant_bytes(self, out: int, inp: int, dtype: torch.dtype) -> int:
        """Upper estimate of the transient device memory dequantizing one [out, inp] matrix takes (float32 intermediates)."""
        return 0 if self.reads_in_place(dtype) else out * inp * (3 * 4 + dtype.itemsize)

    def __repr__(self) -> str:
        return self.name


class FloatFormat(ExpertFormat):
    """Unquantized weights in a float dtype."""

    quantized = False

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = self.bias_dtype = dtype
        self.name = {v: k for k, v in FLOAT_DTYPES.items()}.get(dtype, str(dtype))

    def fields(self, out: int, inp: int) -> list[Field]:
        return [Field("weight", self.dtype, (out, inp))]

    def quantize(self, w: torch.Tensor) -> list[torch.Tensor]:
        return [w.to(self.dtype)]

    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return parts[0].to(dtype, copy=True)

    def reads_in_place(self, dtype: torch.dtype) -> bool:
        return dtype == self.dtype

    def linear(self, x: torch.Tensor, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return F.linear(x, parts[0] if parts[0].dtype == dtype else parts[0].to(dtype))


class Int8Format(ExpertFormat):
    """Per-output-channel symmetric int8."""

    name = "int8"

    def fields(self, out: int, inp: int) -> list[Field]:
        return [Field("qweight", torch.int8, (out, inp)), Field("scales", torch.float32, (out,))]

    def quantize(self, w: torch.Tensor) -> list[torch.Tensor]:
        w = w.float()
        scale = (w.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [..., out]
        q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)  # [..., out, in]
        return [q, scale]

    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        q, scale = parts
        return q.float().mul_(scale[..., None]).to(dtype)  # in place: a fresh temporary per pass costs more than the arithmetic


class Int4Format(ExpertFormat):
    """Group-wise asymmetric int4 along the input dim, two codes per byte."""

    name = "int4"

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        if group_size < 2 or group_size % 2:
            raise InvalidParameter(f"int4 group size must be an even number >= 2, got {group_size}")
        self.group_size = group_size

    def check(self, out: int, inp: int, what: str) -> None:
        if inp % self.group_size:
            raise InvalidParameter(f"int4 group size {self.group_size} does not divide the input dim {inp} of the {what} projection")

    def fields(self, out: int, inp: int) -> list[Field]:
        groups = inp // self.group_size  # ExpertLayout has checked that the group divides `inp`
        return [Field("qweight", torch.uint8, (out, inp // 2)), Field("scales", torch.float16, (out, groups)), Field("zeros", torch.float16, (out, groups))]

    def quantize(self, w: torch.Tensor) -> list[torch.Tensor]:
        *lead, out, inp = w.shape
        self.check(out, inp, "expert")
        g = w.float().reshape(*lead, out, inp // self.group_size, self.group_size)  # [..., out, G, g]
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-6).half()  # stored precision is what dequantization uses
        zero = (-lo / scale.float()).half()
        q = torch.round(g / scale.float()[..., None] + zero.float()[..., None]).clamp_(0, 15).to(torch.uint8)
        return [pack_int4(q.reshape(*lead, out, inp)), scale, zero]

    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        packed, scale, zero = parts
        *lead, out, half = packed.shape
        q = unpack_int4(packed).view(*lead, out, -1, self.group_size)  # [..., out, G, g]
        w = q.float().sub_(zero.float()[..., None]).mul_(scale.float()[..., None])  # in place, as (q - zero) * scale
        return w.view(*lead, out, 2 * half).to(dtype)

    def config(self) -> dict:
        return {**super().config(), "group_size": self.group_size}

    def __repr__(self) -> str:
        return f"int4 (group {self.group_size})"


class Mxfp4Format(ExpertFormat):
    """OCP MXFP4: blocks of 32 FP4 (E2M1) values along the input dim sharing one E8M0 exponent; 4.25 bits per weight."""

    name = "mxfp4"

    def __init__(self) -> None:
        self._luts: dict[torch.device, torch.Tensor] = {}  # device -> the code values, copied from the host once

    def lut(self, device: torch.device) -> torch.Tensor:
        """The values of the 16 E2M1 codes [16] float32 on `device`, made once per device: a copy from the host in every
        dequantization syncs, and a captured CUDA graph refuses it."""
        lut = self._luts.get(device)
        if lut is None:
            lut = self._luts[device] = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32, device=device)
        return lut

    def check(self, out: int, inp: int, what: str) -> None:
        if inp % MX_BLOCK:
            raise InvalidParameter(f"mxfp4 blocks of {MX_BLOCK} do not divide the input dim {inp} of the {what} projection")

    def fields(self, out: int, inp: int) -> list[Field]:
        blocks = inp // MX_BLOCK
        return [Field("blocks", torch.uint8, (out, blocks, MX_BLOCK // 2)), Field("scales", torch.uint8, (out, blocks))]

    def quantize(self, w: torch.Tensor) -> list[torch.Tensor]:
        *lead, out, inp = w.shape
        self.check(out, inp, "expert")
        g = w.float().reshape(*lead, out, inp // MX_BLOCK, MX_BLOCK)  # [..., out, G, 32]
        amax = g.abs().amax(-1)  # [..., out, G]
        exp = torch.frexp(amax).exponent - 1 - FP4_EMAX  # floor(log2(amax)) - emax, exactly (amax = m * 2^e, m in [0.5, 1))
        exp = torch.where(amax > 0, exp, -127).clamp_(-127, 127)  # [..., out, G]; 255 (NaN) is never written
        codes = fp4_codes(torch.ldexp(g, -exp[..., None]))  # [..., out, G, 32]
        return [pack_int4(codes).contiguous(), (exp + 127).to(torch.uint8).contiguous()]

    def dequantize(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        blocks, scales = parts
        *lead, out, groups, half = blocks.shape
        values = self.lut(blocks.device)[unpack_int4(blocks).int()]  # [..., out, G, 32]
        w = torch.ldexp(values, scales.int()[..., None] - 127)
        return w.view(*lead, out, groups * 2 * half).to(dtype)

    def config(self) -> dict:
        """Our own packed layout (`quantize --to mxfp4`); the hub's gpt-oss checkpoints say quant_method mxfp4 instead."""
        return super().config()


def fp4_codes(v: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest E2M1 code (ties to the even code, saturating at +-6): uint8 in [0, 15]."""
    mag = v.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for i, (lo, hi) in enumerate(zip(FP4_VALUES, FP4_VALUES[1:])):
        mid = (lo + hi) / 2
        code += (mag > mid) if i % 2 == 0 else (mag >= mid)  # a tie goes to the even code
    return code | ((v < 0).to(torch.uint8) << 3)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes: uint8 [..., n] in [0, 15], n even -> [..., n / 2], even column in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed: uint8 [..., n / 2] -> codes [..., n]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def make_format(name: str, compute_dtype: torch.dtype, group_size: int | None = None) -> ExpertFormat:
    """The format for `--expert-dtype` (`auto`: the compute dtype, read in place)."""
    if name not in EXPERT_DTYPES:
        raise InvalidParameter(f"expert dtype must be one of {', '.join(EXPERT_DTYPES)}, got {name!r}")
    if group_size is not None and name != "int4":
        raise InvalidParameter(f"--group-size applies to int4 experts only, not {name}")
    if group_size is not None and (group_size < 2 or group_size & (group_size - 1)):
        raise InvalidParameter(f"--group-size must be a power of two >= 2 (e.g. {DEFAULT_GROUP_SIZE}), got {group_size}")
    if name == "auto":
        return FloatFormat(compute_dtype)
    if name in FLOAT_DTYPES:
        return FloatFormat(FLOAT_DTYPES[name])
    if name == "mxfp4":
        return Mxfp4Format()
    return Int8Format() if name == "int8" else Int4Format(DEFAULT_GROUP_SIZE if group_size is None else group_size)


def format_from_config(qc: dict) -> ExpertFormat:
    """The format a checkpoint's `quantization_config` names; unknown ones are a one-line error."""
    if qc.get("quant_method") == MXFP4_METHOD:
        return Mxfp4Format()
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"quantization_config.quant_method {qc.get('quant_method')!r} is not supported (only {QUANT_METHOD!r} and {MXFP4_METHOD!r} checkpoints)"
        )
    name = qc.get("expert_format")
    if name == "int8":
        return Int8Format()
    if name == "mxfp4":
        return Mxfp4Format()
    if name == "int4":
        group = qc.get("group_size")
        if not isinstance(group, int):
            raise CheckpointError(f"quantization_config of an int4 checkpoint needs an integer group_size, got {group!r}")
        try:
            return Int4Format(group)
        except InvalidParameter as e:
            raise CheckpointError(f"quantization_config: {e}") from None
    raise CheckpointError(f"quantization_config names an unknown expert format {name!r} (known: int8, int4, mxfp4)")
