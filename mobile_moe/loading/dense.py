"""Dense weights in int8 or int4 (`--dense-dtype`): which linears are quantized, in which format, and their kernels.

The formats are the experts' (experts/formats.py), packed by the same code, and the kernels the experts' fused
weight-only kernels (experts/kernels.py). Every linear of the decoder layers (attention projections, MLA's but
`kv_b_proj`, whose weight the absorbed path reads as a matrix; shared experts; dense MLP layers; a shared-expert
gate) and the LM head is quantized, the format chosen per matrix:

- int4 where torch's int4 CPU kernel takes the shape: output rows a multiple of 16 and the input width a multiple
  of the group size;
- else int8 where the int8 kernel takes it (input width a multiple of 16): e.g. a 50257-row head, a one-row gate;
- else the float weight in the compute dtype.

Norms, routers, biases and embeddings keep their float weights. A quantized checkpoint (`quantize --dense-dtype`)
names the dense format in `quantization_config` (`dense_format`, `dense_group_size`); the same rule then tells which
matrices it stores packed. At load the packed fields are repacked into a kernel's layout where the device has one
(`compute_format`), else the reference path dequantizes each matrix per call.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from mobile_moe.errors import CheckpointError, InvalidParameter
from mobile_moe.experts.formats import DEFAULT_GROUP_SIZE, FLOAT_DTYPES, ExpertFormat, Int4Format, Int8Format
from mobile_moe.experts.kernels import INT8_KERNEL_STEP, compute_format
from mobile_moe.layers.qlinear import QuantLinear

QUANTIZED = ("int8", "int4")
INT4_ROW_STEP = 16  # torch's int4 CPU kernel packs output rows in steps of this many


@dataclass(frozen=True)
class DenseChoice:
    """The dense weights' format: int8 / int4 (name) with its int4 group, or None (float in the compute dtype)."""

    name: str | None
    group_size: int = DEFAULT_GROUP_SIZE
    reason: str = ""

    def config(self) -> dict:
        """The `quantization_config` entries of a checkpoint whose dense weights are in this format."""
        return {} if self.name is None else {"dense_format": self.name, "dense_group_size": self.group_size}


def stored_dense(cfg: PretrainedConfig) -> DenseChoice | None:
    """The dense format a quantized checkpoint declares, else None."""
    qc = getattr(cfg, "quantization_config", None)
    qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    if not qc or "dense_format" not in qc:
        return None
    name, group = qc["dense_format"], qc.get("dense_group_size", DEFAULT_GROUP_SIZE)
    if name not in QUANTIZED or not isinstance(group, int) or group < 2 or group % 2:
        raise CheckpointError(f"quantization_config names an unknown dense format {name!r} (group {group!r}; known: int8, int4)")
    return DenseChoice(name, group, f"{name}: as the checkpoint stores it")


def resolve_dense(cfg: PretrainedConfig, name: str, group_size: int | None, device: torch.device, dtype: torch.dtype, params: int = 0) -> DenseChoice:
    """The dense format for `--dense-dtype` (auto: `auto_dense` for a model of `params` parameters); a quantized checkpoint's
    own, which only auto or its name accepts."""
    stored = stored_dense(cfg)
    if stored is not None:
        if name not in ("auto", stored.name):
            raise InvalidParameter(f"the checkpoint stores {stored.name} dense weights; --dense-dtype {name} cannot change them (use auto)")
        return stored
    if name in FLOAT_DTYPES:
        if FLOAT_DTYPES[name] != dtype:
            compute = str(dtype).removeprefix("torch.")
            raise InvalidParameter(f"--dense-dtype {name} keeps dense weights in the compute dtype, here {compute}: give --dtype too")
        return DenseChoice(None, reason=f"{name}: as asked")
    if name in QUANTIZED:
        return DenseChoice(name, group_size or DEFAULT_GROUP_SIZE, f"{name}: as asked")
    if name != "auto":
        raise InvalidParameter(f"dense dtype must be one of auto, {', '.join(FLOAT_DTYPES)}, {', '.join(QUANTIZED)}, got {name!r}")
    return auto_dense(device, dtype, params)


AUTO_INT8_MIN_PARAMS = 200_000_000  # as `--dtype auto`: below this a model is dispatch-bound on CPU, not bound by bytes


def auto_dense(device: torch.device, dtype: torch.dtype, params: int) -> DenseChoice:
    """`--dense-dtype auto` (measurements: docs/performance.md): on CPU, int8 for a model big enough to be bound by
    memory (no quality cost measured; int4 reads fewer bytes still, at a measured cost, and is asked for by name); else,
    and on CUDA (no int8 kernel there), float dense weights in the compute dtype."""
    if device.type == "cpu" and params >= AUTO_INT8_MIN_PARAMS:
        return DenseChoice("int8", reason=f"int8: {params / 1e9:.1f}B parameters on CPU read fewer bytes per token")
    return DenseChoice(None, reason=f"{str(dtype).removeprefix('torch.')}: the compute dtype")


