"""Cost-model inputs measured from a model: dense bytes per decoder layer and kernel launches of one decode pass.

A launch is an aten op dispatched during the pass that runs a kernel: views, metadata ops, allocations and `item` are
not counted (on CUDA a `tolist` shows up as one device->host copy); expert loads (host->device copies) are subtracted. Op counts are taken at the
dispatcher, above the backend, so a count on CPU matches CUDA except where the engine itself picks another path
(e.g. grouped matmuls over all experts on CUDA instead of a per-expert loop): count on the device you predict for.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from mobile_moe.bench.costmodel import ModelCost
from mobile_moe.engine.llm import LLM
from mobile_moe.engine.passes import BIG
from mobile_moe.experts.store import ExpertLayout
from mobile_moe.layers.moe import MoEBlock
from mobile_moe.layers.sampler import sample
from mobile_moe.models.transformer import CausalLM

NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


def launches_kernel(func: torch._ops.OpOverload, args: tuple, out: object) -> bool:
    """Whether a dispatched op ran a kernel: views and allocations do not; a cast (`aten.to`, tagged a view because it
    may alias) does when it returned a new tensor."""
    if func.overloadpacket.__name__ == "to":
        return out is not args[0]
    tags = func.tags
    return not (func.is_view or torch.Tag.inplace_view in tags or torch.Tag.data_dependent_output in tags or func.overloadpacket.__name__ in NO_KERNEL)


@dataclass(frozen=True)
class OpCounts:
    """Kernel launches of one batch-1 decode pass."""

    per_layer: float  # a decoder layer's dense part (norms, attention, router, shared experts), mean over layers
    per_moe_layer: float  # one MoE layer's routed-expert computation, fixed part (routing weights included)
    per_expert: float  # added per expert the layer uses
    per_pass: float  # outside the decoder layers: positions, rotary, embedding, final norm, LM head, greedy sampling


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched ops that launch a kernel, into the region (`pass`, `layer`, `experts`) set by module hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.region = "pass"
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        if launches_kernel(func, args, out):
            self.counts[self.region] += 1
        return out

    def mark(self, module: nn.Module, region: str, before: bool) -> RemovableHandle:
        """Switch to `region` when `module` starts (before) or ends its forward."""
        hook = lambda *_: setattr(self, "region", region)  # noqa: E731
        return module.register_forward_pre_hook(hook) if before else module.register_forward_hook(hook)


def swiglu_expert_launches(hidden: int = 64, intermediate: int = 32) -> int:
    """Kernel launches of one eager SwiGLU expert at batch 1, as timed in the H200 calibration (down(silu(gate x) * up x))."""
    gate, up, down = nn.Linear(hidden, intermediate, bias=False), nn.Linear(hidden, intermediate, bias=False), nn.Linear(intermediate, hidden, bias=False)
    x = torch.randn(1, hidden)
    with torch.inference_mode(), LaunchCounter() as counter:
        down(nn.functional.silu(gate(x)) * up(x))
    return counter.counts["pass"]


def count_decode_ops(llm: LLM, prompt: Sequence[int] = (1, 2, 3)) -> OpCounts:
    """Launches of one big eager decode pass of `llm` (the cost model predicts eager devices; compiled CPU segments are
    set aside while counting), by region; the per-expert part from expert calls with k and k/2 experts."""
    info, layers, moe = llm.info, len(llm.loaded.model.model.layers), len(llm.info.moe_layers)
    with _eager(llm):
        counts = _count_pass(llm, prompt)
        half = math.ceil(info.top_k / 2)
        per_expert = 0.0
        if moe and info.top_k > half:
            per_expert = (_count_expert_call(llm, info.top_k) - _count_expert_call(llm, half)) / (info.top_k - half)
    per_moe_layer = counts["experts"] / moe - per_expert * info.top_k if moe else 0.0
    return OpCounts(counts["layer"] / layers, per_moe_layer, per_expert, counts["pass"])


@contextmanager
def _eager(llm: LLM) -> Iterator[None]:
    """Run `llm`'s passes eagerly for a while: its compiled segments, whole-layer calls and expert call set aside."""
    runner = llm.runner
    saved = runner.compiled, runner.executor.pooled, runner.resident_layer
    runner.compiled = runner.executor.pooled = runner.resident_layer = None  # no resident_layer: no whole-layer step
    try:
        yield
    finally:
        runner.compiled, runner.executor.pooled, runner.resident_layer = saved


