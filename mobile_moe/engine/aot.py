"""Whole decode layers compiled ahead of time (AOTInductor) and cached on disk per machine: the first start builds them
once (tens of seconds), later starts load them in milliseconds with no tracing and no import of torch's compiler stack
(torch.compile re-traces every layer type on each start: seconds, even with its caches warm)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mobile_moe.layers.attention import AttentionInput
from mobile_moe.layers.kv_cache import LayerKV
from mobile_moe.layers.mlp import Activation
from mobile_moe.layers.moe import ExpertMode
from mobile_moe.loading.dense import AUTO_INT8_MIN_PARAMS
from mobile_moe.models.transformer import DecoderLayer

log = logging.getLogger(__name__)
PACKAGE = Path(__file__).resolve().parents[1]  # the traced code's sources are part of every key
TRACED = ("models", "layers", "experts/dispatch.py", "engine/runner.py", "engine/aot.py")
UNTRACED = ("training", "layer")  # module attributes no forward reads: the mode flag, and the layer's index (kept for naming)
LayerOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x [1, H], top-k indices [1, k], raw gate values [1, k])


AUTO_MAX_PARAMS = AUTO_INT8_MIN_PARAMS  # by default, CPU models below this (dispatch-bound: per-op overhead dominates) compile


def machine_key() -> str:
    """What a compiled package depends on besides the layer: torch's build, the CPU kernels' feature set (ATEN_CPU_CAPABILITY
    changes the generated code), the thread count (compiled into its parallel loops) and the traced sources."""
    digest = hashlib.sha256()
    for part in (torch.__version__, torch.backends.cpu.get_cpu_capability(), platform.machine(), str(torch.get_num_threads())):
        digest.update(part.encode() + b"\0")
    for name in TRACED:
        root = PACKAGE / name
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def layer_fingerprint(layer: nn.Module) -> str:
    """The layer's structure as the trace sees it: each submodule's type and plain settings, each tensor's place, shape,
    strides and dtype (the values are inputs, so every layer of a type shares one package)."""
    parts = []
    for name, module in layer.named_modules():
        settings = sorted((k, repr(v)) for k, v in vars(module).items() if k not in UNTRACED and not k.startswith("_") and _plain(v))
        parts.append(f"{name}:{type(module).__qualname__}:{settings}")
    parts += [f"{place}:{tuple(t.shape)}:{t.stride()}:{t.dtype}" for place, t in _tensors(layer)]
    return "\n".join(parts)


def _plain(value: object) -> bool:
    """Whether a module attribute is a setting that a trace bakes in (numbers, strings, enums, dataclasses and tuples of them)."""
    if isinstance(value, tuple | list):
        return all(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_plain(getattr(value, f.name)) for f in dataclasses.fields(value))
    return value is None or isinstance(value, bool | int | float | str | ExpertMode | torch.dtype)


Place = tuple[str, str, str | None, str | None]  # (submodule, attribute, dataclass field, tensor of a module in that field):
# where a layer holds a tensor


def _own(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's own parameters and buffers (not its children's)."""
    return [(attr, t) for attr, t in [*module._parameters.items(), *module._buffers.items()] if t is not None]


def _tensors(layer: nn.Module) -> list[tuple[Place, torch.Tensor]]:
    """Every tensor the layer holds, in a fixed order (the package's trailing inputs): parameters, buffers, and tensors
    inside dataclass attributes (a fused q/k/v weight, or the buffers of the fused quantized linear one holds)."""
    found: list[tuple[Place, torch.Tensor]] = []
    for name, module in layer.named_modules():
        found += [((name, attr, None, None), t) for attr, t in _own(module)]
        for attr, value in vars(module).items():
            if not dataclasses.is_dataclass(value) or isinstance(value, type):
                continue
            for f in dataclasses.fields(value):
                held = getattr(value, f.name)
                if isinstance(held, torch.Tensor):
                    found.append(((name, attr, f.name, None), held))
                elif isinstance(held, nn.Module):
                    found += [((name, attr, f.name, inner), t) for inner, t in _own(held)]
    return found


