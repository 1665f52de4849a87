"""`mobile-moe bench`: decode speed of every system on the same prompts and budget, or a batch-size sweep."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from transformers import PretrainedConfig

from mobile_moe.bench.bench import BenchSettings, default_prompts, peak_rss_bytes, run_accelerate, run_bench, table
from mobile_moe.bench.synthetic import SHAPES, build_synthetic, full_size_cost, synthetic_config, synthetic_expert_numel
from mobile_moe.cli.common import (
    add_engine_args,
    add_policy_args,
    add_threads_arg,
    check_flags,
    check_plot_file,
    check_writable_dir,
    check_writable_file,
    engine_config_from,
    model_dir,
    open_llm,
    parse_sizes,
    policy_from,
    set_threads,
)
from mobile_moe.config import EngineConfig, PolicyConfig
from mobile_moe.engine.calibration import demo_fallback_rate
from mobile_moe.engine.llm import LLM, resolve_device
from mobile_moe.errors import InvalidParameter
from mobile_moe.experts.disk import filesystem_type
from mobile_moe.experts.formats import ExpertFormat, make_format
from mobile_moe.experts.host_memory import available_memory_bytes
from mobile_moe.jsonio import write_json_atomic
from mobile_moe.loading.budget import GIB, SlotPlan, host_plan_for_config, plan_for_config
from mobile_moe.loading.checkpoint import read_config
from mobile_moe.models.registry import build_model


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`bench`."""
    b = sub.add_parser("bench", help="decode speed of big / mobile / little / resident / transformers / transformers+accelerate, same prompts and budget")
    b.add_argument("--synthetic", choices=list(SHAPES), help="random weights with the shapes of a public model (instead of --model)")
    b.add_argument(
        "--shrink",
        type=int,
        default=1,
        metavar="N",
        help="with --synthetic: divide every width (not layers, experts or top-k) by N to fit a small machine (default: 1)",
    )
    b.add_argument("--layers", type=int, metavar="N", help="with --synthetic: keep the first N decoder layers (a quick rehearsal; default: all)")
    b.add_argument("--prompts", type=int, default=4, help="prompts per system and round (default: 4)")
    b.add_argument(
        "--prompt-tokens",
        type=int,
        metavar="N",
        help="tokens per prompt: at most N of the corpus's, or N random ids for synthetic models (default: 128 and 64)",
    )
    b.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default: 32)")
    b.add_argument("--fallback-rate", type=float, help="drive mobile's fallbacks at this rate (default for synthetic: the demo model's calibrated rate)")
    b.add_argument("--lookahead", action="store_true", help="prefetch layer l+1's experts from layer l's hidden state")
    b.add_argument("--skip-accelerate", action="store_true", help="do not run the transformers + accelerate offloaded baseline (cuda)")
    b.add_argument("--skip-transformers", action="store_true", help="do not run transformers' generate on the whole model")
    b.add_argument(
        "--accelerate-only",
        action="store_true",
        help="run only the transformers + accelerate offloaded baseline "
        "(on cpu: transformers' generate, nothing to offload); building it at real size is slow, so it is a run of its own",
    )
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every system; speeds are medians (default 3)")
    add_threads_arg(b)
    b.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the report as JSON (rewritten as each system finishes; `complete` says whether every system ran)"
    )
    b.add_argument("--trace-dir", type=Path, help="write each system's expert-access trace (JSONL) here")
    b.add_argument(
        "--batch",
        type=parse_sizes,
        metavar="SIZES",
        help="instead: aggregate tok/s and expert bytes per generated token of big and mobile at each batch size, e.g. 1,2,4,8,16 (prompts decoded together)",
    )
    b.add_argument(
        "--batch-little",
        choices=["auto", "always"],
        default="auto",
        help="with --batch: mobile rows decode little first only where measured cheaper (auto), or always (default: auto)",
    )
    b.add_argument(
        "--shared-prefix",
        type=int,
        metavar="N",
        help="instead: time to first token of an N-token prompt plus 24 new tokens, cold and after the N-token prompt was served "
        "(prefix reuse), through generate and the server's engine worker",
    )
    b.add_argument("--plot", type=Path, metavar="FILE", help="with --batch: a PNG of speed and expert traffic against batch size")
    b.add_argument(
        "--drafts",
        action="store_true",
        help="instead: what exact mode's draft-and-verify cycle costs (little's acceptance, big passes over 1..9 positions, "
        "the experts they touch), its modelled and measured speed over big for drafts of 1..8 tokens, and predicted per GPU and disk profile",
    )
    b.add_argument(
        "--accept-rate",
        type=parse_rates,
        metavar="RATES",
        help="with --drafts --synthetic: run exact mode (--draft-max tokens, default 8) beside big with each drafted token kept at each "
        "rate, e.g. 0.91,0.8 (random weights: little's agreement says nothing), and the first rate without prefetching while drafting; "
        "measured, modelled and replayed",
    )
    b.add_argument(
        "--plan-only", action="store_true", help="print how the budget splits into dense weights, KV cache and expert slots, then exit without loading"
    )
    add_engine_args(b)
    add_policy_args(b)
    b.set_defaults(handler=cmd_bench)


