"""Command line: `mobile-moe generate | eval | calibrate | bench | quantize | serve | chat`. Entry point only: parse, call the API, print."""

from __future__ import annotations

import argparse
import dataclasses
import os
import json
import logging
import socket
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import torch
from transformers import PretrainedConfig

from mobile_moe.bench.bench import BenchSettings, default_prompts, run_bench, table
from mobile_moe.bench.synthetic import SHAPES, build_synthetic, full_size_cost, synthetic_config, synthetic_expert_numel
from mobile_moe.chat import chat
from mobile_moe.config import CRITERIA, EXPERT_DTYPES, POLICIES, EngineConfig, PolicyConfig, SamplingParams
from mobile_moe.engine.budget import GIB, SlotPlan, plan_for_config
from mobile_moe.engine.calibration import (
    DEFAULT_TAU,
    DEMO_MODEL,
    calibrated_tau,
    demo_fallback_rate,
    write_calibration,
)
from mobile_moe.engine.checkpoint import read_config
from mobile_moe.engine.hub import parse_hub_id, resolve_model
from mobile_moe.experts.disk import filesystem_type
from mobile_moe.engine.llm import LLM, engine_config, resolve_device
from mobile_moe.engine.loader import load, stored_format
from mobile_moe.engine.quantize import quantize_checkpoint
from mobile_moe.errors import CheckpointError, InvalidParameter, MobileMoeError
from mobile_moe.experts.formats import DEFAULT_GROUP_SIZE, ExpertFormat, make_format
from mobile_moe.eval.data import DEFAULT_GLOB, read_texts
from mobile_moe.eval.evaluate import EvalSettings, calibrate, calibrate_sources, evaluate
from mobile_moe.eval.sources import sources_table, split_source
from mobile_moe.eval.calibrate import RULES, TAU_GRIDS, Calibration
from mobile_moe.eval.report import learned_table, plot_quality, plot_sources, runs_table
from mobile_moe.jsonio import write_json_atomic
from mobile_moe.models.registry import build_model


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        """One line, no usage dump."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model, device and cache flags every command shares."""
    p.add_argument("--model", help="checkpoint directory, or ORG/NAME[@REVISION] on the Hugging Face hub (default: the bundled demo model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="compute dtype (default auto: on cpu bf16 for models over 200M parameters where the CPU has native bf16, else float32; "
                        "on cuda the checkpoint's)")
    p.add_argument("--expert-dtype", default="auto", choices=EXPERT_DTYPES,
                   help="how routed experts are stored in host memory and moved (default auto: the compute dtype, or what a quantized checkpoint holds)")
    p.add_argument("--reference-kernels", action="store_true",
                   help="quantized experts: dequantize then matmul (the tested reference path) instead of fused weight-only kernels")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile'd layer segments (CPU): faster decoding after a warm-up of seconds on the first request")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="cuda, every expert resident: replay each decode pass from a captured CUDA graph (one launch instead of hundreds)")
    p.add_argument("--group-size", type=int, metavar="G", help=f"int4 experts: weights per scale/zero group along the input dim (default {DEFAULT_GROUP_SIZE})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--expert-cache", type=int, metavar="N", help="device expert cache size, in experts")
    size.add_argument("--gpu-memory", type=float, metavar="GB", help="device memory budget for dense weights + KV cache + expert slots")
    p.add_argument("--offload-dir", metavar="DIR",
                   help="keep routed experts in an on-disk store in DIR (built there on first use, reused after) and read them on demand")
    p.add_argument("--host-memory", type=float, metavar="GB", help="with --offload-dir: RAM for cached experts (on CPU, the compute cache)")
    p.add_argument("--buffered-io", action="store_true", help="with --offload-dir: read through the page cache instead of O_DIRECT")
    p.add_argument("--eviction", default="lru", choices=["lru", "lfu"], help="expert cache eviction policy (default: lru)")
    p.add_argument("--max-context", type=int, default=4096, metavar="N",
                   help="longest prompt + generation; a --gpu-memory budget reserves this many tokens of KV cache (default: 4096)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """How tokens are drawn (generate and chat)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"tokens to generate at most (default: {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int, help="random seed for sampling, in [0, 2**64) (default: none)")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """MoBiLE policy flags."""
    p.add_argument("--policy", default="big", choices=POLICIES, help="big: all top-k experts; little: the better half; mobile: little, big where unsure (default: big)")
    p.add_argument("--tau", type=float, help=f"confidence threshold for mobile (default: calibrated, else {DEFAULT_TAU})")
    p.add_argument("--criterion", choices=CRITERIA, help="importance criterion for mobile (default: calibrated, else max_prob)")
    p.add_argument("--little-weights", default="native", choices=["native", "rescale"], help="little's expert weights: the architecture's own rule, or rescaled to big's sum (default: native)")
    p.add_argument("--little-k", type=int, metavar="N", help="experts per token of the little model, 1 <= N < top-k (default: what "
                   "the model's calibration was made with, else half of top-k, rounded up)")
    p.add_argument("--prefill", choices=["big", "little"], help="experts for the prompt (default: little for policy little, else big)")
    p.add_argument("--no-prefetch", action="store_true", help="do not prefetch the other-half experts before a fallback")
    p.add_argument("--layer-adaptive", type=float, metavar="SHARE", help="little decode: a layer uses all top-k experts when the dropped half "
                   "carries more than this share of the routing weight (default: off)")
    p.add_argument("--cache-prior", type=float, metavar="FACTOR", help="little decode: swap a kept expert that is not cached for a cached "
                   "dropped one scoring within this factor of it (default: off)")
    p.add_argument("--kv-repair", type=int, metavar="N", help="mobile: on a fallback, big also recomputes up to N earlier "
                   "positions whose KV entries little wrote (default: what the model's calibration was made with, else 0)")
    p.add_argument("--partial-fallback", type=float, metavar="SHARE", help="mobile: a fallback's big pass starts at the first "
                   "MoE layer where little dropped more than this share of the routing weight (else where it dropped most); the "
                   "layers before keep little's output (default: off, every layer)")
    p.add_argument("--rollback", action="store_true", default=None, help="mobile, greedy, with --kv-repair: big also checks little's "
                   "tokens at the repaired positions and takes back those from the first it disagrees with (streamed tokens wait "
                   "up to N positions; default: as the model's calibration was made)")


def build_parser() -> Parser:
    """The full command-line interface."""
    parser = Parser(prog="mobile-moe", description="Offloaded MoE inference with MoBiLE big/little decoding.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    gen = sub.add_parser("generate", help="generate a continuation of a prompt")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    add_sampling_args(gen, max_new_tokens=64)
    gen.add_argument("--json", action="store_true", help="print one JSON object with token ids, text and stats")
    add_engine_args(gen)
    add_policy_args(gen)
    gen.set_defaults(handler=cmd_generate)
    add_eval_parsers(sub)
    add_bench_parser(sub)
    add_quantize_parser(sub)
    add_serve_parser(sub)
    add_chat_parser(sub)
    return parser


def add_chat_parser(sub: argparse._SubParsersAction) -> None:
    """`chat`."""
    c = sub.add_parser("chat", help="talk to the model in the terminal, replies streamed token by token")
    add_sampling_args(c, max_new_tokens=256)
    add_engine_args(c)
    add_policy_args(c)
    c.set_defaults(handler=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    """`mobile-moe chat`."""
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed, stop_at_eos=True)
    llm = open_llm(args)
    llm.chat_prompt([{"role": "user", "content": "x"}])  # no chat template: a one-line error now, not after the first message
    return chat(llm, sampling, policy_from(args, llm))


SERVE_SWITCH_INTERVAL_S = 2e-4  # the HTTP thread hands the GIL back to the engine sooner: +5% tok/s under 16 streams (measured)
DEFAULT_MAX_BATCH = 16  # the server's rows: 16 concurrent demo streams decode at 4x one stream's rate on 2 CPU cores


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """`serve`."""
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions and chat, streaming) over one engine worker",
                       description="OpenAI-compatible HTTP server (completions and chat, streaming) over one engine worker. "
                       "A request without `temperature` samples at temperature 1.0, as OpenAI's API does, unlike generate and chat, "
                       "which default to greedy decoding (--temperature 0): send \"temperature\": 0 for greedy replies.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health")
    s.add_argument("--max-queue", type=int, default=64, help="requests running or waiting at most; more get HTTP 429 (default: 64)")
    s.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask (default: 1024)")
    s.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"requests decoded together (continuous batching; the memory plan reserves KV for N rows) (default: {DEFAULT_MAX_BATCH})")
    s.add_argument("--threads", type=int, metavar="N", help="torch CPU threads for the engine (default: one fewer than the cores, at least 1: "
                   "the HTTP side keeps a core; on 2 cores, 16 streams decoded 1.9x faster with 1 thread than with 2)")
    s.add_argument("--batch-little", choices=["auto", "always"], default="auto",
                   help="at batch >= 2, mobile requests decode little first only where measured cheaper than big (auto), or always (default: auto)")
    add_engine_args(s)
    add_policy_args(s)
    s.set_defaults(handler=cmd_serve)


def check_bindable(host: str, port: int) -> None:
    """Raise InvalidParameter unless a server could listen on host:port now."""
    if not 0 < port < 65536:
        raise InvalidParameter(f"--port must be between 1 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InvalidParameter(f"--host {host}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as e:
            raise InvalidParameter(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    """`mobile-moe serve`: runs until interrupted."""
    if args.max_queue < 1 or args.max_tokens_cap < 1 or args.max_batch < 1 or (args.threads is not None and args.threads < 1):
        raise InvalidParameter("--max-queue, --max-tokens-cap, --max-batch and --threads must be >= 1")
    try:
        import prometheus_client  # noqa: F401 (the server's /metrics)
        import uvicorn

        from mobile_moe.serve.app import create_app
        from mobile_moe.serve.worker import EngineWorker
    except ImportError as e:
        raise InvalidParameter(f"serving needs the [serve] extra: pip install 'mobile-moe[serve]' ({e.name} is missing)") from None
    check_bindable(args.host, args.port)  # a bad or busy port fails in one line, before the model loads
    sys.setswitchinterval(SERVE_SWITCH_INTERVAL_S)
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) - 1))
    llm = open_llm(args)
    defaults = policy_flags(args)
    hub = parse_hub_id(str(args.model)) if args.model and not Path(args.model).exists() else None
    name = hub[0] if hub else llm.path.name  # a hub model is served under its repo id, a directory under its name
    app = create_app(llm, EngineWorker(llm, args.max_queue, args.max_batch), str(name), args.api_key, args.max_tokens_cap, defaults)
    print(f"serving {llm.path} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    """`quantize`."""
    q = sub.add_parser("quantize", help="write a copy of a checkpoint with its routed experts packed as int8 or int4")
    q.add_argument("--model", help="source checkpoint directory, or ORG/NAME[@REVISION] on the Hugging Face hub (default: the bundled demo model)")
    q.add_argument("--to", required=True, choices=["int8", "int4", "mxfp4"], help="expert format")
    q.add_argument("--group-size", type=int, metavar="G", help=f"int4: weights per scale/zero group along the input dim (default {DEFAULT_GROUP_SIZE})")
    dest = q.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, help="new checkpoint directory to write (must not exist)")
    dest.add_argument("--offload-dir", type=Path, metavar="DIR",
                      help="build the on-disk expert store that `--offload-dir DIR` reads, in this format (records in the layout --dtype computes with)")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="with --offload-dir: the compute dtype the store is laid out for (default auto, as generate picks it)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(handler=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    """`mobile-moe quantize`."""
    if args.offload_dir is not None:
        loaded = load(model_dir(args.model, args.quiet), torch.device("cpu"), args.dtype, not args.quiet, args.to, args.group_size, offload_dir=args.offload_dir)
        store = loaded.store
        print(f"expert store for {loaded.path}: {store.total_experts} experts ({store.format}, {loaded.dtype_reason}) in {args.offload_dir}")
        return 0
    r = quantize_checkpoint(model_dir(args.model, args.quiet), args.out, args.to, args.group_size, progress=not args.quiet)
    detail = ", ".join(f"{k} {v}" for k, v in r.expert_format.items() if k not in ("quant_method", "modules"))
    print(f"packed {r.experts} experts ({detail}): {r.source_expert_bytes / 2**20:.1f} MiB -> {r.packed_expert_bytes / 2**20:.1f} MiB; written to {r.out}")
    return 0


def add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """`eval` and `calibrate`."""
    ev = sub.add_parser("eval", help="quality of big / little / mobile: perplexity, agreement with big, fallback rate")
    ev.add_argument("--data", type=Path, nargs="+", help="text files or directories (default: the demo corpus's test split)")
    ev.add_argument("--source", type=Path, action="append", metavar="PATH", help="evaluate each source apart: a file or directory "
                    "per source (repeat; 'stdlib' is the demo corpus's test split); tables, JSON and --plot come per source")
    ev.add_argument("--taus", type=parse_taus, help="comma-separated taus for mobile (default: the calibrated tau and its neighbours in the criterion's grid)")
    ev.add_argument("--plot", type=Path, metavar="FILE.png", help="plot agreement, perplexity and fallback rate against tau")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ev.add_argument("--criteria", type=parse_criteria, help="comma-separated criteria to sweep, each around its calibrated tau (default: --criterion's)")
    ev.add_argument("--variants", type=parse_variants, help="comma-separated little-pass knob settings to compare, each swept like the criteria: "
                    "plain, layer-adaptive=SHARE, cache-prior=FACTOR, kv-repair=N, rollback, partial-fallback=SHARE, little-k=N, or knobs joined by '+' (default: the knob flags)")
    ev.add_argument("--no-reference", action="store_true", help="with quantized experts, skip comparing big with the float-expert big (which loads the model twice)")
    ev.add_argument("--reference-dtype", choices=["float32", "bfloat16", "float16"],
                    help="compare big with big computed in this dtype with float experts (e.g. bfloat16 against float32; loads the model twice)")
    cal = sub.add_parser("calibrate", help="pick tau on the validation split and store it next to the model")
    cal.add_argument("--target-agreement", type=float, default=0.98, help="greedy agreement with big that mobile must reach (default: 0.98)")
    cal.add_argument("--data", type=Path, nargs="+", help="text files or directories (default: the demo corpus's validation split)")
    cal.add_argument("--taus", type=parse_taus, help="comma-separated taus to try (default: a grid per criterion)")
    cal.add_argument("--output", type=Path, metavar="FILE", help="where to write the calibration (default: mobile_moe.json beside the model; "
                     "for the bundled demo model, the user config directory, never the installed package)")
    cal.add_argument("--criteria", type=parse_criteria, default=DEFAULT_CALIBRATION_CRITERIA,
                     help=f"comma-separated criteria to try, among {', '.join(CRITERIA)} (default: {','.join(DEFAULT_CALIBRATION_CRITERIA)})")
    cal.add_argument("--rule", choices=RULES, default=RULES[0], help="lower-bound: the 95%% interval's lower end must meet the target "
                     "(default); point: the point estimate must")
    cal.add_argument("--source", type=Path, action="append", metavar="PATH", help="calibrate across sources: a file or directory per "
                     "source (repeat, 3+ recommended; one alone is split at random by file into 3 parts; 'stdlib' is the demo corpus's validation split); tau is the strictest of the "
                     "per-source ones, with leave-one-source-out estimates; --max-prompts applies per source")
    for p, handler, prompts in ((ev, cmd_eval, 120), (cal, cmd_calibrate, 400)):
        p.add_argument("--glob", default=DEFAULT_GLOB, help=f"files read from --data directories (default: {DEFAULT_GLOB})")
        p.add_argument("--max-prompts", type=int, default=prompts, help=f"prompts cut from the data (default: {prompts})")
        p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
        p.add_argument("--ppl-tokens", type=int, default=8192, help="tokens scored for perplexity")
        add_engine_args(p)
        add_policy_args(p)
        p.set_defaults(handler=handler)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`bench`."""
    b = sub.add_parser("bench", help="decode speed of big / mobile / little / resident / transformers / transformers+accelerate, same prompts and budget")
    b.add_argument("--synthetic", choices=list(SHAPES), help="random weights with the shapes of a public model (instead of --model)")
    b.add_argument("--shrink", type=int, default=1, metavar="N", help="with --synthetic: divide every width (not layers, experts or top-k) by N to fit a small machine (default: 1)")
    b.add_argument("--prompts", type=int, default=4, help="prompts per system and round (default: 4)")
    b.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default: 32)")
    b.add_argument("--fallback-rate", type=float, help="drive mobile's fallbacks at this rate (default for synthetic: the demo model's calibrated rate)")
    b.add_argument("--lookahead", action="store_true", help="prefetch layer l+1's experts from layer l's hidden state")
    b.add_argument("--skip-accelerate", action="store_true", help="do not run the transformers + accelerate offloaded baseline (cuda)")
    b.add_argument("--skip-transformers", action="store_true", help="do not run transformers' generate on the whole model")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every system; speeds are medians (default 3)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice; reported either way)")
    b.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    b.add_argument("--trace-dir", type=Path, help="write each system's expert-access trace (JSONL) here")
    b.add_argument("--batch", type=parse_sizes, metavar="SIZES", help="instead: aggregate tok/s and expert bytes per generated token of big "
                   "and mobile at each batch size, e.g. 1,2,4,8,16 (prompts decoded together)")
    b.add_argument("--batch-little", choices=["auto", "always"], default="auto", help="with --batch: mobile rows decode little first only "
                   "where measured cheaper (auto), or always (default: auto)")
    b.add_argument("--plot", type=Path, metavar="FILE", help="with --batch: a PNG of speed and expert traffic against batch size")
    b.add_argument("--plan-only", action="store_true", help="print how the budget splits into dense weights, KV cache and expert slots, then exit without loading")
    add_engine_args(b)
    add_policy_args(b)
    b.set_defaults(handler=cmd_bench)


