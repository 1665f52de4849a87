"""`mobile-moe eval` and `mobile-moe calibrate`: quality of big / little / mobile, and choosing tau."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from mobile_moe.cli.common import (
    add_engine_args,
    add_policy_args,
    add_threads_arg,
    check_flags,
    check_plot_file,
    check_writable_file,
    engine_config_from,
    open_llm,
    parse_criteria,
    parse_taus,
    parse_variants,
    policy_flags,
    policy_from,
)
from mobile_moe.config import CRITERIA, PolicyConfig
from mobile_moe.engine.calibration import calibrated_tau, write_calibration
from mobile_moe.engine.llm import LLM
from mobile_moe.errors import InvalidParameter
from mobile_moe.eval.calibrate import RULES, TAU_GRIDS, Calibration
from mobile_moe.eval.data import DEFAULT_GLOB, read_texts
from mobile_moe.eval.evaluate import EvalSettings, calibrate, calibrate_sources, evaluate
from mobile_moe.eval.report import learned_table, plot_quality, plot_sources, runs_table
from mobile_moe.eval.sources import sources_table, split_source
from mobile_moe.loading.loader import stored_format

DEFAULT_CALIBRATION_CRITERIA = ("margin", "learned")  # margin beat max_prob and entropy at every fallback rate measured


def add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """`eval` and `calibrate`."""
    ev = sub.add_parser("eval", help="quality of big / little / mobile: perplexity, agreement with big, fallback rate")
    ev.add_argument("--data", type=Path, nargs="+", help="text files or directories (default: the demo corpus's test split)")
    ev.add_argument(
        "--source",
        type=Path,
        action="append",
        metavar="PATH",
        help="evaluate each source apart: a file or directory "
        "per source (repeat; 'stdlib' is the demo corpus's test split); tables, JSON and --plot come per source",
    )
    ev.add_argument("--taus", type=parse_taus, help="comma-separated taus for mobile (default: the calibrated tau and its neighbours in the criterion's grid)")
    ev.add_argument("--plot", type=Path, metavar="FILE.png", help="plot agreement, perplexity and fallback rate against tau")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ev.add_argument("--criteria", type=parse_criteria, help="comma-separated criteria to sweep, each around its calibrated tau (default: --criterion's)")
    ev.add_argument(
        "--variants",
        type=parse_variants,
        help="comma-separated little-pass knob settings to compare, each swept like the criteria: "
        "plain, layer-adaptive=SHARE, cache-prior=FACTOR, kv-repair=N, rollback, partial-fallback=SHARE, little-k=N, "
        "or knobs joined by '+' (default: the knob flags)",
    )
    ev.add_argument(
        "--no-reference", action="store_true", help="with quantized experts, skip comparing big with the float-expert big (which loads the model twice)"
    )
    ev.add_argument(
        "--reference-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="compare big with big computed in this dtype with float experts (e.g. bfloat16 against float32; loads the model twice)",
    )
    cal = sub.add_parser("calibrate", help="pick tau on the validation split and store it next to the model")
    cal.add_argument("--target-agreement", type=float, default=0.98, help="greedy agreement with big that mobile must reach (default: 0.98)")
    cal.add_argument("--data", type=Path, nargs="+", help="text files or directories (default: the demo corpus's validation split)")
    cal.add_argument("--taus", type=parse_taus, help="comma-separated taus to try (default: a grid per criterion)")
    cal.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="where to write the calibration (default: mobile_moe.json beside the model; "
        "for the bundled demo model, the user config directory, never the installed package)",
    )
    cal.add_argument(
        "--criteria",
        type=parse_criteria,
        default=DEFAULT_CALIBRATION_CRITERIA,
        help=f"comma-separated criteria to try, among {', '.join(CRITERIA)} (default: {','.join(DEFAULT_CALIBRATION_CRITERIA)})",
    )
    cal.add_argument(
        "--rule",
        choices=RULES,
        default=RULES[0],
        help="lower-bound: the 95%% interval's lower end must meet the target (default); point: the point estimate must",
    )
    cal.add_argument(
        "--source",
        type=Path,
        action="append",
        metavar="PATH",
        help="calibrate across sources: a file or directory per "
        "source (repeat, 3+ recommended; one alone is split at random by file into 3 parts; 'stdlib' is the demo corpus's "
        "validation split); tau is the strictest of the "
        "per-source ones, with leave-one-source-out estimates; --max-prompts applies per source",
    )
    for p, handler, prompts in ((ev, cmd_eval, 120), (cal, cmd_calibrate, 400)):
        p.add_argument("--glob", default=DEFAULT_GLOB, help=f"files read from --data directories (default: {DEFAULT_GLOB})")
        p.add_argument("--max-prompts", type=int, default=prompts, help=f"prompts cut from the data (default: {prompts})")
        p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
        p.add_argument("--ppl-tokens", type=int, default=8192, help="tokens scored for perplexity")
        add_threads_arg(p)
        add_engine_args(p)
        add_policy_args(p)
        p.set_defaults(handler=handler)


def taus_around(criterion: str, tau: float | None, count: int = 5) -> tuple[float, ...]:
    """The `count` taus of the criterion's grid nearest to `tau` (the whole grid's middle without one)."""
    grid = TAU_GRIDS[criterion]
    if tau is None:
        start = max(0, (len(grid) - count) // 2)
        return grid[start : start + count]
    return tuple(sorted(sorted(grid, key=lambda t: abs(t - tau))[:count]))


def cmd_eval(args: argparse.Namespace) -> int:
    """`mobile-moe eval`."""
    check_plot_file(args.plot)
    check_flags(args, configures="mobile")
    if args.source and args.data:
        raise InvalidParameter("give --data or --source, not both")
    if args.source:
        sources = source_texts(args.source, "test", args.glob)
    else:
        texts, data = read_texts(args.data, "test", args.glob)
        sources = {data: texts}  # one report, described by what was read
    llm = open_llm(args)
    policy = policy_from(args, llm)
    sweeps = eval_sweeps(args, llm, policy)
    settings = EvalSettings(sweeps[0][1], args.max_prompts, args.new_tokens, args.ppl_tokens, progress=not args.quiet)
    calibrated = calibrated_tau(llm.calibration, sweeps[0][0].criterion) if args.tau is None else args.tau
    reference = float_reference(llm, args)
    reports = [evaluate(llm, texts, data, settings, sweeps, calibrated, reference) for data, texts in sources.items()]
    if args.json:
        print(json.dumps({"sources": reports} if args.source else reports[0]), flush=True)  # the results first: a plot that fails loses nothing
    else:
        for report in reports:
            print_eval(report)
    if args.plot:
        plot_sources(reports, args.plot) if args.source else plot_quality(reports[0], args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def source_texts(paths: list[Path], split: str, glob: str) -> dict[str, list[str]]:
    """Source name -> its texts, for --source PATH ... ('stdlib': the demo corpus's split); repeated names get a suffix."""
    sources: dict[str, list[str]] = {}
    for path in paths:
        name = "stdlib" if str(path) == "stdlib" else path.name or str(path)
        name = name if name not in sources else f"{name}-{len(sources)}"
        sources[name] = read_texts(None if str(path) == "stdlib" else [path], split, glob)[0]
    return sources


def print_eval(report: dict) -> None:
    """The tables of one evaluated source."""
    ppl = report["perplexity"]
    print(
        f"model {report['model']}, data {report['data']}: {report['prompts']} prompts x {report['new_tokens']} tokens, criterion {report['criterion']}, "
        f"expert cache {report['cache_slots']} of {report['total_experts']}"
    )
    print("agreement is scored from the first decode step (the prefill token is big's for mobile and not counted); CI: 95% bootstrap over prompts")
    print(
        f"experts {report['expert_format']} ({report['expert_bytes'] / 2**10:.1f} KiB each); perplexity on {ppl['tokens']} tokens "
        f"from {ppl['files']} of {ppl['files_total']} files: big {ppl['big']:.3f}, little {ppl['little']:.3f}"
    )
    if ppl["mobile"]:
        mobile = ", ".join(f"tau {tau} {value:.3f} ({value / ppl['big'] - 1:+.2%})" for tau, value in ppl["mobile"].items())
        print(f"mobile perplexity (teacher-forced: each position from the pass mobile would emit it from) vs big: {mobile}")
    if report["big_vs_float_big"]:
        v = report["big_vs_float_big"]
        print(
            f"big vs big in {v['dtype']} with {v['expert_format']} experts: greedy agreement {v['agreement']:.1%} "
            f"(positions {v['agreement_overall']:.1%}, whole continuations {v['exact_match']:.1%})"
        )
    print(runs_table(report["runs"]))


def eval_sweeps(args: argparse.Namespace, llm: LLM, policy: PolicyConfig) -> list[tuple[PolicyConfig, tuple[float, ...]]]:
    """Per (criterion, variant): the resolved mobile policy and its taus (--taus, else the calibrated tau and its grid neighbours)."""
    sweeps = []
    for criterion in args.criteria or (policy.criterion,):
        base = llm.resolve_policy(dataclasses.replace(policy_flags(args), criterion=criterion, tau=args.tau))
        calibrated = calibrated_tau(llm.calibration, criterion) if args.tau is None else args.tau
        taus = tuple(sorted(set(args.taus or taus_around(criterion, calibrated)) | ({calibrated} if calibrated is not None else set())))
        for variant in args.variants or ({},):
            sweeps.append((dataclasses.replace(base, **variant), taus))
    return sweeps


def float_reference(llm: LLM, args: argparse.Namespace) -> LLM | None:
    """The same checkpoint with float experts in --reference-dtype; without it, for quantized experts only, in the compute
    dtype (unless --no-reference or the checkpoint holds no float experts)."""
    config = dataclasses.replace(engine_config_from(args), expert_dtype="auto", group_size=None)
    if args.reference_dtype is not None:
        return LLM(llm.path, dataclasses.replace(config, dtype=args.reference_dtype))
    if not llm.loaded.store.format.quantized or args.no_reference or stored_format(llm.loaded.config) is not None:
        return None
    return LLM(llm.path, config)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """`mobile-moe calibrate`: exit 0 and write the tau, or exit 1 when no tau meets the target."""
    check_writable_file(args.output, "--output")
    check_flags(args, configures="mobile")
    settings = EvalSettings(tuple(args.taus or (0.5,)), args.max_prompts, args.new_tokens, args.ppl_tokens, progress=not args.quiet)
    if args.source:
        return calibrate_by_source(args, settings)
    texts, data = read_texts(args.data, "validation", args.glob)
    llm = open_llm(args)
    base = dataclasses.replace(
        policy_from(args, llm), kv_repair=args.kv_repair or 0, rollback=bool(args.rollback), little_k=args.little_k
    )  # this run's, not the old record's
    bases = [dataclasses.replace(base, criterion=c) for c in args.criteria]
    result, prompts = calibrate(llm, texts, settings, bases, args.target_agreement, grid=args.taus is None, rule=args.rule)
    if result.learned_report:
        print(learned_table(result.learned_report))
    print(runs_table([r.to_dict() for r in result.runs]))
    if result.chosen is None:
        best = max(result.runs, key=lambda r: r.agreement)
        print(
            f"no tau meets the target agreement {args.target_agreement:.1%} under rule {args.rule} "
            f"(best: {best.criterion} tau {best.tau:g} with {best.agreement:.1%} at fallback rate {best.fallback_rate:.1%}); nothing written"
        )
        return 1
    file = write_calibration(
        llm.path,
        result.record(prompts, data, str(llm.loaded.dtype).removeprefix("torch."), base.kv_repair or 0, bool(base.rollback), base.little_k),
        args.output,
    )
    c = result.chosen
    lo, hi = c.agreement_ci
    print(
        f"calibrated {c.criterion} tau {c.tau:g}: agreement {c.agreement:.2%} (95% CI {lo:.2%}-{hi:.2%}; "
        f"target {args.target_agreement:.1%}, rule {args.rule}), "
        f"fallback rate {c.fallback_rate:.1%}; written to {file}"
    )
    return 0


def calibrate_by_source(args: argparse.Namespace, settings: EvalSettings) -> int:
    """`calibrate --source A --source B ...`: per-source taus, the strictest of them, leave-one-source-out estimates."""
    if args.data:
        raise InvalidParameter("give --data or --source, not both")
    sources = source_texts(args.source, "validation", args.glob)
    data = "sources: " + ", ".join(sources)
    if len(sources) == 1:
        ((name, texts),) = sources.items()
        sources = split_source(name, texts)
        data = f"one source ({name}) split at random by file into {len(sources)} parts"
        logging.getLogger("mobile_moe").warning(
            f"one source only ({name}): calibrating across a seeded random split of its {len(texts)} files into {len(sources)} parts, "
            "so the held-out figures are for unseen files of this source, not unseen code (give three or more --source for that)"
        )
    llm = open_llm(args)
    base = dataclasses.replace(
        policy_from(args, llm), kv_repair=args.kv_repair or 0, rollback=bool(args.rollback), little_k=args.little_k
    )  # this run's, not the old record's
    bases = [dataclasses.replace(base, criterion=c) for c in args.criteria]
    calibrations, chosen, learned = calibrate_sources(llm, sources, settings, bases, args.target_agreement, grid=args.taus is None, rule=args.rule)
    print(sources_table(calibrations, args.target_agreement))
    if chosen is None or chosen.pooled is None:
        print(f"no candidate tau meets the target agreement {args.target_agreement:.1%} on every source under rule {args.rule}; nothing written")
        return 1
    result = Calibration(args.target_agreement, chosen.pooled, [c.pooled for c in calibrations if c.pooled is not None], args.rule, learned)
    record = result.record(
        sum(r.prompts for r in chosen.rows), data, str(llm.loaded.dtype).removeprefix("torch."), base.kv_repair or 0, bool(base.rollback), base.little_k
    )
    record["sources"] = [c.to_dict() for c in calibrations]
    file = write_calibration(llm.path, record, args.output)
    worst = min((r.held_out for r in chosen.rows if r.held_out is not None), key=lambda r: r.agreement, default=None)
    held = "" if worst is None else f"; worst held-out source {worst.agreement:.2%} at fallback rate {worst.fallback_rate:.1%}"
    print(
        f"calibrated {chosen.criterion} tau {chosen.final_tau:g} across {len(sources)} sources: agreement {chosen.pooled.agreement:.2%}, "
        f"fallback rate {chosen.pooled.fallback_rate:.1%}{held}; written to {file}"
    )
    return 0