def matrix_format(choice: DenseChoice, out: int, inp: int) -> ExpertFormat | None:
    """The packed format of one [out, inp] dense matrix under `choice`, or None (stays float)."""
    if choice.name == "int4" and out % INT4_ROW_STEP == 0 and inp % choice.group_size == 0:
        return Int4Format(choice.group_size)
    if choice.name in QUANTIZED and inp % INT8_KERNEL_STEP == 0:
        return Int8Format()
    return None


def dense_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears a dense format applies to, by module name: all but those their owner keeps float (`float_linears`)."""
    keep = {f"{prefix}.{name}".lstrip(".") for prefix, m in model.named_modules() for name in getattr(m, "float_linears", ())}
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in keep}


def dense_formats(model: nn.Module, choice: DenseChoice) -> dict[str, ExpertFormat]:
    """Module name -> packed format of every linear `choice` quantizes."""
    if choice.name is None:
        return {}
    formats = {name: matrix_format(choice, lin.out_features, lin.in_features) for name, lin in dense_linears(model).items()}
    return {name: fmt for name, fmt in formats.items() if fmt is not None}


def replace_linears(model: nn.Module, formats: dict[str, ExpertFormat], quantize: bool) -> None:
    """Swap each named linear for a QuantLinear: with `quantize`, of its own weights' packed fields, else of empty fields
    (meta-built models, filled by the checkpoint's tensors)."""
    for name, fmt in formats.items():
        owner_name, _, attr = name.rpartition(".")
        owner, lin = model.get_submodule(owner_name), model.get_submodule(name)
        w = lin.weight.detach()  # [out, in]
        if quantize:
            parts = [p.to(w.device) for p in fmt.quantize(w)]
        else:
            parts = [torch.empty(f.shape, dtype=f.dtype, device=w.device) for f in fmt.fields(lin.out_features, lin.in_features)]
        bias = None if lin.bias is None else lin.bias.detach()
        setattr(owner, attr, QuantLinear(fmt, parts, bias, lin.in_features, lin.out_features))


def quantized_fields(prefix: str, fmt: ExpertFormat, weight: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """A float weight [out, in] -> its packed fields under the checkpoint keys `prefix.<field>`, on `device`."""
    out, inp = weight.shape
    return {f"{prefix}.{f.name}": p.to(device) for f, p in zip(fmt.fields(out, inp), fmt.quantize(weight), strict=True)}


def quantized_modules(model: nn.Module) -> list[QuantLinear]:
    """Every QuantLinear holding weights, once: fused ones (which their members point to) included."""
    found: dict[int, QuantLinear] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            holder = m if m.rows is None else m.rows[0]
            found.setdefault(id(holder), holder)
    return list(found.values())


def unregistered_bytes(model: nn.Module) -> int:
    """Bytes of fused QuantLinears, which no module registers (their members point to them): what `named_buffers` misses."""
    registered = {id(m) for m in model.modules()}
    held = [m for m in quantized_modules(model) if id(m) not in registered]
    return sum(t.numel() * t.element_size() for m in held for t in [*m.parts, *([] if m.bias is None else [m.bias])])


def pack_dense(model: nn.Module, dtype: torch.dtype, device: torch.device, fused: bool = True) -> str:
    """Repack every QuantLinear (after fusion) into its fused kernel's layout where `device` has one; returns the dense
    path: '<count> <layout>' per layout, float linears named by their dtype, reference paths as '<format>:reference'."""
    kernels: dict[tuple[str, int, int], ExpertFormat | None] = {}  # one probe per format and shape
    paths: Counter[str] = Counter()
    for m in quantized_modules(model):
        key = (repr(m.fmt), m.out_features, m.in_features)
        if key not in kernels:
            kernels[key] = compute_format(m.fmt, dtype, device, [key[1:]]) if fused else None  # type: ignore[arg-type]
        kernel = kernels[key]
        if kernel is not None:
            m.set_parts(kernel, kernel.from_portable(m.parts, m.out_features, m.in_features))  # type: ignore[attr-defined]
            paths[kernel.layout_id] += 1
        else:
            paths[f"{m.fmt.name}:reference"] += 1
    floats = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for lin in floats:
        paths[FLOAT_NAMES.get(lin.weight.dtype, str(lin.weight.dtype))] += 1
    return ", ".join(f"{n} {path}" for path, n in paths.most_common())


FLOAT_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}