DEFAULT_CALIBRATION_CRITERIA = ("margin", "learned")  # margin beat max_prob and entropy at every fallback rate measured


def parse_sizes(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4], each >= 1."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def parse_criteria(text: str) -> tuple[str, ...]:
    """'max_prob,margin' -> ('max_prob', 'margin'), checked."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in CRITERIA]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"criteria must be among {', '.join(CRITERIA)}, got {text!r}")
    return names


VARIANT_KNOBS = {"layer-adaptive": "layer_adaptive", "cache-prior": "cache_prior", "kv-repair": "kv_repair", "rollback": "rollback",
                 "partial-fallback": "partial_fallback", "little-k": "little_k"}
INTEGER_KNOBS = ("kv-repair", "little-k")


def parse_variants(text: str) -> tuple[dict[str, float | int | None], ...]:
    """'plain,layer-adaptive=0.3,cache-prior=2+kv-repair=1' -> PolicyConfig knob overrides per variant ('+' combines knobs), checked.
    A variant without little-k keeps the run's (--little-k, else the calibration's)."""
    variants = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        variant: dict[str, float | int | bool | None] = {"layer_adaptive": None, "cache_prior": None, "kv_repair": 0, "rollback": False,
                                                         "partial_fallback": None}
        for knob in item.split("+") if item != "plain" else ():
            name, _, value = knob.partition("=")
            try:
                if name == "rollback":  # a switch: no value
                    if value:
                        raise ValueError(value)
                    variant["rollback"] = True
                    continue
                variant[VARIANT_KNOBS[name]] = int(value) if name in INTEGER_KNOBS else float(value)
            except (KeyError, ValueError):
                raise argparse.ArgumentTypeError(f"variants are plain or knobs joined by '+': layer-adaptive=SHARE, cache-prior=FACTOR, "
                                                 f"kv-repair=N, rollback, partial-fallback=SHARE, little-k=N; got {item!r}") from None
        variants.append(variant)
    if not variants:
        raise argparse.ArgumentTypeError("--variants needs at least one variant")
    return tuple(variants)


def parse_taus(text: str) -> tuple[float, ...]:
    """'0.3,0.5' -> (0.3, 0.5)."""
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"taus must be comma-separated numbers, got {text!r}") from None


def model_dir(arg: str | Path | None, quiet: bool = False) -> Path:
    """The --model directory: a local checkpoint directory (an existing path always wins), ORG/NAME[@REVISION]
    resolved to its snapshot in the Hugging Face cache (downloaded there first unless cached), or the bundled demo model."""
    if arg is not None:
        if Path(arg).exists() and not Path(arg).is_dir():
            raise CheckpointError(f"--model {arg} is a file, not a checkpoint directory (give the directory holding config.json)")
        return resolve_model(str(arg), progress=not quiet)
    if not (DEMO_MODEL / "config.json").is_file():
        raise CheckpointError("no --model given and the bundled demo model is not installed")
    return DEMO_MODEL


def open_llm(args: argparse.Namespace) -> LLM:
    """Load the model the flags name."""
    return LLM(model_dir(args.model, args.quiet), engine_config_from(args))


def engine_config_from(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the shared engine flags."""
    return engine_config(
        args.device, args.dtype, args.expert_cache, args.gpu_memory, args.eviction, not args.quiet, args.max_context, args.expert_dtype, args.group_size,
        not args.reference_kernels, args.compile, args.offload_dir, args.host_memory, not args.buffered_io,
        getattr(args, "max_batch", 1), getattr(args, "batch_little", "auto"), args.cuda_graphs,
    )


