"""Runs forward passes of the model: each pass described by its caller (`PassSpec`), its state in one `PassContext`."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from mobile_moe.engine.aot import AotLayers
from mobile_moe.engine.graphs import GRAPH_SPAN_BUCKET, DecodeGraphs, GraphCapture
from mobile_moe.engine.passes import PassSpec
from mobile_moe.engine.prefix import SINGLE, HeldPrefix, PrefixIndex, Writer
from mobile_moe.experts.cache import ExpertCache
from mobile_moe.experts.dispatch import pool_experts, tiled_experts
from mobile_moe.experts.executor import ExpertExecutor
from mobile_moe.experts.reader import Priority
from mobile_moe.layers.attention import AttentionInput
from mobile_moe.layers.kv_cache import BatchKV, KVCache, KVPool, LayerKV
from mobile_moe.layers.mlp import Activation, activation
from mobile_moe.layers.moe import ExpertMode, LayerExperts, MoEBlock, RouterSpec, Routing, half_of, select
from mobile_moe.loading.budget import PREFILL_CHUNK, kv_bytes_per_token
from mobile_moe.models.transformer import CausalLM, DecoderLayer, LayerStep, Segment, before_experts
from mobile_moe.policy.little import prefer_resident, runs_big_here

KV_BLOCK = 128  # a held KV cache grows in steps of this many positions, so that requests of similar lengths share it


@dataclass(frozen=True)
class RunnerOptions:
    """How a runner's passes run, chosen when it is built; each default is what the device calls for."""

    graph_capture: GraphCapture | None = None  # records resident decode passes for replay (`--cuda-graphs`; None: eager)
    span_bucket: int | None = None  # decode passes read a multiple of this many keys (None: GRAPH_SPAN_BUCKET with graphs, else exact)
    kv_slack: int = PREFILL_CHUNK  # a sliding-window ring holds this many positions past the window: the longest write (a prompt
    # chunk) or rewind (a fallback, --kv-repair) must fit, so that no key a query still sees is overwritten
    device_indexed: bool | None = None  # resident slots read on the device by tensor indexing (None: off the CPU, or with graphs)
    grouped: bool | None = None  # grouped matmuls over the slot pool (None: where a one-time probe shows they run, on CUDA)
    fullgraph: bool = False  # compiled calls refuse graph breaks (a break or a host read inside raises: tests)
    dynamic: bool | None = None  # torch.compile's `dynamic` for the whole-layer calls (None: dynamic after a shape changes)
    observe: Callable[[PassContext], None] | None = None  # sees every pass's context before it runs (tests, tracing tools)
    compiled_dir: Path | None = None  # with compile_layers on the CPU: all-resident decode layers from ahead-of-time compiled packages
    # built once into this directory (engine/aot.py), nothing else compiled, no torch.compile (None: torch.compile'd calls)
    progress: bool = True  # say so on stderr when a package is built

    def without_graphs(self) -> RunnerOptions:
        """The same passes decoded eagerly: the key spans and on-device slot indexing that graphs need are kept, so an eager
        pass computes exactly what its replay would (bench compares them bit for bit)."""
        if self.graph_capture is None:
            return self
        device_indexed = True if self.device_indexed is None else self.device_indexed
        return replace(self, graph_capture=None, span_bucket=self.span_bucket or GRAPH_SPAN_BUCKET, device_indexed=device_indexed)


