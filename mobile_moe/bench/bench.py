"""`mobile-moe bench`: big (on-demand + LRU), mobile, little, all-resident, transformers (whole model) and transformers+accelerate
(offloaded), same prompts and budget. Systems run in interleaved rounds; speeds are medians over rounds."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import median

import torch

from mobile_moe.bench.checks import (
    decode_step_syncs,
    graph_figures,
    guarded,
    h2d_probe_gb_s,
    launches_per_token,
    peak_mb,
    reset_peak,
)
from mobile_moe.bench.costinputs import OpCounts, count_decode_ops, dequant_traffic, model_cost, with_counts
from mobile_moe.bench.costmodel import ModelCost, predict
from mobile_moe.bench.hf_baseline import HFBaseline, run_baseline
from mobile_moe.bench.profiles import PROFILES, HardwareProfile, device_profile, disk_profiles
from mobile_moe.bench.roofline import bytes_per_token, dense_read_bytes, memory_probe_gb_s
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM
from mobile_moe.eval.data import read_texts
from mobile_moe.eval.prompts import cut_prompts
from mobile_moe.experts.disk import DiskStore, aligned_empty, filesystem_type
from mobile_moe.experts.reader import DEFAULT_READERS, Priority, ReadPool
from mobile_moe.experts.trace import Access, Trace
from mobile_moe.loading.budget import dense_bytes

Generate = Callable[[list[int], SamplingParams], GenerationResult]  # one prompt's generation, as a system runs it
ROUND_PROBE_RECORDS = 64  # disk tier: records of the probe read right before each system's run (the disk's speed drifts)


@dataclass(frozen=True)
class BenchSettings:
    """What every system runs."""

    prompts: list[list[int]]
    new_tokens: int
    mobile: PolicyConfig
    gpu_memory_gb: float | None
    run_accelerate: bool = True
    trace_dir: Path | None = None
    cost: ModelCost | None = None  # sizes for the cost model; default: the benchmarked model's own
    temperature: float = 0.0  # synthetic models sample (seeded): greedy decoding of random weights repeats one token
    progress: bool = True
    rounds: int = 3  # every system runs once per round, systems interleaved; speeds are medians over rounds
    run_transformers: bool = True  # transformers' generate with the whole model on the device, when it fits
    load_peak_rss_bytes: int | None = None  # peak RSS once the model was loaded (a store built by this run included), before any system ran


@dataclass
class SystemResult:
    """One system's numbers over all prompts."""

    name: str
    decode_tok_s: float
    ttft_s: float
    h2d_gb_per_token: float
    hit_rate: float
    fallback_rate: float
    transfer_wait_share: float
    h2d_gbps: float = float("nan")  # bytes moved host->device per second of decode (the link's achieved rate when transfer-bound)
    host_syncs_per_token: float = float("nan")
    experts_per_token: float = float("nan")  # routed experts computed per decode step (fallback passes included)
    bytes_per_token: float = float("nan")  # weights and KV read per decode step (bench/roofline.py)
    dense_bytes_per_token: float = float("nan")  # of which dense weights (quantized ones as packed; one embedding row)
    expert_bytes_per_token: float = float("nan")  # of which routed experts
    roofline: float = float("nan")  # tok/s x bytes/token / the memory probe's GB/s: the share of the memory-bound speed reached
    ratio_to_big: float = 0.0
    same_tokens_as_big: float | None = None  # share of prompts whose generated ids equal big's (greedy runs)
    disk_bytes_per_token: float = float("nan")  # read from the on-disk store per decode step (disk tier only)
    disk_read_gb_s: float = float("nan")  # bytes the readers read / wall time at least one read was in flight
    disk_probe_gb_s: float = float("nan")  # the disk's probe right before this system's run (the disk's speed drifts)
    disk_decode_gb_s: float = float("nan")  # disk bytes per token x tok/s: the disk rate decode sustained, compute included
    lookahead_precision: float = float("nan")  # lookahead loads the next layer then used / lookahead loads (with --lookahead)
    host_tier_hit_rate: float = float("nan")  # three tiers: loads of the compute cache the host tier served without a disk read
    expert_path: str = ""  # how routed experts were computed (checks.expert_path): grouped, pooled, tinygemm, reference, ...
    dense_path: str = ""  # how dense linears were computed (`loading.dense.pack_dense`): count per kernel layout or float dtype
    launches_per_token: float = float("nan")  # kernel launches per decode token from one eager pass's counts (a replay: one)
    peak_gpu_mb: float | None = None  # peak allocated device memory during this system's run (CUDA; None elsewhere)
    predicted_tok_s: float = float("nan")  # the cost model on this run's trace and this device's probes (report's prediction_profile)
    predicted_h2d_mb_per_token: float = float("nan")
    predicted_host_syncs_per_token: float = float("nan")  # the cost model's assumption for this system's passes
    captures: int | None = None  # graphs: passes captured (resident+graphs only)
    replays: int | None = None  # graphs: decode passes replayed from captures
    capture_s: float | None = None  # graphs: seconds spent capturing
    graph_equals_eager: bool | None = None  # graphs: greedy decode's logits replayed == eager, bit for bit, every step
    replay_ms_per_token: float | None = None  # graphs: one captured pass replayed alone, device-synced
    captures_per_request: int | None = None  # graphs: captures made by the second of two identical requests
    note: str = ""


