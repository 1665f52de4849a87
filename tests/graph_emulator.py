"""A CPU stand-in for CUDA graph capture with its semantics: a capture records the pass's aten ops on fixed tensors and
leaves no effect; a replay re-runs exactly those ops on those tensors (Python does not run again, host values stay as
captured). A host read inside the capture raises, as it does on CUDA."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class HostReadInCapture(RuntimeError):
    """A captured pass read a device value on the host."""


HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
              torch.Tensor.__index__, torch.Tensor.numpy}  # what waits for the device (on CPU some bypass the dispatcher)


class NoHostReads(TorchFunctionMode):
    """Raises on a tensor read by the host, which a CUDA stream being captured refuses."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in HOST_READS:
            raise HostReadInCapture(f"{func.__name__} inside a captured pass")
        return func(*args, **(kwargs or {}))


class Recorder(TorchDispatchMode):
    """Runs and records every aten op; keeps a copy of each tensor an op writes, to undo the capture's effects."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any, bool]] = []
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise HostReadInCapture(f"{func} inside a captured pass")
        schema = func._schema
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(value, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write and id(value) not in self.saved:
                self.saved[id(value)] = (value, value.clone())
        out = func(*args, **kwargs)
        if schema.is_mutable or not _aliases_an_input(out, args, kwargs):  # views follow their base; `to` may copy or not
            self.ops.append((func, args, kwargs, out, schema.is_mutable))
        return out


def _aliases_an_input(out: Any, args: tuple, kwargs: dict) -> bool:
    """Whether every tensor `out` holds shares memory with a tensor argument (a view: nothing to recompute)."""
    inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return bool(outs) and all(t.untyped_storage().data_ptr() in inputs for t in outs)


def emulated_capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """`engine.graphs.GraphCapture` on CPU: record fn's ops, undo their writes; the replay re-runs them in order."""
    recorder = Recorder()
    try:
        with NoHostReads(), recorder:
            out = fn()
    finally:  # a failed capture leaves no effect either
        for tensor, before in recorder.saved.values():
            tensor.copy_(before)

    def replay() -> None:
        for func, args, kwargs, recorded, mutable in recorder.ops:
            result = func(*args, **kwargs)
            if not mutable:  # fresh outputs: refresh the tensors later ops (and the caller) hold
                for old, new in zip(tree_flatten(recorded)[0], tree_flatten(result)[0]):
                    if isinstance(old, torch.Tensor):
                        old.copy_(new)

    return replay, out
