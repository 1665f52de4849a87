"""Command line: `mobile-moe generate ...`. Entry point only: parse, call the API, print."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from mobile_moe.config import CRITERIA, POLICIES, PolicyConfig, SamplingParams
from mobile_moe.engine.calibration import DEFAULT_TAU, calibrated_tau
from mobile_moe.engine.llm import LLM, engine_config
from mobile_moe.errors import CheckpointError, InvalidParameter, MobileMoeError

DEMO_MODEL = Path(__file__).parent / "demo_model"


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        """One line, no usage dump."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model, device and cache flags every command shares."""
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--expert-cache", type=int, metavar="N", help="device expert cache size, in experts")
    size.add_argument("--gpu-memory", type=float, metavar="GB", help="device memory budget for dense weights + KV cache + expert slots")
    p.add_argument("--eviction", default="lru", choices=["lru", "lfu"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """MoBiLE policy flags."""
    p.add_argument("--policy", default="big", choices=POLICIES)
    p.add_argument("--tau", type=float, help=f"confidence threshold for mobile (default: calibrated, else {DEFAULT_TAU})")
    p.add_argument("--criterion", default="max_prob", choices=CRITERIA)
    p.add_argument("--little-weights", default="native", choices=["native", "rescale"])
    p.add_argument("--prefill", choices=["big", "little"], help="experts for the prompt (default: little for policy little, else big)")
    p.add_argument("--no-prefetch", action="store_true", help="do not prefetch the other-half experts before a fallback")


def build_parser() -> Parser:
    """The full command-line interface."""
    parser = Parser(prog="mobile-moe", description="Offloaded MoE inference with MoBiLE big/little decoding.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    gen = sub.add_parser("generate", help="generate a continuation of a prompt")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--json", action="store_true", help="print one JSON object with token ids, text and stats")
    add_engine_args(gen)
    add_policy_args(gen)
    gen.set_defaults(handler=cmd_generate)
    return parser


def model_dir(arg: Path | None) -> Path:
    """The --model directory, or the bundled demo model."""
    if arg is not None:
        return arg
    if not (DEMO_MODEL / "config.json").is_file():
        raise CheckpointError("no --model given and the bundled demo model is not installed")
    return DEMO_MODEL


def open_llm(args: argparse.Namespace) -> LLM:
    """Load the model the flags name."""
    config = engine_config(args.device, args.dtype, args.expert_cache, args.gpu_memory, args.eviction, progress=not args.quiet)
    return LLM(model_dir(args.model), config)


def policy_from(args: argparse.Namespace, model: Path) -> PolicyConfig:
    """PolicyConfig from flags; tau falls back to the model's calibrated value."""
    tau = args.tau if args.tau is not None else (calibrated_tau(model) or DEFAULT_TAU)
    return PolicyConfig(args.policy, tau, args.criterion, args.little_weights, args.prefill, not args.no_prefetch)


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
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    llm = open_llm(args)
    policy = policy_from(args, llm.path)
    prompt = parse_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
    result = llm.generate(prompt, sampling, policy)
    if args.json:
        out = {
            "token_ids": result.token_ids,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "policy": {"name": policy.name, "tau": policy.tau if policy.name == "mobile" else None},
            "stats": result.stats.to_dict(),
        }
        print(json.dumps(out))
    else:
        print(result.text if result.text is not None else ",".join(map(str, result.token_ids)))
        s = result.stats
        print(
            f"[{policy.name}] {s.tokens} tokens, {s.decode_tok_s:.1f} tok/s decode, prefill {s.prefill_s:.2f}s, "
            f"fallback {s.fallback_tokens}, cache {s.cache_slots}/{s.total_experts} experts, hit rate {s.hit_rate:.0%}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except MobileMoeError as e:
        print(f"mobile-moe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mobile-moe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
