"""Runs forward passes of the model with a chosen expert mode, recording routing for fallback prefetch."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from mobile_moe.engine.graphs import GRAPH_SPAN_BUCKET, DecodeGraphs, GraphCapture
from mobile_moe.engine.passes import PassSpec
from mobile_moe.experts.cache import ExpertCache
from mobile_moe.experts.dispatch import pool_experts
from mobile_moe.experts.executor import ExpertExecutor
from mobile_moe.experts.reader import Priority
from mobile_moe.layers.attention import AttentionInput
from mobile_moe.layers.kv_cache import BatchKV, KVCache, KVPool, LayerKV
from mobile_moe.layers.mlp import Activation, activation
from mobile_moe.layers.moe import ExpertMode, LayerExperts, MoEBlock, RouterSpec, Routing, half_of, select
from mobile_moe.loading.budget import PREFILL_CHUNK
from mobile_moe.models.transformer import CausalLM, DecoderLayer, LayerStep, Segment, before_experts
from mobile_moe.policy.little import prefer_resident, runs_big_here

KV_BLOCK = 128  # a held KV cache grows in steps of this many positions, so that requests of similar lengths share it


class BoundLayer:
    """The general `LayerExperts`: one layer's calls forwarded to the runner (host-planned loads, knobs, lookahead)."""

    def __init__(self, runner: Runner, layer: int) -> None:
        self.runner, self.layer = weakref.proxy(runner), layer  # no cycle: a dropped runner (and its slot pool) is freed at once

    def choose(self, routing: Routing, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """See `Runner.choose`."""
        return self.runner.choose(self.layer, routing, spec)

    def run(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """See `Runner.run_experts`."""
        return self.runner.run_experts(self.layer, x, indices, weights)

    def note(self, x: torch.Tensor, routing: Routing) -> None:
        """See `Runner.note_routing`."""
        self.runner.note_routing(self.layer, x, routing)


@dataclass(frozen=True)
class RunnerOptions:
    """How a runner's passes run, chosen when it is built; each default is what the device calls for."""

    graph_capture: GraphCapture | None = None  # records resident decode passes for replay (`--cuda-graphs`; None: eager)
    span_bucket: int | None = None  # decode passes read a multiple of this many keys (None: GRAPH_SPAN_BUCKET with graphs, else exact)
    kv_slack: int = PREFILL_CHUNK  # a sliding-window ring holds this many positions past the window: the longest write (a prompt
    # chunk) or rewind (a fallback, --kv-repair) must fit, so that no key a query still sees is overwritten
    device_indexed: bool | None = None  # resident slots read on the device by tensor indexing (None: off the CPU, or with graphs)
    grouped: bool | None = None  # grouped matmuls over the slot pool (None: where a one-time probe shows they run, on CUDA)

    def without_graphs(self) -> RunnerOptions:
        """The same passes decoded eagerly: the key spans and on-device slot indexing that graphs need are kept, so an eager
        pass computes exactly what its replay would (bench compares them bit for bit)."""
        if self.graph_capture is None:
            return self
        device_indexed = True if self.device_indexed is None else self.device_indexed
        return replace(self, graph_capture=None, span_bucket=self.span_bucket or GRAPH_SPAN_BUCKET, device_indexed=device_indexed)


class Runner:
    """Binds model, expert cache and executor; implements the ExpertRunner protocol MoE blocks call."""

    def __init__(self, model: CausalLM, cache: ExpertCache, compile_layers: bool = False, options: RunnerOptions | None = None) -> None:
        options = options or RunnerOptions()
        graphs = DecodeGraphs(options.graph_capture) if options.graph_capture is not None else None
        device_indexed = options.device_indexed if options.device_indexed is not None else (graphs is not None or cache.device.type != "cpu")
        self.model = model
        self.cache = cache
        dtype = model.lm_head.weight.dtype
        self.executor = ExpertExecutor(
            cache, activation(model.info.hidden_act), dtype, grouped=options.grouped, compiled=compile_layers, device_indexed=device_indexed
        )
        self.spec = PassSpec(little_k=self.default_little_k)  # the pass being run, or the last one (set by `forward`, `forward_rows`)
        moe = list(model.info.moe_layers)
        self.next_moe_layer = dict(zip(moe, moe[1:]))
        self.moe_row = {layer: row for row, layer in enumerate(moe)}
        device, k = model.lm_head.weight.device, model.info.top_k
        self.routing_buf = torch.zeros(len(moe), k, dtype=torch.int64, device=device)  # [L, k] the last token's top-k per MoE layer
        self.weight_buf = torch.zeros(len(moe), k, dtype=torch.float32, device=device)  # [L, k] its raw gate values
        self.position_log: list[torch.Tensor] | None = None  # a pass logging every position: each MoE layer's raw gate values [T, k]
        self.row_groups: list[RowGroup] | None = None  # a batched pass whose rows differ in their experts: the little rows' groups
        self.row_routing: dict[int, Routing] = {}  # a recording batched pass: MoE layer -> every row's routing [B, k]
        self.resident_pass = False  # whether this pass takes the all-resident decode path (`resident_decode`)
        self.batch_rows = False  # whether the current pass is a batched decode pass (`forward_rows`)
        self.bound = [BoundLayer(self, layer) for layer in range(len(model.model.layers))]
        # decode passes read a fixed span of keys, rounded up to this many (None: the exact length); one capture per bucket of spans
        self.span_bucket = options.span_bucket if options.span_bucket is not None else (GRAPH_SPAN_BUCKET if graphs is not None else None)
        self.kv_slack = options.kv_slack
        self.compiled: Segment | None = compiled_segment() if compile_layers else None
        # compiled, experts read in place from a float pool: an offloaded MoE layer is two compiled calls around the host's
        # one read of its choice (`offloaded_step`); with every expert resident, one call (`resident_step`)
        pooled = self.executor.pooled is not None
        self.routed_segment = torch.compile(routed_segment, dynamic=None) if pooled else None
        self.pooled_finish = torch.compile(pooled_finish, dynamic=False) if pooled else None
        self.resident_layer = torch.compile(pooled_layer, dynamic=None) if pooled else None
        self.graphs = graphs  # resident decode passes replayed from captured graphs (`--cuda-graphs`)
        self.held_kv: KVCache | None = None  # one sequence's KV cache, reused by every request (`decode_kv`)

    def at(self, layer: int) -> LayerExperts:
        """The experts handle of decoder layer `layer`."""
        return self.bound[layer]

    def resident_decode(self, tokens: int) -> bool:
        """Whether this pass may take the all-resident decode path: one row, every expert resident, no tracing,
        no host-side knob (layer-adaptive, cache prior, lookahead)."""
        if tokens != 1 or self.cache.trace is not None:
            return False
        if self.spec.lookahead or self.spec.host_knobs:
            return False
        return self.cache.all_resident

    def decode_kv(self, max_len: int) -> KVCache:
        """The KV cache of one sequence of up to max_len positions, held across requests and reset in place (its tensors are
        the ones captured graphs read, so they survive the request); made anew only for a longer request or another ring
        layout, rounded up to KV_BLOCK positions when that keeps the layout."""
        held = self.held_kv
        if held is not None and held.max_len >= max_len and held.rings == self.rings(held.max_len) == self.rings(max_len):
            held.reset()
            return held
        self.held_kv = None  # free the old buffers first
        rounded = -(-max_len // KV_BLOCK) * KV_BLOCK
        self.held_kv = self.new_kv(rounded if self.rings(rounded) == self.rings(max_len) else max_len)
        return self.held_kv

    def new_kv(self, max_len: int) -> KVCache:
        """An empty KV cache for one sequence of up to max_len positions."""
        k_shapes, v_shapes = self.model.kv_shapes()
        device, dtype = self.model.lm_head.weight.device, self.model.lm_head.weight.dtype
        return KVCache(k_shapes, v_shapes, max_len, device, dtype, self.new_recurrent(), rings=self.rings(max_len))

    def new_pool(self, rows: int, max_len: int) -> KVPool:
        """KV buffers for `rows` sequences of up to max_len positions, decoded together."""
        k_shapes, v_shapes = self.model.kv_shapes()
        return KVPool(k_shapes, v_shapes, rows, max_len, self.model.lm_head.weight.device, self.model.lm_head.weight.dtype, self.rings(max_len))

    def rings(self, max_len: int) -> list[int | None]:
        """Per layer, the ring slots of a sliding-window layer (window + kv_slack, when under max_len), else None."""
        return [None if w is None or w + self.kv_slack >= max_len else w + self.kv_slack for w in self.model.kv_windows()]

    def new_recurrent(self) -> dict:
        """Fresh recurrent states of one sequence (empty for attention-only models)."""
        device, dtype = self.model.lm_head.weight.device, self.model.lm_head.weight.dtype
        return {m.layer: m.new_state(device, dtype) for m in self.model.modules() if hasattr(m, "new_state")}

    def ids(self, tokens: list[int]) -> torch.Tensor:
        """Token ids [T] on the device, without a host sync."""
        return self.cache.transfer.to_device(tokens)

    def choose(self, layer: int, routing: Routing, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass's experts at this layer: big or little, with the little decode knobs applied to a single token."""
        now = self.spec
        if self.row_groups is not None:
            return mixed_select(routing, spec, self.row_groups)
        if now.mode is ExpertMode.BIG or not now.host_knobs or routing.indices.shape[0] != 1:
            return select(routing, spec, now.mode, now.little_weights, now.little_k)
        k = spec.top_k
        values = self.cache.transfer.to_host(torch.cat([routing.indices[0].double(), routing.raw_weights[0].double()]))  # one sync: [2k]
        experts, scores = [int(v) for v in values[:k]], values[k:]
        if now.layer_adaptive is not None and runs_big_here(scores, now.little_k, now.layer_adaptive):
            return select(routing, spec, ExpertMode.BIG)
        if now.cache_prior is None:
            return select(routing, spec, now.mode, now.little_weights, now.little_k)
        ranks = prefer_resident(experts, scores, now.little_k, lambda e: (layer, e) in self.cache.where, now.cache_prior)
        position = self.cache.transfer.to_device(ranks)  # [n]
        return select(Routing(routing.indices[:, position], routing.raw_weights[:, position]), spec, ExpertMode.BIG)  # weights over the chosen

    def run_experts(self, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Delegate to the executor: without any host planning when every expert is resident."""
        if self.resident_pass:
            return self.executor.run_resident(layer, x, indices, weights)
        return self.executor.run(layer, x, indices, weights)

    def note_routing(self, layer: int, x: torch.Tensor, routing: Routing) -> None:
        """Keep each layer's top-k of the last token while recording; with lookahead, start the next layer's loads."""
        self.record_routing(layer, routing)
        nxt = self.next_moe_layer.get(layer)
        now = self.spec
        if now.lookahead and nxt is not None and x.shape[0] == 1:
            block = self.model.model.layers[nxt].mlp
            indices, _ = select(block.gate(x), block.spec, now.mode, now.little_weights, now.little_k)
            self.cache.prefetch(nxt, self.cache.transfer.to_host(indices[0]), Priority.LOOKAHEAD)

    def record_routing(self, layer: int, routing: Routing) -> None:
        """While recording: keep the layer's top-k of the last token (of every row, in a batched pass); while logging
        positions, every position's gate values."""
        if self.position_log is not None:
            self.position_log.append(routing.raw_weights)
        if self.spec.record and self.batch_rows:
            self.row_routing[layer] = routing  # this pass's own tensors: no copy needed
        elif self.spec.record:
            row = self.moe_row[layer]
            self.routing_buf[row].copy_(routing.indices[-1])
            self.weight_buf[row].copy_(routing.raw_weights[-1])

    @torch.inference_mode()
    def routed_logits(self, ids: torch.Tensor, kv: KVCache, spec: PassSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: [T] -> (logits [T, V], every position's raw gate values of each MoE layer [T, L, k])."""
        self.position_log = []
        try:
            logits = self.forward(ids, kv, spec, all_logits=True)
            return logits, torch.stack(self.position_log, dim=1)
        finally:
            self.position_log = None

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        kv: KVCache,
        spec: PassSpec,
        all_logits: bool = False,
        step: int = 0,
        keep: torch.Tensor | None = None,
        resume: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """ids: [T] -> logits of the last position [V] (or all [T, V]) of one pass as `spec` describes it; when it records,
        `routing_log` holds each MoE layer's top-k. `keep` and `resume`: see `CausalLM.forward` (a partial fallback; such
        passes are not replayed from graphs)."""
        self.spec = spec = self.resolved(spec)
        if self.cache.trace is not None:
            trace = self.cache.trace
            trace.step, trace.pass_id, trace.mode = step, trace.pass_id + 1, spec.mode.value
        self.resident_pass = self.resident_decode(ids.shape[0])
        segment = self.compiled if self.compiled is not None and ids.shape[0] == 1 else before_experts  # prompts run eager
        step, span = self.layer_step(ids.shape[0]), self.decode_span(ids.shape[0], kv)
        with native_cpu_gemv(ids.shape[0] == 1 and ids.device.type == "cpu" and self.executor.dtype in (torch.bfloat16, torch.float16)):
            if self.graphs is not None and self.resident_pass and span is not None and not all_logits and keep is None and resume is None:
                run = lambda x: self.model(x, kv, self, segment=segment, layer_step=step, span=span)  # noqa: E731
                return self.graphs.run((spec, span), ids, kv, self.cache.stats, run)
            return self.model(ids, kv, self, all_logits=all_logits, segment=segment, layer_step=step, span=span, keep=keep, resume=resume)

    def decode_span(self, tokens: int, kv: KVCache) -> int | None:
        """Keys a decode pass reads with `span_bucket` set: the length + 1 rounded up to the bucket (at most max_len), so
        every step in a bucket has the same shapes (one compiled graph, or one captured CUDA graph, serves them all)."""
        if self.span_bucket is None or tokens != 1:
            return None
        return min(kv.max_len, -(-(kv.length + 1) // self.span_bucket) * self.span_bucket)

    def layer_step(self, tokens: int) -> LayerStep | None:
        """The whole-layer compiled path this pass takes, if any: one decode row, experts read in place from the pool,
        no host-side knob, a layer's top-k fitting the cache."""
        if self.resident_layer is None or tokens != 1:
            return None
        if self.resident_pass:
            return self.resident_step
        return None if self.spec.host_knobs or self.model.info.top_k > self.cache.num_slots else self.offloaded_step

    def offloaded_step(self, index: int, layer: DecoderLayer, x: torch.Tensor, inp: AttentionInput, kv: LayerKV) -> torch.Tensor:
        """One decode layer with offloaded experts, compiled: the segment and choice, the layer's one host read and its
        loads, then the experts from the pool. x: [1, H] -> [1, H]."""
        assert self.routed_segment is not None and self.pooled_finish is not None
        now = self.spec
        x, h, indices, raw_weights, shared, chosen, weights = self.routed_segment(layer, x, inp, kv, now.mode, now.little_weights, now.little_k)
        if h is None:
            return x  # a dense layer
        self.note_routing(index, h, Routing(indices, raw_weights))
        cache, executor = self.cache, self.executor
        slots = cache.acquire(index, cache.transfer.to_host(chosen[0]))
        try:
            return self.pooled_finish(executor.act, x, h, shared, cache.transfer.to_device(slots), weights, *executor.pool_fields)
        finally:
            cache.release(slots)

    def resident_step(self, index: int, layer: DecoderLayer, x: torch.Tensor, inp: AttentionInput, kv: LayerKV) -> torch.Tensor:
        """One decode layer, every expert resident, compiled: a `LayerStep` with no host read (the slots come from the
        cache's device-side expert-to-slot table). x: [1, H] -> [1, H]."""
        assert self.routed_segment is not None and self.resident_layer is not None
        now = self.spec
        if not isinstance(layer.mlp, MoEBlock):
            return self.routed_segment(layer, x, inp, kv, now.mode, now.little_weights, now.little_k)[
                0
            ]  # a dense layer, whole: the graph `offloaded_step` uses
        cache, executor = self.cache, self.executor
        x, indices, raw_weights = self.resident_layer(
            layer, x, inp, kv, cache.slot_rows[index], now.mode, now.little_weights, now.little_k, executor.act, *executor.pool_fields
        )
        cache.stats.hits += layer.mlp.spec.top_k if now.mode is ExpertMode.BIG else now.little_k
        self.record_routing(index, Routing(indices, raw_weights))
        return x

    @torch.inference_mode()
    def forward_rows(self, ids: torch.Tensor, batch: BatchKV, specs: list[PassSpec]) -> torch.Tensor:
        """ids: [B], one next token per row -> logits [B, V]; row b's experts as specs[b] describes them (big, or little
        with its own little_k and weight rule). When any row records, `row_log(b)` / `row_weights(b)` hold row b's top-k of
        every MoE layer. Single-row knobs (lookahead, layer-adaptive, cache prior) do not apply to a batched pass."""
        specs = [self.resolved(s) for s in specs]
        kinds = {(s.mode, s.little_k, s.little_weights) if s.mode is ExpertMode.LITTLE else (s.mode, self.default_little_k, "native") for s in specs}
        record = any(s.record for s in specs)
        if len(kinds) == 1:  # every row alike: the plain selection
            mode, little_k, little_weights = kinds.pop()
            self.spec, self.row_groups = PassSpec(mode, little_k, little_weights, record), None
        else:
            self.spec, self.row_groups = PassSpec(ExpertMode.BIG, self.default_little_k, record=record), self.groups_of(specs)
        self.resident_pass, self.batch_rows = False, True
        self.row_routing = {}
        try:
            with native_cpu_gemv(len(batch) == 1 and ids.device.type == "cpu" and self.executor.dtype in (torch.bfloat16, torch.float16)):
                return self.model.forward_rows(ids, batch, self)
        finally:
            self.row_groups, self.batch_rows = None, False

    def groups_of(self, specs: list[PassSpec]) -> list[RowGroup]:
        """The little rows of a batched pass (specs resolved), grouped by their little model: (rows [b] on the device, weight
        rule, little_k)."""
        groups: dict[tuple[str, int], list[int]] = {}
        for b, spec in enumerate(specs):
            if spec.mode is ExpertMode.LITTLE:
                assert spec.little_k is not None
                groups.setdefault((spec.little_weights, spec.little_k), []).append(b)
        return [RowGroup(self.ids(rows), weights, little_k) for (weights, little_k), rows in groups.items()]

    def row_log(self, b: int) -> dict[int, torch.Tensor]:
        """MoE layer -> row b's top-k [k] in the last recording batched pass."""
        return {layer: routing.indices[b] for layer, routing in self.row_routing.items()}

    def row_weights(self, b: int) -> torch.Tensor:
        """Row b's raw gate values of every MoE layer [L, k] in the last recording batched pass."""
        return torch.stack([self.row_routing[layer].raw_weights[b] for layer in sorted(self.row_routing)])

    @property
    def routing_log(self) -> dict[int, torch.Tensor] | None:
        """MoE layer -> the recorded pass's top-k of its last token [k] (views of the static buffer), None when not recorded."""
        if not self.spec.record:
            return None
        return {layer: self.routing_buf[row] for layer, row in self.moe_row.items()}

    @property
    def default_little_k(self) -> int:
        """Experts per token of the little model unless a policy sets it: half the top-k, rounded up."""
        return half_of(self.model.info.top_k)

    def little_k_of(self, little_k: int | None) -> int:
        """A policy's little_k on this model: its own, or the default for None."""
        return self.default_little_k if little_k is None else little_k

    def resolved(self, spec: PassSpec) -> PassSpec:
        """`spec` with its little_k set for this model."""
        return spec if spec.little_k is not None else replace(spec, little_k=self.default_little_k)

    def logged_weights(self) -> torch.Tensor:
        """The recorded pass's raw gate values of every MoE layer [L, k] (empty [0, k] when nothing was recorded)."""
        if not self.spec.record:
            return torch.zeros(0, self.model.info.top_k, device=self.model.lm_head.weight.device)
        return self.weight_buf

    def prefetch_other_half(self, routing_log: dict[int, torch.Tensor], little_k: int, first_layer: int = 0) -> int:
        """Before a fallback pass (starting at decoder layer `first_layer`): start loading, in layer order, the top-k
        experts the little pass (of little_k experts) did not use."""
        budget = self.cache.num_slots - self.model.info.top_k  # leave room for the layer being computed
        layers = sorted(layer for layer in routing_log if layer >= first_layer)
        if not layers or budget <= 0 or self.cache.all_resident:  # nothing to load: no host read either
            return 0
        others = self.cache.transfer.to_host(torch.stack([routing_log[layer] for layer in layers])[:, little_k:])  # one sync, all layers
        issued = 0
        for layer, experts in zip(layers, others):
            if issued >= budget:
                break
            issued += self.cache.prefetch(layer, experts[: budget - issued])
        return issued


@dataclass(frozen=True)
class RowGroup:
    """Little rows of a batched pass that share a little model."""

    rows: torch.Tensor  # [b] int64 row indices, on the device
    little_weights: str
    little_k: int


def mixed_select(routing: Routing, spec: RouterSpec, groups: list[RowGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, k], weights [B, k]) of a batch whose rows differ in their experts: big rows keep all k; each group's
    little rows keep their little_k best (as `select` gives them alone) and mark the rest -1 (not run)."""
    indices, weights = select(routing, spec, ExpertMode.BIG)  # [B, k]
    indices, weights, k = indices.clone(), weights.clone(), spec.top_k
    for group in groups:
        n, rows = group.little_k, group.rows
        _, little_w = select(Routing(routing.indices[rows], routing.raw_weights[rows]), spec, ExpertMode.LITTLE, group.little_weights, n)  # [b, n]
        weights[rows] = torch.cat((little_w, little_w.new_zeros(little_w.shape[0], k - n)), dim=1)
        indices[rows] = indices[rows].masked_fill((torch.arange(k, device=rows.device) >= n)[None, :], -1)
    return indices, weights


def routed_segment(
    layer: DecoderLayer,
    x: torch.Tensor,
    inp: AttentionInput,
    kv: LayerKV,
    mode: ExpertMode,
    little_weights: str,
    little_k: int,
) -> tuple[torch.Tensor | None, ...]:
    """`before_experts` and the mode's choice of experts (`select`), for torch.compile. x [1, H] -> (x [1, H], the MLP
    input h [1, H] or None for a finished dense layer, top-k indices and raw gate values [1, k], the shared experts'
    output or None, the chosen experts and their weights [1, n])."""
    x, h, indices, raw_weights, shared = before_experts(layer, x, inp, kv)
    if h is None or indices is None or raw_weights is None:
        return x, None, None, None, None, None, None
    chosen, weights = select(Routing(indices, raw_weights), layer.mlp.spec, mode, little_weights, little_k)
    return x, h, indices, raw_weights, shared, chosen, weights


def pooled_finish(
    act: Activation,
    x: torch.Tensor,
    h: torch.Tensor,
    shared: torch.Tensor | None,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The rest of an MoE layer, for torch.compile: the chosen experts read from the slot pool (slots [n], weights [1, n])
    on h [1, H], plus the shared experts and the residual x [1, H] -> [1, H]."""
    out = pool_experts(act, h, slots, weights, gate_up, down, gate_up_bias, down_bias)
    return x + (out if shared is None else out + shared)


def pooled_layer(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole MoE decoder layer for one token with every expert resident, for torch.compile: `routed_segment`, the slots
    from the layer's expert-to-slot row slot_of [E] and `pooled_finish`, all on the device; pool: `pooled_finish`'s
    pool fields. x [1, H] -> (x after the layer [1, H], top-k indices [1, k], raw gate values [1, k])."""
    x, h, indices, raw_weights, shared, chosen, weights = routed_segment(layer, x, inp, kv, mode, little_weights, little_k)
    assert h is not None and chosen is not None and weights is not None  # an MoE layer
    return pooled_finish(act, x, h, shared, slot_of[chosen[0]], weights, *pool), indices, raw_weights


def compiled_segment() -> Segment:
    """`before_experts` under torch.compile for decode rows: one graph per decoder-layer type, the weights and the
    layer's state as inputs (so every layer of a type shares it), the KV length dynamic after its first change."""
    return torch.compile(before_experts, dynamic=None)


@contextmanager
def native_cpu_gemv(enabled: bool) -> Iterator[None]:
    """While enabled, half-precision matmuls skip oneDNN: for a single row torch's own gemv reads weights ~1.7x faster
    on AVX512-BF16 CPUs (20-25 vs 11-14 GB/s, 2 threads, a 6144 x 2048 bf16 weight); for many rows oneDNN is far faster."""
    if not enabled:
        yield
        return
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)
