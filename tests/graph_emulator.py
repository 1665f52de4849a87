"""A CPU stand-in for CUDA graph capture with its semantics: a capture records the pass's aten ops on fixed tensors and
leaves no effect (what the pass creates holds garbage until the first replay: CUDA only records); a replay re-runs
exactly those ops into the same tensors (Python does not run again, host values stay as captured). What a CUDA stream
being captured refuses raises here too, naming the op: a host read of a device value, a tensor made from host data (a
pageable host-to-device copy), and ops that sync to size their output from device values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten


class CaptureRefused(RuntimeError):
    """A captured pass did what a CUDA stream being captured refuses."""


class HostReadInCapture(CaptureRefused):
    """A captured pass read a device value on the host."""


class HostDataInCapture(CaptureRefused):
    """A captured pass made a device tensor from host data (a pageable host-to-device copy)."""


class SyncInCapture(CaptureRefused):
    """A captured pass ran an op that syncs with the host (its output's shape depends on device values, or it reads one)."""


HOST_READS = {
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__complex__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.__array__,
    torch.Tensor.cpu,
}  # what waits for the device (on CPU some bypass the dispatcher)
HOST_DATA = {torch.Tensor.new_tensor}  # always a copy of host values (torch.from_numpy bypasses modes: see _refuse)
MAYBE_HOST_DATA = {torch.tensor, torch.as_tensor, torch.asarray}  # host data unless handed a tensor
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}  # a list or array index is a host tensor copied over
SYNCING_OPS = {  # aten ops (by name: under inference mode composite ones arrive whole) that size their output from
    # device values or hand one to the host: CUDA syncs, a capture refuses
    "nonzero",
    "nonzero_numpy",
    "argwhere",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "bincount",  # CUDA sizes the bins from max().item(), whatever the minlength
    "multinomial",  # syncs inside on some torch versions
    "equal",
    "allclose",
    "is_nonzero",
}
HOST_READ_OPS = {"_local_scalar_dense", "item"}
BOOL_INDEXED = {"index", "index_put_", "index_put", "_index_put_impl_"}  # a mask index calls nonzero


class CaptureRules(TorchFunctionMode):
    """Raises on what a CUDA stream being captured refuses at the Python level: host reads and host data."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in HOST_READS or (func is torch.Tensor.to and _to_host(args, kwargs)):
            raise HostReadInCapture(f"Tensor.{func.__name__} inside a captured pass")
        if func in HOST_DATA or (func in MAYBE_HOST_DATA and not isinstance(args[0] if args else kwargs.get("data", kwargs.get("obj")), torch.Tensor)):
            raise HostDataInCapture(f"{func.__name__} of host data inside a captured pass")
        if func in INDEXING and _host_index(args[1]):
            raise HostDataInCapture(f"Tensor.{func.__name__} with a list or array index inside a captured pass")
        return func(*args, **kwargs)


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether a `Tensor.to` call names the CPU (inside a capture every tensor stands for a device tensor)."""
    device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return device is not None and torch.device(device).type == "cpu"


def _host_index(index: Any) -> bool:
    """Whether an index holds a list or array (made into a host tensor, then copied to the device)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (list, np.ndarray)) for p in parts)


def _refuse(func: Any, args: tuple, kwargs: dict) -> None:
    """Raise when the aten op `func` syncs with the host under CUDA."""
    name = func.overloadpacket.__name__
    if name in HOST_READ_OPS:
        raise HostReadInCapture(f"{func} inside a captured pass")
    if name == "lift_fresh" and args[0].dim() > 0:  # host data made a tensor (torch.from_numpy, a list); a 0-dim one is a
        raise HostDataInCapture(f"{func} of host data inside a captured pass")  # Python scalar, which CUDA indexing fills in place
    if name in SYNCING_OPS or func is aten.where.default:  # where(condition) is nonzero
        raise SyncInCapture(f"{func} inside a captured pass")
    if name == "repeat_interleave" and _tensor_repeats(func, args, kwargs):
        raise SyncInCapture(f"{func} with tensor repeats and no output_size inside a captured pass")
    if name in BOOL_INDEXED:
        index = args[1] if len(args) > 1 else kwargs.get("indices")
        if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in index or ()):
            raise SyncInCapture(f"{func} with a boolean mask inside a captured pass")


def _tensor_repeats(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a repeat_interleave call takes its repeats from a tensor without the output size (which CUDA then reads)."""
    bound = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
    return isinstance(bound.get("repeats"), torch.Tensor) and bound.get("output_size") is None


