"""Flags, parsers and checks the commands share: engine, sampling and policy flags, --model resolution, output paths."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import NoReturn

import torch

from mobile_moe.config import CRITERIA, DEFAULT_PREFIX_CACHE_GB, DENSE_DTYPES, EXPERT_DTYPES, POLICIES, EngineConfig, PolicyConfig, check_options, flag_name
from mobile_moe.engine.calibration import DEFAULT_TAU, DEMO_MODEL
from mobile_moe.engine.llm import LLM, engine_config, ram_check
from mobile_moe.errors import CheckpointError, InvalidParameter
from mobile_moe.experts.formats import DEFAULT_GROUP_SIZE
from mobile_moe.loading.hub import ConfigCheck, resolve_model


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        """One line, no usage dump."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model, device and cache flags every command shares."""
    p.add_argument("--model", help="checkpoint directory, or ORG/NAME[@REVISION] on the Hugging Face hub (default: the bundled demo model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (default auto: on cpu bf16 for models over 200M parameters where the CPU has native bf16, else float32; on cuda the checkpoint's)",
    )
    p.add_argument(
        "--expert-dtype",
        default="auto",
        choices=EXPERT_DTYPES,
        help="how routed experts are stored in host memory and moved (default auto: the compute dtype, or what a quantized checkpoint holds)",
    )
    p.add_argument(
        "--dense-dtype",
        default="auto",
        choices=DENSE_DTYPES,
        help="attention, shared experts, dense MLPs and the LM head: int8 / int4 through weight-only kernels, or float "
        "(default auto: the compute dtype, or what a quantized checkpoint holds)",
    )
    p.add_argument(
        "--reference-kernels",
        action="store_true",
        help="quantized experts: dequantize then matmul (the tested reference path) instead of fused weight-only kernels",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="--compile: decode through torch.compile'd layer segments (CPU; seconds of warm-up on each start's first request); "
        "--no-compile: eager; default: a CPU model under 200M parameters decodes through layers compiled once per machine and cached "
        "($MOBILE_MOE_COMPILED_DIR, else ~/.cache/mobile-moe/compiled; `off`: eager)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="cuda, every expert resident: replay each decode pass from a captured CUDA graph (one launch instead of hundreds)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        metavar="G",
        help=f"int4 experts / dense weights: weights per scale/zero group along the input dim (default {DEFAULT_GROUP_SIZE})",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--expert-cache", type=int, metavar="N", help="device expert cache size, in experts")
    size.add_argument("--gpu-memory", type=float, metavar="GB", help="device memory budget for dense weights + KV cache + expert slots")
    p.add_argument(
        "--offload-dir", metavar="DIR", help="keep routed experts in an on-disk store in DIR (built there on first use, reused after) and read them on demand"
    )
    p.add_argument("--host-memory", type=float, metavar="GB", help="with --offload-dir: RAM for cached experts (on CPU, the compute cache)")
    p.add_argument("--buffered-io", action="store_true", help="with --offload-dir: read through the page cache instead of O_DIRECT")
    p.add_argument("--eviction", default="lru", choices=["lru", "lfu"], help="expert cache eviction policy (default: lru)")
    p.add_argument(
        "--max-context",
        type=int,
        default=4096,
        metavar="N",
        help="longest prompt + generation; a --gpu-memory budget reserves this many tokens of KV cache (default: 4096)",
    )
    p.add_argument(
        "--prefix-cache",
        type=float,
        default=DEFAULT_PREFIX_CACHE_GB,
        metavar="GB",
        help="prefix reuse: a request sharing a held sequence's prefix prefills only the rest; GB bounds the recurrent-state "
        f"snapshots of hybrid models (the KV entries are the held caches' own); 0 turns reuse off (default: {DEFAULT_PREFIX_CACHE_GB:g})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


THREADS_DEFAULT = "one fewer than the cores, at least 1; OMP_NUM_THREADS when set"


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads: torch's CPU threads for the command."""
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"torch CPU threads (default: {THREADS_DEFAULT}: one thread per core loses up to 10x when another process is busy)",
    )


def default_threads() -> int | None:
    """One fewer than the cores this process may run on, at least 1; None when OMP_NUM_THREADS is set (torch follows it)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def set_threads(threads: int | None) -> None:
    """Apply --threads, checked, or the default (`default_threads`)."""
    if threads is not None and threads < 1:
        raise InvalidParameter(f"--threads must be >= 1, got {threads}")
    chosen = threads if threads is not None else default_threads()
    if chosen is not None:
        torch.set_num_threads(chosen)


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """How tokens are drawn (generate and chat)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"tokens to generate at most (default: {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int, help="random seed for sampling, in [0, 2**64) (default: none)")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """MoBiLE policy flags."""
    p.add_argument(
        "--policy",
        default="big",
        choices=POLICIES,
        help="big: all top-k experts; little: the better half; mobile: little, big where unsure; exact: little drafts, big verifies "
        "(greedy output is big's) (default: big)",
    )
    p.add_argument(
        "--draft-max",
        type=int,
        metavar="N",
        help="exact: little tokens drafted before big verifies them, 1..64 (a draft also ends where little is unsure) (default: 4)",
    )
    p.add_argument("--tau", type=float, help=f"confidence threshold for mobile (default: calibrated, else {DEFAULT_TAU})")
    p.add_argument("--criterion", choices=CRITERIA, help="importance criterion for mobile (default: calibrated, else max_prob)")
    p.add_argument(
        "--little-weights",
        default="native",
        choices=["native", "rescale"],
        help="little's expert weights: the architecture's own rule, or rescaled to big's sum (default: native)",
    )
    p.add_argument(
        "--little-k",
        type=int,
        metavar="N",
        help="experts per token of the little model, 1 <= N < top-k (default: what the model's calibration was made with, else half of top-k, rounded up)",
    )
    p.add_argument("--prefill", choices=["big", "little"], help="experts for the prompt (default: little for policy little, else big)")
    p.add_argument("--no-prefetch", action="store_true", help="do not prefetch the other-half experts before a fallback")
    p.add_argument(
        "--layer-adaptive",
        type=float,
        metavar="SHARE",
        help="little decode: a layer uses all top-k experts when the dropped half carries more than this share of the routing weight (default: off)",
    )
    p.add_argument(
        "--cache-prior",
        type=float,
        metavar="FACTOR",
        help="little decode: swap a kept expert that is not cached for a cached dropped one scoring within this factor of it (default: off)",
    )
    p.add_argument(
        "--kv-repair",
        type=int,
        metavar="N",
        help="mobile: on a fallback, big also recomputes up to N earlier "
        "positions whose KV entries little wrote (default: what the model's calibration was made with, else 0)",
    )
    p.add_argument(
        "--partial-fallback",
        type=float,
        metavar="SHARE",
        help="mobile: a fallback's big pass starts at the first "
        "MoE layer where little dropped more than this share of the routing weight (else where it dropped most); the "
        "layers before keep little's output (default: off, every layer)",
    )
    p.add_argument(
        "--rollback",
        action="store_true",
        default=None,
        help="mobile, greedy, with --kv-repair: big also checks little's "
        "tokens at the repaired positions and takes back those from the first it disagrees with (streamed tokens wait "
        "up to N positions; default: as the model's calibration was made)",
    )


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


VARIANT_KNOBS = {
    "layer-adaptive": "layer_adaptive",
    "cache-prior": "cache_prior",
    "kv-repair": "kv_repair",
    "rollback": "rollback",
    "partial-fallback": "partial_fallback",
    "little-k": "little_k",
}


INTEGER_KNOBS = ("kv-repair", "little-k")


def parse_variants(text: str) -> tuple[dict[str, float | int | None], ...]:
    """'plain,layer-adaptive=0.3,cache-prior=2+kv-repair=1' -> PolicyConfig knob overrides per variant ('+' combines knobs), checked.
    A variant without little-k keeps the run's (--little-k, else the calibration's)."""
    variants = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        variant: dict[str, float | int | bool | None] = {
            "layer_adaptive": None,
            "cache_prior": None,
            "kv_repair": 0,
            "rollback": False,
            "partial_fallback": None,
        }
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
                raise argparse.ArgumentTypeError(
                    f"variants are plain or knobs joined by '+': layer-adaptive=SHARE, cache-prior=FACTOR, "
                    f"kv-repair=N, rollback, partial-fallback=SHARE, little-k=N; got {item!r}"
                ) from None
        variants.append(variant)
    if not variants:
        raise argparse.ArgumentTypeError("--variants needs at least one variant")
    return tuple(variants)


def parse_taus(text: str) -> tuple[float, ...]:
    """'0.3,0.5' -> (0.3, 0.5), each in [0, 1] (as --tau)."""
    try:
        taus = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"taus must be comma-separated numbers, got {text!r}") from None
    if not taus or not all(0.0 <= t <= 1.0 for t in taus):
        raise argparse.ArgumentTypeError(f"taus must be in [0, 1] (confidences), got {text!r}")
    return taus


def model_dir(arg: str | Path | None, quiet: bool = False, check_config: ConfigCheck | None = None) -> Path:
    """The --model directory: a local checkpoint directory (an existing path always wins), ORG/NAME[@REVISION]
    resolved to its snapshot in the Hugging Face cache (downloaded there first unless cached, once `check_config`
    passes on its config.json), or the bundled demo model."""
    if arg is not None:
        if Path(arg).exists() and not Path(arg).is_dir():
            raise CheckpointError(f"--model {arg} is a file, not a checkpoint directory (give the directory holding config.json)")
        return resolve_model(str(arg), progress=not quiet, check_config=check_config)
    if not (DEMO_MODEL / "config.json").is_file():
        raise CheckpointError("no --model given and the bundled demo model is not installed")
    return DEMO_MODEL


def open_llm(args: argparse.Namespace) -> LLM:
    """Load the model the flags name (from the hub only once its config says it fits in RAM as these flags load it)."""
    set_threads(getattr(args, "threads", None))
    config = engine_config_from(args)
    return LLM(model_dir(args.model, args.quiet, ram_check(config)), config)


def engine_config_from(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the shared engine flags."""
    return engine_config(
        args.device,
        args.dtype,
        args.expert_cache,
        args.gpu_memory,
        args.eviction,
        not args.quiet,
        args.max_context,
        args.expert_dtype,
        args.group_size,
        not args.reference_kernels,
        args.compile,
        args.offload_dir,
        args.host_memory,
        not args.buffered_io,
        getattr(args, "max_batch", 1),
        getattr(args, "batch_little", "auto"),
        args.cuda_graphs,
        args.dense_dtype,
        args.prefix_cache,
    )