def _run_system(  # noqa: PLR0913 - what a system is and how it runs
    llm: LLM,
    name: str,
    policy: PolicyConfig,
    settings: BenchSettings,
    slots: int,
    preload: bool = False,
    graphs: bool = False,
    ops: OpCounts | None = None,
    run: Generate | None = None,
) -> tuple[SystemResult, list[Access], list[list[int]]]:
    """Fresh cache of `slots`, then every prompt under `policy`; sums decode-phase counters; also returns the generated ids.
    The all-resident reference runs untraced: tracing reads each layer's choice on the host, which it otherwise never does.
    graphs: keep the CUDA graphs `--cuda-graphs` gave the runner (every other system runs eagerly, for the comparison).
    ops: one eager pass's launch counts, for launches per token. run: how a prompt is generated (default: `llm.generate`
    under `policy`; bench --drafts on random weights: exact mode with a forced acceptance rate)."""
    trace = Trace()
    llm.reset_cache(slots, None if preload else trace, graphs=graphs)
    if preload:
        llm.cache.load_all()
    reset_peak(llm.device)  # after the new cache is made: the peak holds this system's slots, not the last one's
    cache = llm.cache
    sampling = SamplingParams(max_new_tokens=settings.new_tokens, temperature=settings.temperature, seed=0, stop_at_eos=False)
    decode_s = ttft = wait = context = 0.0
    steps = fallbacks = hits = misses = moved = syncs = disk = host_hits = disk_all = 0
    outputs = []
    reader = llm.reader
    read0 = (reader.bytes_read, reader.busy_wall_s) if reader is not None else None
    for ids in settings.prompts:
        result = llm.generate(ids, sampling, policy) if run is None else run(ids, sampling)
        s = result.stats
        outputs.append(result.token_ids)
        decode_s, ttft, wait = decode_s + s.decode_s, ttft + s.prefill_s, wait + s.decode_transfer_wait_s
        steps, fallbacks = steps + s.tokens - 1, fallbacks + s.fallback_tokens
        hits, misses, moved = hits + s.decode_expert_hits, misses + s.decode_expert_misses, moved + s.decode_h2d_bytes
        syncs += s.decode_host_syncs
        disk += s.decode_disk_bytes
        host_hits, disk_all = host_hits + s.host_tier_hits, disk_all + s.disk_bytes
        context += (s.tokens - 1) * (len(ids) + s.tokens / 2)  # positions attended, summed over decode steps
    if settings.trace_dir is not None:
        settings.trace_dir.mkdir(parents=True, exist_ok=True)
        trace.save(settings.trace_dir / f"{name}.jsonl")
    extra_fields: dict[str, float | int] = {}  # the disk tier's, lookahead's and graphs' own figures
    if cache.stats.lookahead_issued:
        extra_fields["lookahead_precision"] = cache.stats.lookahead_used / cache.stats.lookahead_issued
    if reader is not None and read0 is not None:
        busy = reader.busy_wall_s - read0[1]
        extra_fields.update(disk_bytes_per_token=disk / max(steps, 1), disk_read_gb_s=(reader.bytes_read - read0[0]) / 1e9 / busy if busy else 0.0)
        extra_fields["disk_decode_gb_s"] = disk / 1e9 / decode_s if decode_s else 0.0
        reads = disk_all // llm.loaded.store.record_bytes
        # three tiers: loads the host tier served without a disk read; two: the compute cache is the host tier
        extra_fields["host_tier_hit_rate"] = host_hits / max(host_hits + reads, 1) if llm.host_slots is not None else hits / max(hits + misses, 1)
    captured = llm.runner.graphs
    note = (
        ""
        if captured is None
        else f"{captured.replays} of {steps} decode passes replayed from CUDA graphs" + (f" (capture failed: {captured.failed})" if captured.failed else "")
    )
    if captured is not None:
        extra_fields.update(captures=captured.captures, replays=captured.replays, capture_s=captured.capture_s)
    if ops is not None:
        extra_fields["launches_per_token"] = launches_per_token(
            ops,
            len(llm.loaded.model.model.layers),
            len(llm.info.moe_layers),
            (hits + misses) / max(steps, 1),
            1 + fallbacks / max(steps, 1),
            0.0 if captured is None else captured.replays / max(steps, 1),
        )
    return (
        SystemResult(
            **extra_fields,
            note=note,
            expert_path=llm.runner.executor.path(preload),
            dense_path=llm.loaded.dense_path,
            dense_bytes_per_token=dense_read_bytes(llm.loaded.model),
            expert_bytes_per_token=(hits + misses) / max(steps, 1) * llm.loaded.store.expert_bytes,
            peak_gpu_mb=peak_mb(llm.device),
            name=name,
            decode_tok_s=steps / decode_s if decode_s else 0.0,
            ttft_s=ttft / len(settings.prompts),
            h2d_gb_per_token=moved / 1e9 / max(steps, 1),
            hit_rate=hits / max(hits + misses, 1),
            fallback_rate=fallbacks / max(steps, 1),
            transfer_wait_share=wait / decode_s if decode_s else 0.0,
            h2d_gbps=moved / 1e9 / decode_s if decode_s else 0.0,
            host_syncs_per_token=syncs / max(steps, 1),
            experts_per_token=(hits + misses) / max(steps, 1),
            bytes_per_token=bytes_per_token(llm.loaded.model, llm.loaded.store.expert_bytes, (hits + misses) / max(steps, 1), context / max(steps, 1)),
        ),
        trace.accesses,
        outputs,
    )