@dataclass
class RecordedOp:
    """One recorded aten op; `outs` are the tensors it created during the capture, which each replay writes in place."""

    func: Any
    args: tuple
    kwargs: dict
    outs: list[torch.Tensor]  # empty for an op that writes into its arguments
    into: tuple[Any, list[str]] | None = None  # the op's `out=` overload and its out arguments' names, when it has one

    def replay(self) -> None:
        """Re-run the op on the captured tensors; its outputs land in the captured ones (same storage, shape and dtype)."""
        if not self.outs:
            self.func(*self.args, **self.kwargs)
            return
        where = [(t.data_ptr(), t.shape, t.dtype) for t in self.outs]
        if self.into is not None:  # the kernel writes straight into the captured tensors
            into, names = self.into
            into(*self.args, **self.kwargs, **dict(zip(names, self.outs)))
        else:
            fresh = [t for t in tree_flatten(self.func(*self.args, **self.kwargs))[0] if isinstance(t, torch.Tensor)]
            if [(t.shape, t.dtype) for t in fresh] != [w[1:] for w in where]:
                raise RuntimeError(f"replay of {self.func} changed its outputs' shapes: a captured graph's are fixed")
            for old, new in zip(self.outs, fresh):
                old.copy_(new)
        if [(t.data_ptr(), t.shape, t.dtype) for t in self.outs] != where:
            raise RuntimeError(f"replay of {self.func} moved its outputs: a captured graph's addresses are fixed")


class Recorder(TorchDispatchMode):
    """Runs and records every aten op (the pass's Python needs values' shapes); keeps a copy of each tensor an op writes,
    to undo the capture's effects, and refuses ops that sync."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[RecordedOp] = []
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.created: list[torch.Tensor] = []  # what the capture's ops made (not views of their arguments)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        _refuse(func, args, kwargs)
        schema = func._schema
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(value, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write and id(value) not in self.saved:
                self.saved[id(value)] = (value, value.clone())
        out = func(*args, **kwargs)
        if schema.is_mutable:
            self.ops.append(RecordedOp(func, args, kwargs, []))
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        created = [t for t in outs if t.untyped_storage().data_ptr() not in inputs]
        if created:  # views follow their base, nothing to recompute; `to` may copy or not
            self.ops.append(RecordedOp(func, args, kwargs, outs, _out_overload(func, len(outs))))
            self.created += created
        return out

    def spoil(self) -> None:
        """Fill what the capture created with garbage: CUDA records kernels without running them."""
        for t in self.created:
            t.fill_(garbage(t.dtype))


def garbage(dtype: torch.dtype) -> float | int | bool:
    """A value no real computation is likely to leave: NaN for floats, the largest value for integers, True for bools."""
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    return True if dtype == torch.bool else torch.iinfo(dtype).max


def _out_overload(func: Any, outputs: int) -> tuple[Any, list[str]] | None:
    """The `out=` overload of an aten op with the same other arguments and one out tensor per output, with the names of
    its out arguments, or None."""
    packet, name = func.overloadpacket, func._overloadname
    try:
        into = getattr(packet, "out" if name == "default" else f"{name}_out")
    except AttributeError:
        return None
    plain = [(a.name, str(a.type)) for a in func._schema.arguments]
    if [(a.name, str(a.type)) for a in into._schema.arguments if not a.is_out] != plain:
        return None
    names = [a.name for a in into._schema.arguments if a.is_out]
    return (into, names) if len(names) == outputs else None


def emulated_capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """`engine.graphs.GraphCapture` on CPU: record fn's ops, undo their writes and spoil what they made; the replay
    re-runs them in order into the same tensors."""
    recorder = Recorder()
    try:
        with CaptureRules(), recorder:
            out = fn()
    finally:  # a failed capture leaves no effect either
        for tensor, before in recorder.saved.values():
            tensor.copy_(before)
    recorder.spoil()

    def replay() -> None:
        for op in recorder.ops:
            op.replay()

    return replay, out