def _with_tensors(layer: nn.Module, tensors: list[tuple[Place, torch.Tensor]]) -> nn.Module:
    """A copy of the layer holding the given tensors in their places (for the export: they become its inputs)."""
    copy = copy_module(layer)
    for (name, attr, field, inner), t in tensors:
        module = copy.get_submodule(name)
        if inner is not None:  # a module held in a dataclass field (copied with the layer): its tensor in its place
            held = getattr(getattr(module, attr), field)
            (held._parameters if inner in held._parameters else held._buffers)[inner] = t
        elif field is not None:
            object.__setattr__(module, attr, dataclasses.replace(getattr(module, attr), **{field: t}))
        elif attr in module._parameters:
            module._parameters[attr] = t  # type: ignore[assignment]  # a plain tensor in a parameter's place: the copy is traced only
        else:
            module._buffers[attr] = t
    return copy


def copy_module(layer: nn.Module) -> nn.Module:
    """A structural copy of the layer sharing its tensors (they are swapped for inputs, never written)."""
    memo = {id(t): t for _, t in _tensors(layer)}
    return copy.deepcopy(layer, memo)


@dataclass(frozen=True)
class Variant:
    """One compiled call: a layer type under one choice of experts, with the pool's biases present or not."""

    fingerprint: str
    mode: ExpertMode
    little_weights: str
    little_k: int
    act: str
    rope32: bool  # float32 rotary tables beside the compute dtype's
    pool: tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype] | None, ...]  # the pool fields' shapes, strides, dtypes (None: absent)

    def key(self, machine: str) -> str:
        """The package's file name stem."""
        return hashlib.sha256(f"{machine}\n{self!r}".encode()).hexdigest()[:32]


class _Flat(nn.Module):
    """`pooled_layer` over flat tensor inputs for torch.export: the layer's tensors come in as inputs (after the pool)."""

    def __init__(self, layer: DecoderLayer, variant: Variant, act: Activation) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not registered: its tensors are inputs, not constants
        self.places = [place for place, _ in _tensors(layer)]
        self.variant, self.act, self.pools = variant, act, sum(p is not None for p in variant.pool)

    def forward(self, x, cos, sin, cos32, sin32, k, v, position, keys, slot_of, *rest):  # noqa: ANN001, ANN201
        from mobile_moe.engine.runner import pooled_layer

        pool, tensors = list(rest[: self.pools]), rest[self.pools :]
        fields = [pool.pop(0) if p is not None else None for p in self.variant.pool]
        layer = _with_tensors(self.layer, list(zip(self.places, tensors)))
        kv = LayerKV(k, v, keys.shape[0] - 1, position=position)  # keys [S]: only its length, the keys the pass reads
        var = self.variant
        inp = AttentionInput(cos, sin, None, cos32, sin32) if var.rope32 else AttentionInput(cos, sin, None)
        return pooled_layer(layer, x, inp, kv, slot_of, var.mode, var.little_weights, var.little_k, self.act, *fields)