def policy_flags(args: argparse.Namespace) -> PolicyConfig:
    """PolicyConfig from the policy flags alone (criterion and tau may stay unset)."""
    return PolicyConfig(args.policy, args.tau, args.criterion, args.little_weights, args.little_k, args.prefill, not args.no_prefetch,
                        layer_adaptive=args.layer_adaptive, cache_prior=args.cache_prior, kv_repair=args.kv_repair, rollback=args.rollback,
                        partial_fallback=args.partial_fallback)


def policy_from(args: argparse.Namespace, llm: LLM) -> PolicyConfig:
    """PolicyConfig from flags; criterion and tau fall back to the model's calibration (read once at load), then to the defaults."""
    return llm.resolve_policy(policy_flags(args))


def parse_ids(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidParameter(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """`mobile-moe generate`."""
    if args.prompt is None and args.prompt_ids is None:
        raise InvalidParameter("give --prompt TEXT or --prompt-ids 1,2,3")
    if args.policy != "mobile" and (args.tau is not None or args.criterion is not None):
        raise InvalidParameter(f"--tau and --criterion apply to --policy mobile only, not {args.policy}")
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    llm = open_llm(args)
    policy = policy_from(args, llm)
    prompt = parse_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
    result = llm.generate(prompt, sampling, policy)
    if args.json:
        out = {
            "token_ids": result.token_ids,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "policy": {"name": policy.name, "tau": policy.tau if policy.name == "mobile" else None, "criterion": policy.criterion if policy.name == "mobile" else None,
                       "little_k": None if policy.name == "big" else llm.little_k(policy)},
            "stats": result.stats.to_dict(),
        }
        print(json.dumps(out))
    else:
        print(result.text if result.text is not None else ",".join(map(str, result.token_ids)), flush=True)
        s = result.stats
        print(
            f"[{policy.name}] {s.tokens} tokens, {s.decode_tok_s:.1f} tok/s decode, prefill {s.prefill_s:.2f}s, "
            f"fallback {s.fallback_tokens}, cache {s.cache_slots}/{s.total_experts} experts, hit rate {s.hit_rate:.0%}",
            file=sys.stderr,
        )
    return 0


def taus_around(criterion: str, tau: float | None, count: int = 5) -> tuple[float, ...]:
    """The `count` taus of the criterion's grid nearest to `tau` (the whole grid's middle without one)."""
    grid = TAU_GRIDS[criterion]
    if tau is None:
        start = max(0, (len(grid) - count) // 2)
        return grid[start : start + count]
    return tuple(sorted(sorted(grid, key=lambda t: abs(t - tau))[:count]))


def check_writable_file(path: Path | None, what: str) -> None:
    """Fail before a long run, not after it, when an output file cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise InvalidParameter(f"{what} {path} is a directory, not a file")
    _check_writable_dir(path.parent, f"{what} {path}")


def check_writable_dir(path: Path | None, what: str) -> None:
    """Fail before a long run when an output directory is a file or cannot be created or written."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise InvalidParameter(f"{what} {path} exists and is not a directory")
    _check_writable_dir(path, f"{what} {path}")


def _check_writable_dir(directory: Path, what: str) -> None:
    """Create the directory if needed and write a probe file in it."""
    blocker = _non_directory_ancestor(directory)
    if blocker is not None:
        raise InvalidParameter(f"cannot write {what}: {blocker} is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise InvalidParameter(f"cannot write {what}: {e.strerror or e}") from None


def _non_directory_ancestor(directory: Path) -> Path | None:
    """The nearest existing path among `directory` and its parents when it is not a directory (mkdir would fail on it)."""
    for path in (directory, *directory.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    """`mobile-moe eval`."""
    check_writable_file(args.plot, "--plot")
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
    if args.plot:
        plot_sources(reports, args.plot) if args.source else plot_quality(reports[0], args.plot)
    if args.json:
        print(json.dumps({"sources": reports} if args.source else reports[0]))
        return 0
    for report in reports:
        print_eval(report)
    if args.plot:
        print(f"plot written to {args.plot}")
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
    print(f"model {report['model']}, data {report['data']}: {report['prompts']} prompts x {report['new_tokens']} tokens, criterion {report['criterion']}, "
          f"expert cache {report['cache_slots']} of {report['total_experts']}")
    print("agreement is scored from the first decode step (the prefill token is big's for mobile and not counted); CI: 95% bootstrap over prompts")
    print(f"experts {report['expert_format']} ({report['expert_bytes'] / 2**10:.1f} KiB each); perplexity on {ppl['tokens']} tokens from {ppl['files']} of {ppl['files_total']} files: big {ppl['big']:.3f}, little {ppl['little']:.3f}")
    if ppl["mobile"]:
        mobile = ", ".join(f"tau {tau} {value:.3f} ({value / ppl['big'] - 1:+.2%})" for tau, value in ppl["mobile"].items())
        print(f"mobile perplexity (teacher-forced: each position from the pass mobile would emit it from) vs big: {mobile}")
    if report["big_vs_float_big"]:
        v = report["big_vs_float_big"]
        print(f"big vs big in {v['dtype']} with {v['expert_format']} experts: greedy agreement {v['agreement']:.1%} (positions {v['agreement_overall']:.1%}, whole continuations {v['exact_match']:.1%})")
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
    settings = EvalSettings(tuple(args.taus or (0.5,)), args.max_prompts, args.new_tokens, args.ppl_tokens, progress=not args.quiet)
    if args.source:
        return calibrate_by_source(args, settings)
    texts, data = read_texts(args.data, "validation", args.glob)
    llm = open_llm(args)
    base = dataclasses.replace(policy_from(args, llm), kv_repair=args.kv_repair or 0, rollback=bool(args.rollback), little_k=args.little_k)  # this run's, not the old record's
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
    file = write_calibration(llm.path, result.record(prompts, data, str(llm.loaded.dtype).removeprefix("torch."), base.kv_repair or 0, bool(base.rollback),
                                                    base.little_k), args.output)
    c = result.chosen
    lo, hi = c.agreement_ci
    print(f"calibrated {c.criterion} tau {c.tau:g}: agreement {c.agreement:.2%} (95% CI {lo:.2%}-{hi:.2%}; target {args.target_agreement:.1%}, rule {args.rule}), "
          f"fallback rate {c.fallback_rate:.1%}; written to {file}")
    return 0


def calibrate_by_source(args: argparse.Namespace, settings: EvalSettings) -> int:
    """`calibrate --source A --source B ...`: per-source taus, the strictest of them, leave-one-source-out estimates."""
    if args.data:
        raise InvalidParameter("give --data or --source, not both")
    sources = source_texts(args.source, "validation", args.glob)
    data = "sources: " + ", ".join(sources)
    if len(sources) == 1:
        (name, texts), = sources.items()
        sources = split_source(name, texts)
        data = f"one source ({name}) split at random by file into {len(sources)} parts"
        logging.getLogger("mobile_moe").warning(
            f"one source only ({name}): calibrating across a seeded random split of its {len(texts)} files into {len(sources)} parts, "
            "so the held-out figures are for unseen files of this source, not unseen code (give three or more --source for that)")
    llm = open_llm(args)
    base = dataclasses.replace(policy_from(args, llm), kv_repair=args.kv_repair or 0, rollback=bool(args.rollback), little_k=args.little_k)  # this run's, not the old record's
    bases = [dataclasses.replace(base, criterion=c) for c in args.criteria]
    calibrations, chosen, learned = calibrate_sources(llm, sources, settings, bases, args.target_agreement, grid=args.taus is None, rule=args.rule)
    print(sources_table(calibrations, args.target_agreement))
    if chosen is None or chosen.pooled is None:
        print(f"no candidate tau meets the target agreement {args.target_agreement:.1%} on every source under rule {args.rule}; nothing written")
        return 1
    result = Calibration(args.target_agreement, chosen.pooled, [c.pooled for c in calibrations if c.pooled is not None], args.rule, learned)
    record = result.record(sum(r.prompts for r in chosen.rows), data, str(llm.loaded.dtype).removeprefix("torch."), base.kv_repair or 0,
                           bool(base.rollback), base.little_k)
    record["sources"] = [c.to_dict() for c in calibrations]
    file = write_calibration(llm.path, record, args.output)
    worst = min((r.held_out for r in chosen.rows if r.held_out is not None), key=lambda r: r.agreement, default=None)
    held = "" if worst is None else f"; worst held-out source {worst.agreement:.2%} at fallback rate {worst.fallback_rate:.1%}"
    print(f"calibrated {chosen.criterion} tau {chosen.final_tau:g} across {len(sources)} sources: agreement {chosen.pooled.agreement:.2%}, "
          f"fallback rate {chosen.pooled.fallback_rate:.1%}{held}; written to {file}")
    return 0


def full_size_format(args: argparse.Namespace) -> ExpertFormat:
    """The expert format the full-width prediction assumes: the benchmarked one, bf16 for `auto`."""
    return make_format(args.expert_dtype, torch.bfloat16, args.group_size)


def check_synthetic_fits(args: argparse.Namespace, plan: SlotPlan, expert_numel: int) -> None:
    """On the CPU, refuse a synthetic model whose copies (store, resident cache, transformers' own) would not fit in memory."""
    available = available_memory_bytes()
    experts = plan.total_experts * plan.expert_bytes  # packed
    float_size = 4 if args.dtype in ("auto", "float32") else 2
    transformers_copy = 0 if args.skip_transformers else plan.dense_bytes + plan.total_experts * expert_numel * float_size
    need = plan.dense_bytes + 2 * experts + transformers_copy  # the store, `resident`'s every-expert cache, transformers' model
    if available is not None and need > 0.9 * available:
        raise InvalidParameter(
            f"synthetic {args.synthetic} at --shrink {args.shrink} needs about {need / GIB:.1f} GiB of memory on the cpu "
            f"({available / GIB:.1f} GiB available): raise --shrink, use --expert-dtype int4, or add --skip-transformers")


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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


def cmd_bench(args: argparse.Namespace) -> int:
    """`mobile-moe bench`."""
    if args.prompts < 1 or args.new_tokens < 2 or args.rounds < 1:
        raise InvalidParameter("--prompts and --rounds must be >= 1 and --new-tokens >= 2")
    check_writable_file(args.json, "--json")
    check_writable_file(args.plot, "--plot")
    check_writable_dir(args.trace_dir, "--trace-dir")
    if args.plot is not None and args.batch is None:
        raise InvalidParameter("bench --plot draws the --batch sweep; give --batch too")
    args.max_batch = max(args.batch) if args.batch else 1  # the memory plan holds the KV of the largest batch
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidParameter(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.synthetic and args.model:
        raise InvalidParameter("give --model or --synthetic, not both")
    config = engine_config_from(args)
    model_cfg = synthetic_config(args.synthetic, args.shrink) if args.synthetic else read_config(model_dir(args.model, args.quiet))
    plan, why = bench_plan(args, model_cfg, plan_for_config(model_cfg, config))
    if args.offload_dir is not None:
        check_on_disk(Path(args.offload_dir))
    if args.synthetic and args.device == "cpu" and not args.plan_only and args.offload_dir is None:
        check_synthetic_fits(args, plan, synthetic_expert_numel(model_cfg))
    print(f"{args.synthetic or model_dir(args.model)} on {args.device}: {plan.describe()}{why}", file=sys.stderr if not args.plan_only else sys.stdout, flush=True)
    if args.plan_only:
        return 0
    if args.synthetic:
        loaded = build_synthetic(args.synthetic, resolve_device(args.device), args.dtype, args.shrink, expert_dtype=args.expert_dtype,
                                 group_size=args.group_size, fused_kernels=not args.reference_kernels,
                                 offload_dir=None if args.offload_dir is None else Path(args.offload_dir), direct_io=not args.buffered_io)
        llm = LLM(loaded, config)
    else:
        llm = open_llm(args)
    if why:
        llm.planned_slots = plan.slots  # the line printed above, not the engine's every-expert CPU default
    rate = args.fallback_rate
    if rate is None and args.synthetic:
        rate = demo_fallback_rate()
    policy = dataclasses.replace(policy_from(args, llm), name="mobile", forced_fallback_rate=rate, lookahead=args.lookahead)
    if args.batch:
        return bench_batches(args, llm, policy)
    cost = full_size_cost(args.synthetic, full_size_format(args)) if args.synthetic and args.shrink > 1 else None  # predict the real widths
    settings = BenchSettings(
        default_prompts(llm, args.prompts), args.new_tokens, policy, args.gpu_memory, not args.skip_accelerate, args.trace_dir, cost,
        temperature=1.0 if args.synthetic else 0.0, progress=not args.quiet, rounds=args.rounds, run_transformers=not args.skip_transformers,
    )
    report = run_bench(llm, settings)
    if rate is not None:
        report["mobile"]["note"] = f"fallbacks driven at rate {rate:g}, evenly spaced (random weights give meaningless confidences)"
    print(table(report))
    if args.json:
        write_json_atomic(args.json, report)
    return 0


def bench_batches(args: argparse.Namespace, llm: LLM, mobile: PolicyConfig) -> int:
    """`bench --batch`: the batch-size sweep, as a table (and JSON, PNG)."""
    from mobile_moe.bench.batching import batch_table, plot_batches, run_batch_bench

    report = run_batch_bench(llm, default_prompts(llm, max(args.batch)), args.batch, args.new_tokens, mobile, llm.planned_slots,
                             1.0 if args.synthetic else 0.0, args.rounds)
    report["threads"] = torch.get_num_threads()
    if mobile.forced_fallback_rate is not None:
        report["mobile_note"] = f"fallbacks driven at rate {mobile.forced_fallback_rate:g}, evenly spaced (random weights give meaningless confidences)"
    print(batch_table(report))
    if args.json:
        write_json_atomic(args.json, report)
    if args.plot:
        plot_batches(report, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit status 2."""
    args = build_parser().parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    _log_warnings_in_one_line()
    try:
        return args.handler(args)
    except MobileMoeError as e:
        print(f"mobile-moe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobile-moe: interrupted", file=sys.stderr)
        return 130


def _attach_negative_values(argv: list[str]) -> list[str]:
    """`--prompt-ids -1,2` -> `--prompt-ids=-1,2`, so the ids are checked (and named) instead of read as a flag."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--prompt-ids" and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"--prompt-ids={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at the time of each record."""

    @property
    def stream(self):  # noqa: D401 - logging reads this attribute
        """The current sys.stderr."""
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        """Ignored: the stream is always the current sys.stderr."""


def _log_warnings_in_one_line() -> None:
    """The engine's warnings (e.g. pageable fallback) as `mobile-moe: warning: ...` on stderr."""
    log = logging.getLogger("mobile_moe")
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("mobile-moe: warning: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        log.propagate = False


if __name__ == "__main__":
    sys.exit(main())