def default_prompts(llm: LLM, count: int, max_len: int = 128, random_len: int = 64) -> list[list[int]]:
    """Prompts cut from the demo corpus's test split (their last `max_len` tokens) when the model has a tokenizer, else seeded
    random ids (`random_len` each)."""
    if llm.tokenizer is not None:
        texts = read_texts(None, "test")[0]
        prompts = [llm.encode(p.text)[-max_len:] for p in cut_prompts(texts, count)]
        if len(prompts) == count:
            return prompts
    gen = torch.Generator().manual_seed(0)
    vocab = llm.loaded.model.vocab_size
    return [torch.randint(2, vocab, (random_len,), generator=gen).tolist() for _ in range(count)]


def _fits_on_device(llm: LLM, extra_bytes: int = 0) -> bool:
    """Whether every expert (plus `extra_bytes`) fits on the device next to what is there (host memory on CPU)."""
    if llm.device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(llm.device)
    return llm.loaded.store.nbytes + extra_bytes < 0.85 * free


def _same_tokens(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of prompts with identical generated ids."""
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def _median_of_rounds(rounds: list[SystemResult]) -> SystemResult:
    """The last round's counters with the median speed and TTFT over rounds."""
    return replace(
        rounds[-1],
        decode_tok_s=median(r.decode_tok_s for r in rounds),
        ttft_s=median(r.ttft_s for r in rounds),
        h2d_gbps=median(r.h2d_gbps for r in rounds),
        disk_read_gb_s=median(r.disk_read_gb_s for r in rounds),
        disk_probe_gb_s=median(r.disk_probe_gb_s for r in rounds),
    )


Engine = tuple[str, PolicyConfig, int, bool, bool]  # (system name, policy, cache slots, preload every expert, CUDA graphs)


Update = Callable[[dict], None]  # receives the report so far (`complete` false) after each system, and the whole one


def run_bench(llm: LLM, settings: BenchSettings, profiles: dict[str, HardwareProfile] = PROFILES, on_update: Update | None = None) -> dict:
    """All systems on the same prompts in interleaved rounds; ratios to big; cost-model predictions from this run's traces.
    `on_update` gets the report as each system finishes (so a run stopped midway keeps what it measured)."""
    slots = llm.planned_slots
    llm.reset_cache(slots)
    llm.generate(settings.prompts[0], SamplingParams(max_new_tokens=4, stop_at_eos=False))  # warm-up: kernels, allocator
    syncs, error = guarded(lambda: decode_step_syncs(llm, settings.prompts[0]))  # one more warm decode step, its host syncs listed
    ops = count_decode_ops(llm)  # kernel launches of one decode step, for the cost model
    store = llm.loaded.store
    cost = (
        with_counts(settings.cost, ops)
        if settings.cost
        else model_cost(llm.loaded.model, store.expert_bytes, ops, dequant_bytes=dequant_traffic(store.layout, llm.loaded.dtype))
    )
    extra = {"host_syncs_in_decode_step": syncs if error is None else {"error": error}, "kernel_launches": asdict(ops), "complete": False}

    def update(systems: list[SystemResult]) -> None:
        if on_update is not None:
            on_update(_report(llm, settings, systems, None, None, cost, {}, slots, extra))

    whole = None
    if settings.run_transformers and _fits_on_device(llm, dense_bytes(llm.loaded.model) + llm.loaded.store.nbytes):  # its own copy
        whole = HFBaseline(llm.loaded, llm.device, None, offload=False, warmup_ids=settings.prompts[0], progress=settings.progress)
    engines = _engines(llm, settings, slots)
    rounds, traces, outputs = _interleaved_rounds(llm, engines, whole, settings, ops, update)
    del whole
    systems = [_median_of_rounds(r) for r in rounds.values()]
    _mark_systems(systems, outputs, llm.loaded.store.total_experts, settings.temperature)
    if any(graphs for *_, graphs in engines):
        _add_graph_figures(llm, settings, next(s for s in systems if s.name == "resident+graphs"))
        update(systems)
    llm.reset_cache(slots)
    if settings.run_accelerate and llm.device.type == "cuda":
        systems.append(accelerate_system(llm, settings))
        update(systems)
    big = systems[0].decode_tok_s
    for s in systems:
        s.ratio_to_big = s.decode_tok_s / big if big else 0.0
    disk = disk_report(llm, systems, settings.load_peak_rss_bytes) if llm.reader is not None else None  # before the memory probe's 1 GiB enters the peak RSS
    probe, link = memory_probe_gb_s(device=llm.device), h2d_probe_gb_s(llm.device)
    for s in systems:
        s.roofline = s.decode_tok_s * s.bytes_per_token / 1e9 / probe
    here = device_profile(llm.device, probe, link)
    if disk is not None:  # the link that matters is the disk: predict for it, and for other SSDs on this CPU
        profiles = disk_profiles(disk["disk_probe_gb_s"], probe)
        here = profiles["this-disk"]
    predicted = {hw.name: {name: predict(traces[name], cost, hw, slots).tok_s for name in ("big", "mobile", "little")} for hw in profiles.values()}
    _predict_systems(systems, traces, cost, here, slots, llm)
    extra.update(complete=True, h2d_probe_gb_s=link, prediction_profile=asdict(here), peak_rss_mb=peak_rss_bytes() / 2**20)
    report = _report(llm, settings, systems, disk, probe, cost, predicted, slots, extra)
    if on_update is not None:
        on_update(report)
    return report


def accelerate_system(llm: LLM, settings: BenchSettings) -> SystemResult:
    """transformers + accelerate offloaded at the same budget: two short runs after a warm-up (it runs well under 1 tok/s at real size)."""
    reset_peak(llm.device)
    base = run_baseline(llm.loaded, llm.device, settings.gpu_memory_gb, settings.prompts[:2], min(settings.new_tokens, 8), settings.progress)
    return SystemResult(
        "accelerate", base.decode_tok_s, base.ttft_s, float("nan"), float("nan"), 0.0, float("nan"), note=base.placement, peak_gpu_mb=peak_mb(llm.device)
    )


def run_accelerate(llm: LLM, settings: BenchSettings) -> dict:
    """The transformers + accelerate baseline alone (`bench --accelerate-only`: building it at real size can outlast a run's budget)."""
    system = accelerate_system(llm, settings)
    system.ratio_to_big = float("nan")  # no big in this run
    extra = {"complete": True, "peak_rss_mb": peak_rss_bytes() / 2**20}
    return _report(llm, settings, [system], None, None, None, {}, llm.planned_slots, extra)


def _add_graph_figures(llm: LLM, settings: BenchSettings, system: SystemResult) -> None:
    """The resident+graphs row's check: replayed logits against eager ones, replay-only time, captures per request (when the check
    itself fails, its error in the row's note)."""
    figures, error = guarded(lambda: graph_figures(llm, settings.prompts[0]))
    if figures is None:
        system.note += f"; graph check failed: {error}"
        return
    system.graph_equals_eager, system.replay_ms_per_token = figures.equals_eager, figures.replay_ms_per_token
    system.captures_per_request = figures.captures_per_request


def _predict_systems(systems: list[SystemResult], traces: dict, cost: ModelCost, hw: HardwareProfile, slots: int, llm: LLM) -> None:
    """Each engine system's cost-model figures on `hw` beside its measured ones: big, mobile and little from their own traces at the
    planned slots; the resident systems from big's trace with every expert in a slot and no host read per layer (graphs: one launch)."""
    moe, total = len(llm.info.moe_layers), llm.loaded.store.total_experts
    resident = replace(cost, syncs_per_moe_layer=0.0)
    graphed = replace(resident, launches_per_layer=0.0, launches_per_moe_layer=0.0, launches_per_expert=0.0, launches_per_pass=1.0)
    plans = {"big": (cost, slots), "mobile": (cost, slots), "little": (cost, slots), "resident": (resident, total), "resident+graphs": (graphed, total)}
    for s in systems:
        if s.name not in plans:
            continue
        c, n = plans[s.name]
        p = predict(traces["big" if s.name.startswith("resident") else s.name], c, hw, n)  # resident systems run untraced
        s.predicted_tok_s, s.predicted_h2d_mb_per_token = p.tok_s, p.h2d_gb * 1e3 / max(p.steps, 1)
        passes = 1 + s.fallback_rate if s.name == "mobile" else 1.0
        s.predicted_host_syncs_per_token = passes * (c.syncs_per_moe_layer * moe + c.syncs_per_pass)


def _engines(llm: LLM, settings: BenchSettings, slots: int) -> list[Engine]:
    """big, mobile and little at the planned slots; resident (and resident+graphs) where every expert fits."""
    total = llm.loaded.store.total_experts
    little = PolicyConfig("little", little_weights=settings.mobile.little_weights, little_k=settings.mobile.little_k)
    engines = [("big", PolicyConfig("big"), slots, False, False), ("mobile", settings.mobile, slots, False, False), ("little", little, slots, False, False)]
    if _fits_on_device(llm) and (llm.reader is None or slots >= total):  # disk tier: only when the host budget holds every expert
        engines.append(("resident", PolicyConfig("big"), total, True, False))
        if llm.runner.graphs is not None:  # --cuda-graphs on CUDA: the same passes replayed from captures, interleaved
            engines.append(("resident+graphs", PolicyConfig("big"), total, True, True))
    return engines


def _interleaved_rounds(
    llm: LLM,
    engines: list[Engine],
    whole: HFBaseline | None,
    settings: BenchSettings,
    ops: OpCounts | None = None,
    update: Callable[[list[SystemResult]], None] | None = None,
) -> tuple[dict[str, list[SystemResult]], dict, dict]:
    """Every system once per round, round after round: (system -> its results per round, its last trace, its last tokens);
    `update` gets the systems so far (medians of their rounds so far) after each one."""
    rounds: dict[str, list[SystemResult]] = {}
    traces, outputs = {}, {}
    for _ in range(settings.rounds):
        for name, policy, n, preload, graphs in engines:
            probe = disk_probe_gb_s(llm.loaded.store, records=ROUND_PROBE_RECORDS) if llm.reader is not None else float("nan")
            result, traces[name], outputs[name] = _run_system(llm, name, policy, settings, n, preload, graphs, ops)
            result.disk_probe_gb_s = probe
            rounds.setdefault(name, []).append(result)
            if update is not None:
                update([_median_of_rounds(r) for r in rounds.values()])
        if whole is not None:
            base = whole.run(settings.prompts, settings.new_tokens)
            outputs["transformers"] = base.token_ids
            rounds.setdefault("transformers", []).append(
                SystemResult("transformers", base.decode_tok_s, base.ttft_s, float("nan"), float("nan"), 0.0, float("nan"), note=base.placement)
            )
    return rounds, traces, outputs


def _mark_systems(systems: list[SystemResult], outputs: dict, total: int, temperature: float) -> None:
    """Note the resident systems' cache, and (greedy) whether resident and transformers gave big's tokens."""
    for s in systems:
        if s.name.startswith("resident"):
            s.note = f"all {total} experts on the device" + (f"; {s.note}" if s.note else "")
        if temperature == 0.0:
            s.same_tokens_as_big = _same_tokens(outputs[s.name], outputs["big"]) if s.name.startswith("resident") or s.name == "transformers" else None


def _report(
    llm: LLM,
    settings: BenchSettings,
    systems: list[SystemResult],
    disk: dict | None,
    probe: float | None,
    cost: ModelCost | None,
    predicted: dict,
    slots: int,
    extra: dict,
) -> dict:
    """The JSON-ready report (`extra`: the run's own figures, and whether the report is complete)."""
    store = llm.loaded.store
    return {
        "disk": disk,
        "device": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu",
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),  # the feature set torch's CPU kernels run (AVX512, AVX2, ...)
        "threads": torch.get_num_threads(),
        "rounds": settings.rounds,
        "memory_probe_gb_s": probe,
        "dtype": str(llm.loaded.dtype).removeprefix("torch."),
        "dtype_reason": llm.loaded.dtype_reason,
        "model": str(llm.path),
        "gpu_memory_gb": settings.gpu_memory_gb,
        "cache_slots": slots,
        "expert_dtype": str(store.format),
        "expert_bytes": store.expert_bytes,
        "total_experts": store.total_experts,
        "expert_mb": store.expert_bytes / 2**20,
        "dense_gb": dense_bytes(llm.loaded.model) / 1e9,
        "dense_dtype": llm.loaded.dense.name or str(llm.loaded.dtype).removeprefix("torch."),
        "dense_path": llm.loaded.dense_path,
        "cost_model_sizes": None if cost is None else asdict(cost),
        "prompts": len(settings.prompts),
        "new_tokens": settings.new_tokens,
        "temperature": settings.temperature,
        "cuda_graphs": {"requested": llm.config.cuda_graphs, "on": llm.options.graph_capture is not None},
        "mobile": {
            "tau": settings.mobile.tau,
            "forced_fallback_rate": settings.mobile.forced_fallback_rate,
            "lookahead": settings.mobile.lookahead,
            "criterion": settings.mobile.criterion,
        },
        "systems": [_json_safe(asdict(s)) for s in systems],
        "predicted": predicted,
        **extra,
    }