class AotLayers:
    """The all-resident whole-layer decode call (`pooled_layer`'s signature) through AOTInductor packages: one per layer
    type and choice of experts, built on first use and cached in `directory`; a pass it does not cover (a ring or a
    fixed span of keys, recurrent state) or whose package cannot be built (no C++ compiler, an unwritable directory)
    goes to `fallback`."""

    def __init__(self, directory: Path, fallback: Callable[..., LayerOut], progress: bool = True) -> None:
        self.directory, self.fallback, self.progress = directory, fallback, progress
        self.machine = machine_key()
        self.widths = torch.empty(0)  # [S] sliced to a pass's key count (the one dynamic dimension), grown to the KV buffers
        self.calls: dict[tuple[int, ExpertMode, str, int], tuple[object, list[torch.Tensor]] | None] = {}  # (layer, choice) ->
        # (loader, weights), or None: eager
        self.loaders: dict[str, object | None] = {}  # package stem -> its loader (None: it could not be built)

    def __call__(
        self,
        layer: DecoderLayer,
        x: torch.Tensor,
        inp: AttentionInput,
        kv: LayerKV,
        slot_of: torch.Tensor,
        mode: ExpertMode,
        little_weights: str,
        little_k: int,
        act: Activation,
        *pool: torch.Tensor | None,
    ) -> LayerOut:
        """One decode layer, every expert resident: x [1, H] -> (x [1, H], top-k indices [1, k], raw gate values [1, k])."""
        if kv.ring is not None or kv.span is not None or kv.recurrent is not None or kv.position is None:
            return self.fallback(layer, x, inp, kv, slot_of, mode, little_weights, little_k, act, *pool)
        if mode is ExpertMode.BIG:
            little_weights, little_k = "native", 0  # big ignores the little settings: one package whatever they are
        key = (id(layer), mode, little_weights, little_k)
        if key not in self.calls:
            self.calls[key] = self.load(layer, mode, little_weights, little_k, act, [x, *_rotary(inp), kv.k, kv.v, slot_of, *pool])
        call = self.calls[key]
        if call is None:
            return self.fallback(layer, x, inp, kv, slot_of, mode, little_weights, little_k, act, *pool)
        loader, weights = call
        if self.widths.shape[0] < kv.k.shape[1]:
            self.widths = kv.k.new_empty(kv.k.shape[1])
        keys = self.widths[: kv.start + 1]
        out = loader.run([x, *_rotary(inp), kv.k, kv.v, kv.position, keys, slot_of, *(p for p in pool if p is not None), *weights])  # type: ignore[attr-defined]
        return out[0], out[1], out[2]

    def load(
        self, layer: DecoderLayer, mode: ExpertMode, little_weights: str, little_k: int, act: Activation, example: list
    ) -> tuple[object, list[torch.Tensor]] | None:
        """The loader of this layer's package (built and cached first if missing; `example`: this call's x, cos, sin, k, v,
        slot_of and pool fields) and the layer's weights in input order; None (with a warning) where that fails."""
        pool, rope32 = example[8:], example[3] is not example[1]
        shapes = tuple(None if p is None else (tuple(p.shape), p.stride(), p.dtype) for p in pool)
        variant = Variant(layer_fingerprint(layer), mode, little_weights, little_k, getattr(act, "__qualname__", repr(act)), rope32, shapes)
        stem = variant.key(self.machine)
        if stem not in self.loaders:
            path = self.directory / f"{stem}.pt2"
            try:
                if not path.exists():
                    self.build(path, layer, variant, act, example)
                self.loaders[stem] = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
            except Exception as e:  # noqa: BLE001 - a toolchain or file system failure of any kind: decode eagerly instead
                log.warning("could not compile the decode step into %s (%s: %s); decoding eagerly", self.directory, type(e).__name__, str(e)[:200])
                self.loaders[stem] = None  # not tried again for the other layers of this type
        loader = self.loaders[stem]
        return None if loader is None else (loader, [t for _, t in _tensors(layer)])

    def build(self, path: Path, layer: DecoderLayer, variant: Variant, act: Activation, example: list) -> None:
        """Export this layer type's decode call and compile it to a package at `path` (written whole, then renamed)."""
        if self.progress:
            print(f"mobile-moe: compiling the decode step once for this machine ... (cached in {self.directory})", file=sys.stderr, flush=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        from torch._inductor import aoti_compile_and_package  # the compiler stack, imported only to build
        from torch.export import Dim, export

        flat = _Flat(layer, variant, act)
        args = _example(layer, example)
        cap, width = Dim("cap", min=2), Dim("width", min=1)
        dynamic = (None,) * 5 + ({1: cap}, {1: cap}, None, {0: width}, None, (None,) * (len(args) - 10))  # the last: *rest
        with torch.inference_mode(False), torch.no_grad():
            program = export(flat, tuple(args), dynamic_shapes=dynamic)
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=self.directory)
        os.close(fd)
        try:
            aoti_compile_and_package(program, package_path=tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _rotary(inp: AttentionInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos, sin, cos32, sin32) [1, rot/2]: the float32 tables are the compute dtype's where they are the same."""
    cos32, sin32 = inp.tables(True)
    return inp.cos, inp.sin, cos32, sin32


def _example(layer: DecoderLayer, real: list) -> list[torch.Tensor]:
    """Export inputs like a real call's (x, cos, sin, cos32, sin32, k, v, slot_of, *pool): the pool and the weights themselves (the
    package keeps their strides: the pool fields are strided views), KV buffers of 16 positions with 4 filled (the key
    count and the buffers' length are the dynamic dimensions)."""
    x, cos, sin, cos32, sin32, k, v, slot_of, *pool = real
    with torch.inference_mode(False):
        x, cos, sin, cos32, sin32 = x.clone(), cos.clone(), sin.clone(), cos32.clone(), sin32.clone()
        k, v = k.new_zeros(k.shape[0], 16, *k.shape[2:]), v.new_zeros(v.shape[0], 16, *v.shape[2:])
        position, keys = torch.tensor([4], device=x.device), x.new_empty(5)
    return [x, cos, sin, cos32, sin32, k, v, position, keys, slot_of, *(p for p in pool if p is not None), *(t for _, t in _tensors(layer))]