def full_size_format(args: argparse.Namespace) -> ExpertFormat:
    """The expert format the full-width prediction assumes: the benchmarked one, bf16 for `auto`."""
    return make_format(args.expert_dtype, torch.bfloat16, args.group_size)


def check_synthetic_fits(args: argparse.Namespace, plan: SlotPlan, expert_numel: int) -> None:
    """On the CPU, refuse a synthetic model whose copies (store, a smaller cache's own slots, transformers' model) would not
    fit in memory; a cache of every expert (`resident`) is the store itself."""
    available = available_memory_bytes()
    experts = plan.total_experts * plan.expert_bytes  # packed
    float_size = 4 if args.dtype in ("auto", "float32") else 2
    transformers_copy = 0 if args.skip_transformers else plan.dense_bytes + plan.total_experts * expert_numel * float_size
    slots = plan.slots * plan.expert_bytes if plan.slots < plan.total_experts else 0
    need = plan.dense_bytes + experts + slots + transformers_copy
    if available is not None and need > 0.9 * available:
        raise InvalidParameter(
            f"synthetic {args.synthetic} at --shrink {args.shrink} needs about {need / GIB:.1f} GiB of memory on the cpu "
            f"({available / GIB:.1f} GiB available): raise --shrink, use --expert-dtype int4, or add --skip-transformers"
        )


def check_on_disk(directory: Path) -> None:
    """Bench measures a disk tier only where the store really is on a disk."""
    kind = filesystem_type(directory)
    if kind in ("tmpfs", "ramfs"):
        raise InvalidParameter(f"--offload-dir {directory} is in memory ({kind}): bench reports a disk tier only on a disk")