class Runner:
    """The long-lived parts of the engine's passes: the model, the expert cache and executor, compiled calls, captured
    graphs and static buffers. Each pass gets its own `PassContext`; nothing about a pass is written onto the runner."""

    def __init__(
        self, model: CausalLM, cache: ExpertCache, compile_layers: bool = False, options: RunnerOptions | None = None, prefixes: PrefixIndex | None = None
    ) -> None:
        options = options or RunnerOptions()
        graphs = DecodeGraphs(options.graph_capture) if options.graph_capture is not None else None
        device_indexed = options.device_indexed if options.device_indexed is not None else (graphs is not None or cache.device.type != "cpu")
        self.model = model
        self.cache = cache
        dtype = model.dtype
        aot = compile_layers and options.compiled_dir is not None and cache.device.type == "cpu"
        self.executor = ExpertExecutor(
            cache, activation(model.info.hidden_act), dtype, grouped=options.grouped, compiled=compile_layers and not aot, device_indexed=device_indexed
        )
        moe = list(model.info.moe_layers)
        self.next_moe_layer = dict(zip(moe, moe[1:]))
        self.moe_row = {layer: row for row, layer in enumerate(moe)}
        device, k = model.device, model.info.top_k
        self.routing_buf = torch.zeros(len(moe), k, dtype=torch.int64, device=device)  # [L, k] a recording pass's last top-k per MoE layer
        self.weight_buf = torch.zeros(len(moe), k, dtype=torch.float32, device=device)  # [L, k] its raw gate values
        # decode passes read a fixed span of keys, rounded up to this many (None: the exact length); one capture per bucket of spans
        self.span_bucket = options.span_bucket if options.span_bucket is not None else (GRAPH_SPAN_BUCKET if graphs is not None else None)
        self.kv_slack = options.kv_slack
        self.half_cpu = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)  # single rows skip oneDNN (`native_cpu_gemv`)
        self.compiled: Segment | None = None
        self.routed_segment: Callable | None = None
        self.pooled_finish: Callable | None = None
        self.resident_layer: Callable | None = None
        if aot and (self.executor.in_place or self.executor.tiled is not None) and not self.executor.grouped:
            assert options.compiled_dir is not None
            self.resident_layer = AotLayers(options.compiled_dir, pooled_layer, options.progress)  # the rest runs eagerly
        elif compile_layers and not aot:
            self.compile_calls(options)
        self.graphs = graphs  # resident decode passes replayed from captured graphs (`--cuda-graphs`)
        self.held_kv: KVCache | None = None  # one sequence's KV cache, reused by every request (`decode_kv`)
        self.held_pool: KVPool | None = None  # the batch KV pool, lent to one batch at a time (`decode_pool`)
        self.pool_holder: weakref.ref | None = None  # the batch it is lent to
        self.prefixes = prefixes or PrefixIndex(False, 0)  # what the held sequences hold for the next requests (none given: no reuse)
        self.observe = options.observe

    def compile_calls(self, options: RunnerOptions) -> None:
        """The torch.compile'd decode calls: the layer segment, and with experts read in place from a float pool an
        offloaded MoE layer as two calls around the host's one read of its choice (`PassContext.offloaded_step`), with
        every expert resident one call (`resident_step`)."""
        compile_fn = partial(torch.compile, fullgraph=options.fullgraph)
        self.compiled = compile_fn(before_experts, dynamic=None)
        if self.executor.pooled is not None:
            self.routed_segment = compile_fn(routed_segment, dynamic=options.dynamic)
            self.pooled_finish = compile_fn(pooled_finish, dynamic=False)
            self.resident_layer = compile_fn(pooled_layer, dynamic=options.dynamic)

    def decode_kv(self, max_len: int) -> KVCache:
        """The KV cache of one sequence of up to max_len positions, held across requests and reset in place (its tensors are
        the ones captured graphs read, so they survive the request); made anew only for a longer request or another ring
        layout, rounded up to KV_BLOCK positions when that keeps the layout. What it held is no longer offered for reuse
        (`sequence_kv` keeps a prefix)."""
        self.prefixes.take(SINGLE)
        held = self.held_kv
        if held is not None and held.max_len >= max_len and held.rings == self.rings(held.max_len) == self.rings(max_len):
            held.reset()
            return held
        self.held_kv = None  # free the old buffers first
        rounded = -(-max_len // KV_BLOCK) * KV_BLOCK
        self.held_kv = self.new_kv(rounded if self.rings(rounded) == self.rings(max_len) else max_len)
        return self.held_kv

    def decode_pool(self, rows: int, max_len: int, holder: object) -> KVPool:
        """KV buffers for `rows` sequences of up to max_len positions, lent to `holder` (a batch) until it is dropped: the
        held pool when it is large enough and no live batch holds it (its rows are overwritten in place), else a new one,
        which is held next when it is the larger (rounded up to KV_BLOCK positions when that keeps the ring layout)."""
        held, owner = self.held_pool, self.pool_holder() if self.pool_holder is not None else None
        fits = held is not None and held.rows >= rows and held.max_len >= max_len and held.rings == self.rings(held.max_len) == self.rings(max_len)
        if held is not None and fits and owner is None:
            self.pool_holder = weakref.ref(holder)
            return held
        rounded = -(-max_len // KV_BLOCK) * KV_BLOCK
        pool = self.new_pool(rows, rounded if self.rings(rounded) == self.rings(max_len) else max_len)
        if owner is None:
            self.held_pool = None  # free the old buffers first
            self.prefixes.forget_rows()
            self.held_pool, self.pool_holder = pool, weakref.ref(holder)
        return pool

    def sequence_kv(self, prompt: list[int], writer: Writer, max_len: int) -> tuple[KVCache, int]:
        """The held KV cache of one sequence (`decode_kv`) for a request whose prefill `writer` writes, keeping the longest
        prefix of `prompt` it holds that the request may reuse (copied over when a longer request needs a new cache):
        (the cache, positions kept)."""
        held = self.prefixes.take(SINGLE)  # forgotten until this request finishes: it overwrites what follows the prefix
        n = 0 if held is None or self.held_kv is None else held.reusable(prompt, writer, self.ring_slack(self.held_kv.rings))
        old = self.held_kv if n else None  # kept alive through `decode_kv` only when there is a prefix to copy
        kv = self.decode_kv(max_len)
        if held is None or old is None or (kv is not old and kv.rings != old.rings):
            return kv, 0
        if kv is not old:
            kv.copy_prefix(old, n)
        kv.keep(n, held.boundary)
        return kv, n

    def pool_row(self, pool: KVPool, free: list[int], prompt: list[int], writer: Writer) -> tuple[int, KVCache, int]:
        """A free row of `pool` for a request and the positions of `prompt` it keeps: the row holding the longest prefix
        the request may reuse, else the first free one (only the held pool's rows are remembered)."""
        slack, held = self.ring_slack(pool.rings), pool is self.held_pool
        reusable = {s: p.reusable(prompt, writer, slack) for s in free if held and (p := self.prefixes.peek(s)) is not None}
        slot = max(free, key=lambda s: reusable.get(s, 0))  # the first of equals: the lowest free row when none holds the prefix
        n, prefix = reusable.get(slot, 0), self.prefixes.take(slot) if held else None
        kv = pool.row(slot, self.new_recurrent())
        if n and prefix is not None:
            kv.keep(n, prefix.boundary)
        return slot, kv, n

    def remember(self, kv: KVCache, prefix: HeldPrefix, pool: KVPool | None = None, slot: int = 0) -> None:
        """Keep what a finished request's sequence holds for the next requests: the held single-sequence cache, or a row
        of the held pool (another cache or pool is not kept)."""
        if pool is None and kv is self.held_kv:
            self.prefixes.remember(SINGLE, prefix)
        elif pool is not None and pool is self.held_pool:
            self.prefixes.remember(slot, prefix)

    def ring_slack(self, rings: list[int | None]) -> int | None:
        """Positions a ring layer holds past its window (None: no ring layers): how far back a reused prefix may end."""
        return None if all(r is None for r in rings) else self.kv_slack

    @property
    def prefix_bytes(self) -> int:
        """Bytes the held prefixes occupy (KV entries of their positions, recurrent snapshots): memory the plan reserves anyway."""
        return self.prefixes.positions() * kv_bytes_per_token(self.model, self.model.dtype) + self.prefixes.snapshot_bytes()

    def new_kv(self, max_len: int) -> KVCache:
        """An empty KV cache for one sequence of up to max_len positions."""
        k_shapes, v_shapes = self.model.kv_shapes()
        device, dtype = self.model.device, self.model.dtype
        return KVCache(k_shapes, v_shapes, max_len, device, dtype, self.new_recurrent(), rings=self.rings(max_len))

    def new_pool(self, rows: int, max_len: int) -> KVPool:
        """KV buffers for `rows` sequences of up to max_len positions, decoded together."""
        k_shapes, v_shapes = self.model.kv_shapes()
        return KVPool(k_shapes, v_shapes, rows, max_len, self.model.device, self.model.dtype, self.rings(max_len))

    def rings(self, max_len: int) -> list[int | None]:
        """Per layer, the ring slots of a sliding-window layer (window + kv_slack, when under max_len), else None."""
        return [None if w is None or w + self.kv_slack >= max_len else w + self.kv_slack for w in self.model.kv_windows()]

    def new_recurrent(self) -> dict:
        """Fresh recurrent states of one sequence (empty for attention-only models)."""
        device, dtype = self.model.device, self.model.dtype
        return {m.layer: m.new_state(device, dtype) for m in self.model.modules() if hasattr(m, "new_state")}

    def ids(self, tokens: list[int]) -> torch.Tensor:
        """Token ids [T] on the device, without a host sync."""
        return self.cache.transfer.to_device(tokens)

    @torch.inference_mode()
    def routed_logits(self, ids: torch.Tensor, kv: KVCache, spec: PassSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: [T] -> (logits [T, V], every position's raw gate values of each MoE layer [T, L, k])."""
        log: list[torch.Tensor] = []
        logits = self.forward(ids, kv, spec, all_logits=True, log=log)
        return logits, torch.stack(log, dim=1)

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
        log: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """ids: [T] -> logits of the last position [V] (or all [T, V]) of one pass as `spec` describes it; a recording pass
        leaves each MoE layer's top-k of its last position in `routing_buf` (gate values: `weight_buf`). `keep` and
        `resume`: see `CausalLM.forward` (a partial fallback; such passes are not replayed from graphs); `log`: filled
        with every position's raw gate values of each MoE layer [T, k]."""
        if spec.little_k is None:
            spec = self.resolved(spec)
        T, trace = ids.shape[0], self.cache.trace
        if trace is not None:
            trace.step, trace.pass_id, trace.mode = step, trace.pass_id + 1, spec.mode.value
        # the all-resident decode path: one row, no tracing, no host-side knob; its layers then need no host decision
        resident = T == 1 and trace is None and not spec.lookahead and not spec.host_knobs and self.cache.all_resident
        ctx = PassContext(self, spec, resident, log=log)
        if self.observe is not None:
            self.observe(ctx)
        span = None if self.span_bucket is None or T != 1 else min(kv.max_len, -(-(kv.length + 1) // self.span_bucket) * self.span_bucket)
        segment = self.compiled if self.compiled is not None and T == 1 else before_experts  # prompts run eager
        step_fn = ctx.layer_step() if self.resident_layer is not None and T == 1 else None
        with native_cpu_gemv(T == 1 and self.half_cpu):
            if self.graphs is not None and resident and span is not None and not all_logits and keep is None and resume is None:
                run = lambda x: self.model(x, kv, ctx, segment=segment, layer_step=step_fn, span=span)  # noqa: E731
                return self.graphs.run((spec, span), ids, kv, self.cache.stats, run)
            return self.model(ids, kv, ctx, all_logits=all_logits, segment=segment, layer_step=step_fn, span=span, keep=keep, resume=resume)

    @torch.inference_mode()
    def forward_rows(self, ids: torch.Tensor, batch: BatchKV, specs: list[PassSpec], routing: dict[int, Routing] | None = None) -> torch.Tensor:
        """ids: [B], one next token per row -> logits [B, V]; row b's experts as specs[b] describes them (big, or little
        with its own little_k and weight rule). `routing`, when given, is filled with every row's top-k of each MoE layer
        (MoE layer -> [B, k]; `row_log`, `row_weights`). Single-row knobs (lookahead, layer-adaptive, cache prior) do
        not apply to a batched pass."""
        specs = [s if s.little_k is not None else self.resolved(s) for s in specs]
        kinds = {(s.mode, s.little_k, s.little_weights) if s.mode is ExpertMode.LITTLE else (s.mode, self.default_little_k, "native") for s in specs}
        if len(kinds) == 1:  # every row alike: the plain selection
            mode, little_k, little_weights = kinds.pop()
            ctx = PassContext(self, PassSpec(mode, little_k, little_weights), rows=routing, specs=specs)
        else:
            ctx = PassContext(self, PassSpec(ExpertMode.BIG, self.default_little_k), groups=self.groups_of(specs), rows=routing, specs=specs)
        if self.observe is not None:
            self.observe(ctx)
        with native_cpu_gemv(len(batch) == 1 and self.half_cpu):
            return self.model.forward_rows(ids, batch, ctx)

    def groups_of(self, specs: list[PassSpec]) -> list[RowGroup]:
        """The little rows of a batched pass (specs resolved), grouped by their little model: (rows [b] on the device, weight
        rule, little_k)."""
        groups: dict[tuple[str, int], list[int]] = {}
        for b, spec in enumerate(specs):
            if spec.mode is ExpertMode.LITTLE:
                assert spec.little_k is not None
                groups.setdefault((spec.little_weights, spec.little_k), []).append(b)
        return [RowGroup(self.ids(rows), weights, little_k) for (weights, little_k), rows in groups.items()]

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

    def prefetch_other_half(self, routing: torch.Tensor, little_k: int, first_layer: int = 0, share: int = 1) -> int:
        """Before a fallback pass (starting at decoder layer `first_layer`): start loading, in layer order, the top-k
        experts a little pass (of little_k experts) with this routing did not use; routing: [L, k], one row per MoE layer.
        share: the loads of this many positions are to fit in the cache together (an exact-mode draft's), each its part."""
        budget = (self.cache.num_slots - self.model.info.top_k) // share  # leave room for the layer being computed
        rows = [row for layer, row in self.moe_row.items() if layer >= first_layer]
        if not rows or budget <= 0 or self.cache.all_resident:  # nothing to load: no host read either
            return 0
        others = self.cache.transfer.to_host(routing[rows[0] :, little_k:])  # one sync, all layers: [L', k - little_k]
        issued = 0
        for layer, experts in zip(self.model.info.moe_layers[rows[0] :], others):
            if issued >= budget:
                break
            issued += self.cache.prefetch(layer, experts[: budget - issued])
        return issued


def row_log(routing: dict[int, Routing], b: int) -> torch.Tensor:
    """Row b's top-k of every MoE layer [L, k] (in layer order) from a recording batched pass's `routing`."""
    return torch.stack([routing[layer].indices[b] for layer in sorted(routing)])


def row_weights(routing: dict[int, Routing], b: int) -> torch.Tensor:
    """Row b's raw gate values of every MoE layer [L, k] from a recording batched pass's `routing`."""
    return torch.stack([routing[layer].raw_weights[b] for layer in sorted(routing)])


@dataclass
class PassContext:
    """One forward pass as its MoE layers see it, made by `Runner.forward` / `forward_rows` and dropped after: its
    description, whether every expert is resident (then no layer plans on the host), and where its routing goes."""

    runner: Runner
    spec: PassSpec
    resident: bool = False
    groups: list[RowGroup] | None = None  # a batched pass whose rows differ in their experts: the little rows' groups
    rows: dict[int, Routing] | None = None  # a recording batched pass: MoE layer -> every row's routing [B, k]
    log: list[torch.Tensor] | None = None  # a pass logging every position: each MoE layer's raw gate values [T, k]
    specs: list[PassSpec] | None = None  # a batched pass: each row's own description (resolved)

    def at(self, layer: int) -> LayerExperts:
        """The routed experts of decoder layer `layer` in this pass."""
        return partial(self.routed, layer)

    def routed(self, layer: int, x: torch.Tensor, routing: Routing, router: RouterSpec) -> torch.Tensor:
        """One MoE layer's routed experts: record its routing, choose the pass's experts, run them. x: [T, H] -> [T, H]."""
        spec = self.spec
        if spec.record or self.rows is not None or self.log is not None:
            self.record(layer, routing)
        if spec.lookahead and x.shape[0] == 1:
            self.look_ahead(layer, x)
        if self.groups is not None:
            indices, weights = mixed_select(routing, router, self.groups)
        elif spec.host_knobs and spec.mode is ExpertMode.LITTLE and routing.indices.shape[0] == 1:
            indices, weights = self.choose_on_host(layer, routing, router)
        else:
            indices, weights = select(routing, router, spec.mode, spec.little_weights, spec.little_k)
        executor = self.runner.executor
        return executor.run_resident(layer, x, indices, weights) if self.resident else executor.run(layer, x, indices, weights)

    def record(self, layer: int, routing: Routing) -> None:
        """Keep the layer's top-k of the last position (every row's, in a batched pass; every position's gate values, logging)."""
        if self.log is not None:
            self.log.append(routing.raw_weights)
        if self.rows is not None:
            self.rows[layer] = routing  # this pass's own tensors: no copy needed
        elif self.spec.record:
            runner = self.runner
            row = runner.moe_row[layer]
            runner.routing_buf[row].copy_(routing.indices[-1])
            runner.weight_buf[row].copy_(routing.raw_weights[-1])

    def look_ahead(self, layer: int, x: torch.Tensor) -> None:
        """Start loading the next MoE layer's experts as its router would choose them from this layer's input x [1, H]."""
        runner, spec = self.runner, self.spec
        nxt = runner.next_moe_layer.get(layer)
        if nxt is None:
            return
        block = runner.model.model.layers[nxt].mlp
        indices, _ = select(block.gate(x), block.spec, spec.mode, spec.little_weights, spec.little_k)
        runner.cache.prefetch(nxt, runner.cache.transfer.to_host(indices[0]), Priority.LOOKAHEAD)

    def choose_on_host(self, layer: int, routing: Routing, router: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """A single decode row's little experts decided on the host: big where the router is unsure (layer-adaptive), or
        resident experts of similar score first (cache prior)."""
        spec, cache = self.spec, self.runner.cache
        k = router.top_k
        values = cache.transfer.to_host(torch.cat([routing.indices[0].double(), routing.raw_weights[0].double()]))  # one sync: [2k]
        experts, scores = [int(v) for v in values[:k]], values[k:]
        if spec.layer_adaptive is not None and runs_big_here(scores, spec.little_k, spec.layer_adaptive):
            return select(routing, router, ExpertMode.BIG)
        if spec.cache_prior is None:
            return select(routing, router, spec.mode, spec.little_weights, spec.little_k)
        ranks = prefer_resident(experts, scores, spec.little_k, lambda e: (layer, e) in cache.where, spec.cache_prior)
        position = cache.transfer.to_device(ranks)  # [n]
        return select(Routing(routing.indices[:, position], routing.raw_weights[:, position]), router, ExpertMode.BIG)  # weights over the chosen

    def layer_step(self) -> LayerStep | None:
        """The whole-layer compiled path of this decode row, if any: experts read in place from the pool, no host-side
        knob, a layer's top-k fitting the cache."""
        if self.resident:
            return self.resident_step
        runner = self.runner
        if runner.routed_segment is None:  # ahead-of-time compiled: offloaded layers run eagerly
            return None
        return None if self.spec.host_knobs or runner.model.info.top_k > runner.cache.num_slots else self.offloaded_step

    def offloaded_step(self, index: int, layer: DecoderLayer, x: torch.Tensor, inp: AttentionInput, kv: LayerKV) -> torch.Tensor:
        """One decode layer with offloaded experts, compiled: the segment and choice, the layer's one host read and its
        loads, then the experts from the pool. x: [1, H] -> [1, H]."""
        runner, spec = self.runner, self.spec
        assert runner.routed_segment is not None and runner.pooled_finish is not None
        x, h, indices, raw_weights, shared, chosen, weights = runner.routed_segment(layer, x, inp, kv, spec.mode, spec.little_weights, spec.little_k)
        if h is None:
            return x  # a dense layer
        if spec.record or self.log is not None:
            self.record(index, Routing(indices, raw_weights))
        if spec.lookahead:
            self.look_ahead(index, h)
        cache, executor = runner.cache, runner.executor
        slots = cache.acquire(index, cache.transfer.to_host(chosen[0]))
        try:
            return runner.pooled_finish(executor.act, x, h, shared, cache.transfer.to_device(slots), weights, *executor.pool_fields)
        finally:
            cache.release(slots)

    def resident_step(self, index: int, layer: DecoderLayer, x: torch.Tensor, inp: AttentionInput, kv: LayerKV) -> torch.Tensor:
        """One decode layer, every expert resident, compiled: a `LayerStep` with no host read (the slots come from the
        cache's device-side expert-to-slot table). x: [1, H] -> [1, H]."""
        runner, spec = self.runner, self.spec
        assert runner.resident_layer is not None
        if not isinstance(layer.mlp, MoEBlock):  # a dense layer, whole: the graph `offloaded_step` uses (eager ahead of time)
            return (runner.routed_segment or routed_segment)(layer, x, inp, kv, spec.mode, spec.little_weights, spec.little_k)[0]
        cache, executor = runner.cache, runner.executor
        x, indices, raw_weights = runner.resident_layer(
            layer, x, inp, kv, cache.slot_rows[index], spec.mode, spec.little_weights, spec.little_k, executor.act, *executor.pool_fields
        )
        cache.stats.hits += layer.mlp.spec.top_k if spec.mode is ExpertMode.BIG else spec.little_k
        if spec.record:
            self.record(index, Routing(indices, raw_weights))
        return x


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
    *pool: torch.Tensor | None,
) -> torch.Tensor:
    """The rest of an MoE layer, for torch.compile: the chosen experts read from the slot pool (slots [n], weights [1, n])
    on h [1, H], plus the shared experts and the residual x [1, H] -> [1, H]. pool (`ExpertExecutor.pool_fields`): a float
    pool's (gate_up [S, 2I, H], down [S, H, I], biases or None), or a tiled pool's codes and scales of each matrix."""
    experts = tiled_experts if pool[0] is not None and pool[0].dtype == torch.uint8 else pool_experts  # fixed when traced
    out = experts(act, h, slots, weights, *pool)  # type: ignore[arg-type]
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