def disk_report(llm: LLM, systems: list[SystemResult], load_peak_rss: int | None = None) -> dict:
    """The disk tier's top-level figures: the disk's O_DIRECT probe at the record size, peak RSS (and once loaded), mobile's
    bytes ceiling, and the share of the probe big's decode sustained (disk bytes per token x tok/s)."""
    store = llm.loaded.store
    assert isinstance(store, DiskStore)
    mobile, big = next(s for s in systems if s.name == "mobile"), next(s for s in systems if s.name == "big")
    f = mobile.fallback_rate
    host = llm.planned_slots if llm.host_slots is None else llm.host_slots  # two tiers: the compute cache is the host cache
    probe = disk_probe_gb_s(store)
    return {
        "offload_dir": str(store.directory),
        "filesystem": filesystem_type(store.directory),
        "direct_io": store.direct,
        "record_bytes": store.record_bytes,
        "host_slots": host,
        "host_cache_gb": host * store.record_bytes / 1e9,
        "tiers": 2 if llm.host_slots is None else 3,
        "disk_probe_gb_s": probe,
        "big_decode_share_of_probe": big.disk_decode_gb_s / probe if probe else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "load_peak_rss_bytes": load_peak_rss,
        "mobile_bytes_ceiling": 2 / (1 + f),
        "mobile_over_big": mobile.ratio_to_big,
        "mobile_share_of_ceiling": mobile.ratio_to_big / (2 / (1 + f)),
    }