def bench_plan(args: argparse.Namespace, model_cfg: PretrainedConfig, plan: SlotPlan) -> tuple[SlotPlan, str]:
    """The slot plan bench runs with and a note on why it is not the engine's: on the CPU without a budget, three quarters offloaded."""
    if args.expert_cache is not None or args.gpu_memory is not None or args.host_memory is not None or torch.device(args.device).type != "cpu":
        return plan, ""
    with torch.device("meta"):
        top_k = build_model(model_cfg).info.top_k
    slots = min(max(top_k, plan.total_experts // 4), plan.total_experts)
    return dataclasses.replace(plan, slots=slots), " (bench's default on cpu without a budget: three quarters offloaded)"


def check_bench_args(args: argparse.Namespace) -> None:
    """bench's flags, in one line each, before anything loads."""
    if args.prompts < 1 or args.new_tokens < 2 or args.rounds < 1 or (args.prompt_tokens is not None and args.prompt_tokens < 1):
        raise InvalidParameter("--prompts, --prompt-tokens and --rounds must be >= 1 and --new-tokens >= 2")
    if args.layers is not None and not args.synthetic:
        raise InvalidParameter("--layers cuts a --synthetic shape; give --synthetic too")
    check_writable_file(args.json, "--json")
    check_plot_file(args.plot)
    check_flags(args, configures="exact" if args.drafts else "mobile")
    check_writable_dir(args.trace_dir, "--trace-dir")
    if args.plot is not None and args.batch is None:
        raise InvalidParameter("bench --plot draws the --batch sweep; give --batch too")
    if args.accelerate_only and args.batch:
        raise InvalidParameter("give --accelerate-only or --batch, not both")
    if args.drafts and (args.batch or args.accelerate_only):
        raise InvalidParameter("bench --drafts is a run of its own: give it without --batch or --accelerate-only")
    if args.drafts and bool(args.synthetic) != (args.accept_rate is not None):
        raise InvalidParameter(
            "bench --drafts measures little's acceptance on real weights; on --synthetic (random) weights give the rates to force with --accept-rate"
        )
    if args.accept_rate is not None and not args.drafts:
        raise InvalidParameter("--accept-rate forces exact mode's acceptance in bench --drafts: give --drafts --synthetic too")
    if args.shared_prefix is not None and (args.shared_prefix < 1 or args.batch or args.accelerate_only):
        raise InvalidParameter("--shared-prefix N needs N >= 1 and neither --batch nor --accelerate-only")
    if args.synthetic and args.model:
        raise InvalidParameter("give --model or --synthetic, not both")


def cmd_bench(args: argparse.Namespace) -> int:
    """`mobile-moe bench`."""
    check_bench_args(args)
    args.max_batch = max(args.batch) if args.batch else 1  # the memory plan holds the KV of the largest batch
    set_threads(args.threads)
    config = engine_config_from(args)
    model_cfg = synthetic_config(args.synthetic, args.shrink, args.layers) if args.synthetic else read_config(model_dir(args.model, args.quiet))
    plan, why = bench_plan(args, model_cfg, plan_for_config(model_cfg, config))
    if args.offload_dir is not None:
        check_on_disk(Path(args.offload_dir))
    if args.synthetic and args.device == "cpu" and not args.plan_only and args.offload_dir is None:
        check_synthetic_fits(args, plan, synthetic_expert_numel(model_cfg))
    print(
        f"{args.synthetic or model_dir(args.model)} on {args.device}: {plan.describe()}{why}", file=sys.stderr if not args.plan_only else sys.stdout, flush=True
    )
    if args.plan_only:
        return 0
    llm = bench_llm(args, config, model_cfg)
    load_rss = peak_rss_bytes()  # the load's own peak (a store built here included), before any system decodes
    if why:
        llm.planned_slots = plan.slots  # the line printed above, not the engine's every-expert CPU default
    rate = args.fallback_rate
    if rate is None and args.synthetic:
        rate = demo_fallback_rate()
    policy = dataclasses.replace(policy_from(args, llm), name="mobile", forced_fallback_rate=rate, lookahead=args.lookahead)
    if args.batch:
        return bench_batches(args, llm, policy)
    if args.drafts:
        return bench_accept_rates(args, llm, load_rss) if args.synthetic else bench_drafts(args, llm)
    if args.shared_prefix is not None:
        return bench_shared_prefix(args, llm, policy)
    cost = full_size_cost(args.synthetic, full_size_format(args), args.layers) if args.synthetic and args.shrink > 1 else None  # the real widths
    settings = BenchSettings(
        bench_prompts(args, llm, args.prompts),
        args.new_tokens,
        policy,
        args.gpu_memory,
        not args.skip_accelerate,
        args.trace_dir,
        cost,
        temperature=1.0 if args.synthetic else 0.0,
        progress=not args.quiet,
        rounds=args.rounds,
        run_transformers=not args.skip_transformers,
        load_peak_rss_bytes=load_rss,
    )
    if args.accelerate_only:
        report = run_accelerate(llm, settings)
        print(f"accelerate: {report['systems'][0]['decode_tok_s']:.2f} tok/s, TTFT {report['systems'][0]['ttft_s']:.3f} s ({report['systems'][0]['note']})")
        return _write(args.json, report)
    report = run_bench(llm, settings, on_update=lambda r: _write(args.json, _noted(r, rate)))
    print(table(_noted(report, rate)))
    return 0


def bench_llm(args: argparse.Namespace, config: EngineConfig, model_cfg: PretrainedConfig) -> LLM:
    """The benchmarked engine: a synthetic model (its RAM plan printed and checked first when its experts go to disk) or --model."""
    if not args.synthetic:
        return open_llm(args)
    if args.offload_dir is not None:
        host = host_plan_for_config(model_cfg, config)
        print(f"{args.synthetic}: {host.describe()}", file=sys.stderr, flush=True)
        host.check()
    loaded = build_synthetic(
        args.synthetic,
        resolve_device(args.device),
        args.dtype,
        args.shrink,
        expert_dtype=args.expert_dtype,
        group_size=args.group_size,
        fused_kernels=not args.reference_kernels,
        offload_dir=None if args.offload_dir is None else Path(args.offload_dir),
        direct_io=not args.buffered_io,
        layers=args.layers,
        dense_dtype=args.dense_dtype,
    )
    return LLM(loaded, config)


def _noted(report: dict, rate: float | None) -> dict:
    """The report with how mobile's fallbacks were driven, when forced."""
    if rate is not None:
        report["mobile"]["note"] = f"fallbacks driven at rate {rate:g}, evenly spaced (random weights give meaningless confidences)"
    return report


def _write(path: Path | None, report: dict) -> int:
    """Write the report to --json, when given (atomically: a run stopped midway leaves the last whole report)."""
    if path is not None:
        write_json_atomic(path, report)
    return 0


def bench_prompts(args: argparse.Namespace, llm: LLM, count: int) -> list[list[int]]:
    """`count` prompts, `--prompt-tokens` long when given."""
    if args.prompt_tokens is None:
        return default_prompts(llm, count)
    return default_prompts(llm, count, max_len=args.prompt_tokens, random_len=args.prompt_tokens)


def bench_accept_rates(args: argparse.Namespace, llm: LLM, load_rss: int) -> int:
    """`bench --drafts --synthetic S --accept-rate P,...`: big and exact mode at each forced rate, interleaved (and JSON)."""
    from mobile_moe.bench.accept_rate import accept_rates_table, run_accept_rates
    from mobile_moe.bench.costinputs import count_decode_ops, dequant_traffic, model_cost
    from mobile_moe.bench.profiles import PROFILES, disk_profiles
    from mobile_moe.bench.roofline import memory_probe_gb_s

    store = llm.loaded.store
    cost = model_cost(llm.loaded.model, store.expert_bytes, count_decode_ops(llm), dequant_bytes=dequant_traffic(store.layout, llm.loaded.dtype))
    disk = llm.reader is not None
    if disk:
        from mobile_moe.bench.bench import disk_probe_gb_s

        profiles = disk_profiles(disk_probe_gb_s(store), memory_probe_gb_s())  # type: ignore[arg-type]
    else:
        profiles = dict(PROFILES)
    settings = BenchSettings(
        bench_prompts(args, llm, args.prompts), args.new_tokens, PolicyConfig("big"), None, rounds=args.rounds, load_peak_rss_bytes=load_rss
    )
    report = run_accept_rates(llm, settings, args.accept_rate, args.draft_max or 8, cost, profiles, probe=disk, prefetch=not args.no_prefetch)
    print(accept_rates_table(report))
    report |= {"threads": torch.get_num_threads(), "cache_slots": llm.planned_slots, "total_experts": store.total_experts, "synthetic": args.synthetic}
    if disk:
        report["disk_probe_gb_s"] = profiles["this-disk"].link_gbps
    return _write(args.json, report)


def parse_rates(text: str) -> list[float]:
    """'0.91,0.8' -> [0.91, 0.8], each in [0, 1]."""
    try:
        rates = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"acceptance rates must be comma-separated numbers, got {text!r}") from None
    if not rates or not all(0.0 <= r <= 1.0 for r in rates):
        raise argparse.ArgumentTypeError(f"acceptance rates must be in [0, 1], got {text!r}")
    return rates


def bench_drafts(args: argparse.Namespace, llm: LLM) -> int:
    """`bench --drafts`: exact mode's cycle measured and modelled (greedy: real weights, not --synthetic)."""
    from mobile_moe.bench.costinputs import count_decode_ops, dequant_traffic, model_cost
    from mobile_moe.bench.drafts import drafts_json, drafts_table, run_drafts
    from mobile_moe.bench.profiles import PROFILES, disk_profiles
    from mobile_moe.bench.roofline import memory_probe_gb_s

    store, info = llm.loaded.store, llm.info
    cost = model_cost(llm.loaded.model, store.expert_bytes, count_decode_ops(llm), dequant_bytes=dequant_traffic(store.layout, llm.loaded.dtype))
    profiles = dict(PROFILES) | {k: v for k, v in disk_profiles(float("nan"), memory_probe_gb_s()).items() if k != "this-disk"}
    scaled = None
    if (info.num_experts, info.top_k) == (64, 8):  # OLMoE-1B-7B's routing shape: replay at its widths, int4, a quarter cached
        layers = len(llm.loaded.model.model.layers)
        scaled = (full_size_cost("olmoe-1b-7b", make_format("int4", torch.bfloat16, None), layers), store.total_experts // 4)
    costs = run_drafts(llm, bench_prompts(args, llm, args.prompts), args.new_tokens, llm.planned_slots, cost, profiles, scaled=scaled)
    print(drafts_table(costs))
    report = drafts_json(costs) | {"threads": torch.get_num_threads(), "cache_slots": llm.planned_slots, "total_experts": store.total_experts}
    return _write(args.json, report)


def bench_shared_prefix(args: argparse.Namespace, llm: LLM, policy: PolicyConfig) -> int:
    """`bench --shared-prefix N`: time to first token with and without prefix reuse, as lines (and JSON)."""
    from mobile_moe.bench.shared_prefix import run_shared_prefix, shared_prefix_table

    report = run_shared_prefix(llm, args.shared_prefix, args.new_tokens, llm.resolve_policy(policy), args.rounds)
    print(shared_prefix_table(report))
    return _write(args.json, report)


def bench_batches(args: argparse.Namespace, llm: LLM, mobile: PolicyConfig) -> int:
    """`bench --batch`: the batch-size sweep, as a table (and JSON, PNG)."""
    from mobile_moe.bench.batching import batch_table, plot_batches, run_batch_bench

    def noted(report: dict) -> dict:
        report["threads"] = torch.get_num_threads()
        if mobile.forced_fallback_rate is not None:
            report["mobile_note"] = f"fallbacks driven at rate {mobile.forced_fallback_rate:g}, evenly spaced (random weights give meaningless confidences)"
        return report

    report = noted(
        run_batch_bench(
            llm,
            bench_prompts(args, llm, max(args.batch)),
            args.batch,
            args.new_tokens,
            mobile,
            llm.planned_slots,
            1.0 if args.synthetic else 0.0,
            args.rounds,
            on_update=lambda r: _write(args.json, noted(r)),
        )
    )
    print(batch_table(report))
    _write(args.json, report)
    if args.plot:
        plot_batches(report, args.plot)
    return 0
