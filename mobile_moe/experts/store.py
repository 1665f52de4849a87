"""Host-memory store of routed experts: one contiguous packed buffer per expert, so one copy moves it; and the staging store
that builds hold a layer or two in on their way to disk."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING, Literal

import torch
from tqdm import tqdm

from mobile_moe.experts.formats import ExpertFormat, Field, FloatFormat
from mobile_moe.experts.host_memory import HostBuffer, Pinner, allocate_host, cuda_pinner

if TYPE_CHECKING:
    from mobile_moe.experts.kernels import FusedFormat

Part = Literal["gate", "up", "down"]
Matrix = Literal["gate_up", "down"]
PARTS: tuple[Part, ...] = ("gate", "up", "down")
MATRICES: tuple[Matrix, ...] = ("gate_up", "down")
MATRIX_PARTS: dict[Matrix, tuple[Part, ...]] = {"gate_up": ("gate", "up"), "down": ("down",)}
FIELD_ALIGN = 16  # bytes: every packed field and every expert buffer starts on this boundary
FUSED_CHUNK = 8  # experts quantized at once from a fused [E, ...] tensor: bounds the transient float copies


@dataclass(frozen=True)
class ExpertShape:
    """Shape of one SwiGLU expert: gate_up [2I, H] (gate rows first) and down [H, I], optionally with biases [2I] and [H]."""

    hidden: int
    intermediate: int
    bias: bool = False  # gpt-oss: each matrix has a bias, packed as its last field

    @property
    def numel(self) -> int:
        """Weights in one expert."""
        return 3 * self.hidden * self.intermediate

    def matrix_shape(self, matrix: Matrix) -> tuple[int, int]:
        """[out, in] of a stacked matrix."""
        return (2 * self.intermediate, self.hidden) if matrix == "gate_up" else (self.hidden, self.intermediate)

    def part_shape(self, part: Part) -> tuple[int, int]:
        """Weight shape of one projection as checkpoints store it ([out, in])."""
        return (self.hidden, self.intermediate) if part == "down" else (self.intermediate, self.hidden)

    def part_rows(self, part: Part) -> tuple[Matrix, slice]:
        """Which matrix a projection belongs to and its rows there."""
        i = self.intermediate
        return ("down", slice(0, self.hidden)) if part == "down" else ("gate_up", slice(0, i) if part == "gate" else slice(i, 2 * i))


def _align(n: int) -> int:
    return (n + FIELD_ALIGN - 1) // FIELD_ALIGN * FIELD_ALIGN


class ExpertLayout:
    """Where each packed field of an expert lives inside its byte buffer: gate_up's fields, then down's."""

    def __init__(self, shape: ExpertShape, fmt: ExpertFormat, nbytes: int | None = None) -> None:
        """`nbytes`: pad each expert's buffer to this size (a kernel layout taking the place of a larger portable one)."""
        self.shape, self.format = shape, fmt
        self.fields: dict[Matrix, list[tuple[Field, int]]] = {}
        offset = 0
        for matrix in MATRICES:
            out, inp = shape.matrix_shape(matrix)
            fmt.check(out, inp, matrix)
            placed = []
            for field in fmt.fields(out, inp) + ([Field("bias", fmt.bias_dtype, (out,))] if shape.bias else []):
                placed.append((field, offset))
                offset = _align(offset + field.nbytes)
            self.fields[matrix] = placed
        if nbytes is not None and offset > nbytes:
            raise ValueError(f"{fmt} experts need {offset} bytes, more than the {nbytes} they must fit in")
        self.nbytes = offset if nbytes is None else nbytes

    def views(self, block: torch.Tensor) -> dict[Matrix, list[torch.Tensor]]:
        """block: uint8 [N, nbytes] -> per matrix, each field as a typed view [N, *field.shape]."""
        n = block.shape[0]
        return {matrix: [block[:, off : off + f.nbytes].view(f.dtype).view(n, *f.shape) for f, off in placed] for matrix, placed in self.fields.items()}