def disk_probe_gb_s(store: DiskStore, readers: int = DEFAULT_READERS, records: int = 256) -> float:
    """Read throughput of the store's disk at its record size: random records through a reader pool like the engine's."""
    count = min(records, store.total_experts)
    order = torch.randperm(store.total_experts, generator=torch.Generator().manual_seed(1))[:count].tolist()
    buffers = aligned_empty(2 * readers * store.record_bytes).view(2 * readers, store.record_bytes)
    pool = ReadPool(store, readers)
    try:
        start = time.perf_counter()
        futures = []
        for i, index in enumerate(order):
            key = (store.manifest.moe_layers[index // store.num_experts], index % store.num_experts)
            if len(futures) >= 2 * readers:
                futures.pop(0).result()
            futures.append(pool.submit(key, buffers[i % (2 * readers)], Priority.DEMAND))
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - start
    finally:
        pool.close()
    return count * store.record_bytes / 1e9 / elapsed


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _json_safe(d: dict) -> dict:
    """NaN (not applicable) -> None."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


def _mobile_line(mobile: dict, system: dict) -> str:
    """How mobile's fallbacks were decided, and the rate measured."""
    if mobile["forced_fallback_rate"] is not None:
        how = f"forced at rate {mobile['forced_fallback_rate']:g}, evenly spaced (random weights give meaningless confidences)"
    else:
        how = f"where little's {mobile['criterion']} confidence < tau {mobile['tau']:g}"
    precision = system.get("lookahead_precision")
    look = (
        "; lookahead prefetch on" + ("" if precision is None else f" (precision {precision:.0%}: guessed loads the next layer used)")
        if mobile["lookahead"]
        else ""
    )
    return f"mobile fell back on {system['fallback_rate']:.1%} of decode steps: {how}{look}"


def _disk_lines(report: dict) -> str:
    """The disk tier's per-system reads and the top-level figures."""
    d = report["disk"]
    per = "; ".join(
        f"{s['name']} {s['disk_bytes_per_token'] / 1e6:.1f} MB/token at {s['disk_read_gb_s']:.2f} GB/s"
        + (f" ({s['disk_read_gb_s'] / s['disk_probe_gb_s']:.0%} of a probe beside it)" if s.get("disk_probe_gb_s") else "")
        + (f" (host tier served {s['host_tier_hit_rate']:.0%} of loads)" if s.get("host_tier_hit_rate") is not None else "")
        for s in report["systems"]
        if s.get("disk_bytes_per_token") is not None
    )
    host = "host cache" if d["tiers"] == 2 else "host tier"
    return (
        f"disk tier ({d['filesystem']}, {'O_DIRECT' if d['direct_io'] else 'buffered + fadvise'}, {d['record_bytes'] / 2**20:.2f} MiB records, "
        f"{host} {d['host_slots']} experts = {d['host_cache_gb']:.2f} GB): probe {d['disk_probe_gb_s']:.2f} GB/s; {per}\n"
        f"mobile / big = {d['mobile_over_big']:.2f}x against its bytes ceiling 2 / (1 + f) = {d['mobile_bytes_ceiling']:.2f}x "
        f"({d['mobile_share_of_ceiling']:.0%} of it); big's decode sustained {_share(d.get('big_decode_share_of_probe'))} of the probe "
        f"(disk bytes per token x tok/s); peak RSS {d['peak_rss_bytes'] / 2**30:.2f} GiB"
        + ("" if d.get("load_peak_rss_bytes") is None else f" ({d['load_peak_rss_bytes'] / 2**30:.2f} GiB once loaded, before decoding)")
    )


def _share(value: float | None) -> str:
    """A share as a percentage, or '-'."""
    return "-" if value is None else f"{value:.0%}"


def table(report: dict) -> str:
    """Terminal table of a bench report."""
    head = (
        f"{'system':<12} {'tok/s':>8} {'x big':>6} {'TTFT s':>7} {'MB/tok':>7} {'GB/s':>6} {'hit':>6} {'fallbk':>7} {'wait':>6} {'sync/t':>6} "
        f"{'read MB/t':>9} {'roof':>5}  note"
    )
    cpu_kernels = f" ({report['cpu_kernels']} kernels)" if report["device"] == "cpu" and report.get("cpu_kernels") else ""
    title = (
        f"{report['model']} on {report['device']}{cpu_kernels}, {report['dtype']}, {report['threads']} threads, "
        f"memory probe {report['memory_probe_gb_s']:.1f} GB/s, "
        f"experts {report['expert_dtype']} "
        f"({report['expert_bytes'] / 2**20:.3f} MiB each), {report['cache_slots']} of {report['total_experts']} slots; "
        f"median of {report['rounds']} interleaved rounds\ndense {report.get('dense_dtype', '-')}: {report.get('dense_path', '-')}"
    )
    rows = [title, head, "-" * len(head)]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for s in report["systems"]:
        same = s.get("same_tokens_as_big")
        note = s["note"] + ("" if same is None else f"{'; ' if s['note'] else ''}same greedy tokens as big on {same:.0%} of prompts")
        rows.append(
            f"{s['name']:<12} {s['decode_tok_s']:>8.2f} {s['ratio_to_big']:>6.2f} {s['ttft_s']:>7.3f} "
            f"{fmt(None if s['h2d_gb_per_token'] is None else 1e3 * s['h2d_gb_per_token'], '.3f'):>7} {fmt(s['h2d_gbps'], '.1f'):>6} "
            f"{fmt(s['hit_rate'], '.0%'):>6} {s['fallback_rate']:>7.1%} {fmt(s['transfer_wait_share'], '.0%'):>6} {fmt(s['host_syncs_per_token'], '.1f'):>6} "
            f"{fmt(None if s['bytes_per_token'] is None else s['bytes_per_token'] / 1e6, '.0f'):>9} {fmt(s['roofline'], '.0%'):>5}  {note}"
        )
    rows.append(_mobile_line(report["mobile"], next(s for s in report["systems"] if s["name"] == "mobile")))
    if report.get("disk"):
        rows.append(_disk_lines(report))
    rows.append(
        "predicted tok/s (cost model on this run's traces): "
        + "; ".join(
            f"{hw}: big {p['big']:.1f}, mobile {p['mobile']:.1f} ({p['mobile'] / p['big']:.2f}x), little {p['little']:.1f}"
            for hw, p in report["predicted"].items()
            if p["big"]
        )
    )
    return "\n".join(rows)