def policy_flags(args: argparse.Namespace) -> PolicyConfig:
    """PolicyConfig from the policy flags alone (criterion and tau may stay unset)."""
    return PolicyConfig(
        args.policy,
        args.tau,
        args.criterion,
        args.little_weights,
        args.little_k,
        args.prefill,
        not args.no_prefetch,
        layer_adaptive=args.layer_adaptive,
        cache_prior=args.cache_prior,
        kv_repair=args.kv_repair,
        rollback=args.rollback,
        partial_fallback=args.partial_fallback,
        draft_max=args.draft_max,
    )


def check_flags(args: argparse.Namespace, configures: str | None = None) -> None:
    """The policy and sampling flags checked by the rules every front end shares (`check_options`), before the model loads;
    `configures`: the policy the flags set up where a command runs several (eval, calibrate and bench: mobile's knobs)."""
    policy = policy_flags(args)
    check_options(policy if configures is None else dataclasses.replace(policy, name=configures), getattr(args, "temperature", 0.0), flag_name)


def policy_from(args: argparse.Namespace, llm: LLM) -> PolicyConfig:
    """PolicyConfig from flags; criterion and tau fall back to the model's calibration (read once at load), then to the defaults."""
    return llm.resolve_policy(policy_flags(args))


def parse_ids(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidParameter(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def check_writable_file(path: Path | None, what: str) -> None:
    """Fail before a long run, not after it, when an output file cannot be written (its directory must exist: a mistyped
    directory is refused, not created)."""
    if path is None:
        return
    if path.is_dir():
        raise InvalidParameter(f"{what} {path} is a directory, not a file")
    blocker = _non_directory_ancestor(path.parent)
    if blocker is None and not path.parent.is_dir():
        raise InvalidParameter(f"cannot write {what} {path}: directory {path.parent} does not exist")
    _check_writable_dir(path.parent, f"{what} {path}")


def check_plot_file(path: Path | None) -> None:
    """--plot: a file name matplotlib can write (by its extension), in a writable directory, checked before the run."""
    if path is None:
        return
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise InvalidParameter("--plot needs matplotlib: pip install 'mobile-moe[plot]'") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise InvalidParameter(f"--plot {path}: give a file name ending in an image format matplotlib writes ({', '.join(f'.{f}' for f in sorted(formats))})")
    check_writable_file(path, "--plot")


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