def _count_pass(llm: LLM, prompt: Sequence[int]) -> Counter[str]:
    """Launch counts by region of one big decode pass whose experts are already resident (no lookahead, no trace)."""
    runner, cache = llm.runner, llm.cache
    saved = cache.trace
    cache.trace = None
    counter = LaunchCounter()
    handles = [h for layer in llm.loaded.model.model.layers for h in _marks(counter, layer)]
    try:
        kv = runner.new_kv(len(prompt) + 1)
        runner.forward(runner.ids(list(prompt)), kv, BIG)
        token, before = runner.ids([prompt[-1]]), kv.snapshot()
        runner.forward(token, kv, BIG)  # warm-up: this step's experts become resident
        kv.restore(before)
        counter.counts.clear()
        copies = cache.transfer.copies
        with counter:
            sample(runner.forward(token, kv, BIG), 0.0, 1.0, None)
        counter.counts["experts"] -= cache.transfer.copies - copies  # a load that still missed is a copy, not compute
    finally:
        cache.trace = saved
        for h in handles:
            h.remove()
    return counter.counts


def _count_expert_call(llm: LLM, n: int) -> int:
    """Launches of one routed-expert call of the first MoE layer on one token with `n` (resident) experts."""
    runner, cache, model = llm.runner, llm.cache, llm.loaded.model
    x = torch.randn(1, llm.info.hidden, device=llm.device, dtype=model.dtype)
    indices = torch.arange(n, device=llm.device)[None]
    weights = torch.full((1, n), 1.0 / n, device=llm.device)
    saved, cache.trace = cache.trace, None
    try:
        with torch.inference_mode():
            runner.executor.run(llm.info.moe_layers[0], x, indices, weights)  # warm-up: the experts become resident
            copies = cache.transfer.copies
            with LaunchCounter() as counter:
                runner.executor.run(llm.info.moe_layers[0], x, indices, weights)
    finally:
        cache.trace = saved
    return counter.counts["pass"] - (cache.transfer.copies - copies)


def _marks(counter: LaunchCounter, layer: nn.Module) -> list[RemovableHandle]:
    """Hooks that attribute a decoder layer's launches: dense part -> layer, routed experts -> experts."""
    handles = [counter.mark(layer, "layer", before=True), counter.mark(layer, "pass", before=False)]
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, MoEBlock):
        handles += [counter.mark(mlp.routed_experts, "experts", before=True), counter.mark(mlp.routed_experts, "layer", before=False)]
    return handles


def dequant_traffic(layout: ExpertLayout, dtype: torch.dtype) -> int:
    """Device memory traffic of dequantizing one packed expert: its float weights written once and read back by the matmuls."""
    return 0 if layout.format.reads_in_place(dtype) else 2 * layout.shape.numel * dtype.itemsize


def model_cost(model: CausalLM, expert_bytes: int, ops: OpCounts | None = None, bytes_per_param: int | None = None, dequant_bytes: int = 0) -> ModelCost:
    """ModelCost of a built model (a meta model too, given bytes_per_param); launch counts from `ops` when given."""

    def size(tensors: list[torch.Tensor]) -> int:
        return sum(t.numel() * (bytes_per_param or t.element_size()) for t in tensors)

    def weights(m: nn.Module) -> list[torch.Tensor]:
        return list(m.parameters()) + list(m.buffers())

    embed = model.model.embed_tokens.weight
    cost = ModelCost(
        num_layers=len(model.model.layers),
        dense_bytes=size(weights(model)),
        expert_bytes=expert_bytes,
        dequant_bytes=dequant_bytes,
        embedding_bytes=0 if embed is getattr(model.lm_head, "weight", None) else size([embed]),
        layer_bytes=tuple(size(weights(layer)) for layer in model.model.layers),
    )
    return cost if ops is None else with_counts(cost, ops)


def with_counts(cost: ModelCost, ops: OpCounts) -> ModelCost:
    """`cost` with launch counts from `ops` (counts do not depend on widths: a shrunk model's apply at full size)."""
    return replace(
        cost, launches_per_layer=ops.per_layer, launches_per_moe_layer=ops.per_moe_layer, launches_per_expert=ops.per_expert, launches_per_pass=ops.per_pass
    )