class ExpertSizes:
    """Sizes every expert store reports, from its `layout`, `num_experts` and `layers`."""

    layout: ExpertLayout
    num_experts: int
    layers: dict

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's packed buffer: what one copy or read moves, and what compute reads."""
        return self.layout.nbytes

    @property
    def total_experts(self) -> int:
        """Number of routed experts across all MoE layers."""
        return self.num_experts * len(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes of all packed experts."""
        return self.expert_bytes * self.total_experts


def pins_host_store(device: torch.device, building_on_disk: bool) -> bool:
    """Whether a host store is page-locked: when its experts are copied to a CUDA device, not when it only stages records on
    their way to a disk store (locked pages cannot be released layer by layer: the whole store would stay in RAM)."""
    return device.type == "cuda" and not building_on_disk


class ExpertPacker(ExpertSizes):
    """Packs checkpoint tensors into per-layer expert buffers and records which pieces have been written; subclasses say
    where a layer's buffers live (`layer_fields`)."""

    def _describe(self, num_experts: int, shape: ExpertShape, fmt: ExpertFormat | torch.dtype, nbytes: int | None = None) -> None:
        """Format, shape and layout of the experts (each buffer padded to `nbytes` when given); nothing written yet."""
        self.format = FloatFormat(fmt) if isinstance(fmt, torch.dtype) else fmt
        self.shape, self.num_experts = shape, num_experts
        self.layout = ExpertLayout(shape, self.format, nbytes)
        self.filled: set[tuple[int, int, Part, str]] = set()
        self.filled_count: dict[int, int] = {}  # layer -> pieces of `filled` in it

    @property
    def layer_bytes(self) -> int:
        """Bytes of one MoE layer's packed experts."""
        return self.num_experts * self.expert_bytes

    def layer_block(self, layer: int) -> torch.Tensor:
        """uint8 [E, expert_bytes]: a layer's packed experts."""
        raise NotImplementedError

    def layer_fields(self, layer: int) -> dict[Matrix, list[torch.Tensor]]:
        """Per matrix, each packed field of a layer's experts as a typed view [E, *field.shape]."""
        raise NotImplementedError

    def put(self, layer: int, expert: int, part: Part, weight: torch.Tensor) -> None:
        """Pack one projection ([I, H] for gate/up, [H, I] for down) into the expert's buffer."""
        matrix, rows = self.shape.part_rows(part)
        want = (rows.stop - rows.start, self.shape.matrix_shape(matrix)[1])
        if tuple(weight.shape) != want:
            raise ValueError(f"layer {layer} expert {expert} {part}: shape {tuple(weight.shape)}, expected {want}")
        for view, packed in zip(self.layer_fields(layer)[matrix], self.format.quantize(weight)):
            view[expert, rows].copy_(packed)
        self._mark(layer, range(expert, expert + 1), matrix, parts=(part,))

    def put_fused(self, layer: int, matrix: Matrix, weight: torch.Tensor) -> None:
        """Pack a fused 3-D tensor of all experts: gate_up [E, 2I, H] (gate rows first) or down [E, H, I]."""
        want = (self.num_experts, *self.shape.matrix_shape(matrix))
        if tuple(weight.shape) != want:
            raise ValueError(f"layer {layer} fused {matrix}: shape {tuple(weight.shape)}, expected {want}")
        for start in range(0, self.num_experts, FUSED_CHUNK):
            chunk = slice(start, min(start + FUSED_CHUNK, self.num_experts))
            for view, packed in zip(self.layer_fields(layer)[matrix], self.format.quantize(weight[chunk])):
                view[chunk].copy_(packed)
        self._mark(layer, range(self.num_experts), matrix)

    def put_packed(self, layer: int, matrix: Matrix, field_name: str, packed: torch.Tensor) -> None:
        """Copy one already-packed field of all experts ([E, *field.shape], as `mobile-moe quantize` writes it)."""
        placed = {f.name: (f, i) for i, (f, _) in enumerate(self.layout.fields[matrix])}
        if field_name not in placed:
            raise ValueError(f"{self.format} experts have no field {field_name!r} (fields: {', '.join(placed)})")
        field, index = placed[field_name]
        want = (self.num_experts, *field.shape)
        if tuple(packed.shape) != want or packed.dtype != field.dtype:
            raise ValueError(f"layer {layer} {matrix}.{field_name}: {packed.dtype} {tuple(packed.shape)}, expected {field.dtype} {want}")
        self.layer_fields(layer)[matrix][index].copy_(packed)
        self._mark(layer, range(self.num_experts), matrix, fields=(field_name,))

    def mark_filled(self, layer: int, matrix: Matrix) -> None:
        """Declare every expert's `matrix` of a layer written (callers that fill the field views directly)."""
        self._mark(layer, range(self.num_experts), matrix)

    def _mark(self, layer: int, experts: range, matrix: Matrix, parts: tuple[Part, ...] | None = None, fields: tuple[str, ...] | None = None) -> None:
        """Record which (expert, projection, field) pieces have been written."""
        parts = parts or MATRIX_PARTS[matrix]
        fields = fields or tuple(f.name for f, _ in self.layout.fields[matrix] if f.name != "bias")  # biases come as their own tensors
        before = len(self.filled)
        self.filled.update(product((layer,), experts, parts, fields))
        self.filled_count[layer] = self.filled_count.get(layer, 0) + len(self.filled) - before

    def converted(self, buffer: torch.Tensor, fmt: FusedFormat, layout: ExpertLayout) -> torch.Tensor:
        """One expert's portable buffer uint8 [expert_bytes] -> the same expert in `layout` (a kernel's), as a new buffer."""
        old = self.layout.views(buffer[None])
        out = torch.zeros(1, self.expert_bytes, dtype=torch.uint8)
        new = layout.views(out)
        for matrix in MATRICES:
            parts = [view[0] for view in old[matrix]]
            weights, bias = (parts[:-1], parts[-1:]) if self.shape.bias else (parts, [])
            converted = fmt.from_portable(weights, *self.shape.matrix_shape(matrix)) + bias
            for view, value in zip(new[matrix], converted):
                view[0].copy_(value)
        return out[0]

    def layer_complete(self, layer: int) -> bool:
        """Whether every piece of every expert of a layer has been filled."""
        want = self.num_experts * sum(len(self.layout.fields[self.shape.part_rows(part)[0]]) for part in PARTS)  # what `missing` checks
        return self.filled_count.get(layer, 0) >= want

    def missing(self) -> list[str]:
        """Names of expert pieces never filled (the field is named only when a format has several)."""
        names = []
        for layer, e, part in product(self.layers, range(self.num_experts), PARTS):
            fields = [f.name for f, _ in self.layout.fields[self.shape.part_rows(part)[0]]]
            names += [
                f"layer {layer} expert {e} {part}" + ("" if len(fields) == 1 else f" {field}") for field in fields if (layer, e, part, field) not in self.filled
            ]
        return names


class ExpertStore(ExpertPacker):
    """Routed experts of every MoE layer in one exact-size host allocation (page-locked when the device is CUDA)."""

    def __init__(
        self, moe_layers: list[int], num_experts: int, shape: ExpertShape, fmt: ExpertFormat | torch.dtype, pin: bool, pinner: Pinner = cuda_pinner
    ) -> None:
        self._describe(num_experts, shape, fmt)
        layer_bytes = self.layer_bytes
        self.host = allocate_host(layer_bytes * len(moe_layers), pin, pinner)
        self.layers: dict[int, torch.Tensor] = {
            layer: self.host.data[i * layer_bytes : (i + 1) * layer_bytes].view(num_experts, self.expert_bytes) for i, layer in enumerate(moe_layers)
        }  # layer -> uint8 [E, expert_bytes], views of one allocation
        self.fields = {layer: self.layout.views(block) for layer, block in self.layers.items()}

    def layer_block(self, layer: int) -> torch.Tensor:
        """uint8 [E, expert_bytes]: a layer's packed experts."""
        return self.layers[layer]

    def layer_fields(self, layer: int) -> dict[Matrix, list[torch.Tensor]]:
        """Per matrix, each packed field of a layer's experts as a typed view [E, *field.shape]."""
        return self.fields[layer]

    @property
    def pinned_bytes(self) -> int:
        """Bytes of host memory page-locked for the experts (0 when pageable)."""
        return self.host.pinned_bytes

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        """The packed uint8 [expert_bytes] host buffer of one expert."""
        return self.layers[layer][expert]

    def repack(self, fmt: FusedFormat, progress: bool = False) -> None:
        """Rewrite every expert in place into a kernel's layout of the same buffer size, one expert at a time (once, at load)."""
        layout = ExpertLayout(self.shape, fmt, nbytes=self.expert_bytes)
        bar = tqdm(total=self.total_experts, desc=f"repacking experts for {fmt.kernel}", unit="expert", disable=(not progress) or None, leave=False)
        for block in self.layers.values():
            for expert in range(self.num_experts):
                block[expert].copy_(self.converted(block[expert], fmt, layout))
                bar.update()
        bar.close()
        self.format, self.layout = fmt, layout
        self.fields = {layer: layout.views(block) for layer, block in self.layers.items()}


class StagingStore(ExpertPacker):
    """Experts on their way to a disk store or a packed checkpoint: a layer's buffer is allocated (pageable) when the layer is
    first written and freed once it is released, after its write; a build holds the layers being filled, never the model."""

    def __init__(self, moe_layers: list[int], num_experts: int, shape: ExpertShape, fmt: ExpertFormat | torch.dtype, nbytes: int | None = None) -> None:
        """`nbytes`: pad each expert to this size (a kernel's layout filled directly, in the size of the portable one it replaces)."""
        self._describe(num_experts, shape, fmt, nbytes)
        self.layers: dict[int, int] = {layer: row for row, layer in enumerate(moe_layers)}  # MoE layer -> its row, as in a DiskStore
        self.staged: dict[int, tuple[HostBuffer, dict[Matrix, list[torch.Tensor]]]] = {}  # layer -> its buffer and field views
        self.released: set[int] = set()
        self.most_staged = 0  # layers held at once, at most

    def layer_block(self, layer: int) -> torch.Tensor:
        """uint8 [E, expert_bytes]: a layer's packed experts, allocated (zeroed) on first use; a released layer cannot come back."""
        if layer in self.released:
            raise ValueError(f"layer {layer}'s experts were already written out")
        if layer not in self.staged:
            host = allocate_host(self.layer_bytes, pin=False)
            host.data.zero_()  # the bytes between fields: a rebuild writes the same records
            block = host.data.view(self.num_experts, self.expert_bytes)
            self.staged[layer] = (host, self.layout.views(block))
            self.most_staged = max(self.most_staged, len(self.staged))
        return self.staged[layer][0].data.view(self.num_experts, self.expert_bytes)

    def layer_fields(self, layer: int) -> dict[Matrix, list[torch.Tensor]]:
        """Per matrix, each packed field of a layer's experts as a typed view [E, *field.shape]."""
        self.layer_block(layer)
        return self.staged[layer][1]

    def release_layer(self, layer: int) -> None:
        """Free a written layer's buffer (its memory goes back to the allocator, and a large one to the OS)."""
        self.staged.pop(layer, None)
        self.released.add(layer)

    @property
    def staged_bytes(self) -> int:
        """Bytes of the layers held now."""
        return len(self.staged) * self.layer_bytes
