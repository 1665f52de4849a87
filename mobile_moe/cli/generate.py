"""`mobile-moe generate` and `mobile-moe chat`."""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from mobile_moe.chat import StreamPrinter, chat
from mobile_moe.cli.common import add_engine_args, add_policy_args, add_sampling_args, add_threads_arg, check_flags, open_llm, parse_ids, policy_from
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM
from mobile_moe.engine.metrics import GenerationStats
from mobile_moe.errors import InvalidParameter


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    """`generate`."""
    gen = sub.add_parser("generate", help="generate a continuation of a prompt")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    add_sampling_args(gen, max_new_tokens=64)
    add_threads_arg(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object with token ids, text and stats")
    add_engine_args(gen)
    add_policy_args(gen)
    gen.set_defaults(handler=cmd_generate)


INTERRUPTED_STATUS = 128 + signal.SIGINT  # what a shell reports for a command stopped by Ctrl-C


def cmd_generate(args: argparse.Namespace) -> int:
    """`mobile-moe generate`: an interrupt (Ctrl-C) stops after the current token and still prints the result and its stats."""
    if args.prompt is None and args.prompt_ids is None:
        raise InvalidParameter("give --prompt TEXT or --prompt-ids 1,2,3")
    check_flags(args)
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    llm = open_llm(args)
    policy = policy_from(args, llm)
    prompt = parse_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
    printer = StreamPrinter(llm, sys.stdout) if not args.json and llm.tokenizer is not None else None  # text streams as it is made
    with interrupt_stops() as interrupted:
        result = llm.generate(prompt, sampling, policy, on_token=lambda t: (printer is None or printer(t)) and not interrupted())
    status = INTERRUPTED_STATUS if interrupted() else 0
    if args.json:
        print(json.dumps(generation_json(llm, policy, result)), flush=True)
        return status
    if printer is not None:
        printer.finish()
        print(flush=True)
    else:
        print(",".join(map(str, result.token_ids)), flush=True)
    print(f"[{policy.name}] {timing_line(result.stats)}", file=sys.stderr)
    return status


@contextmanager
def interrupt_stops() -> Iterator:
    """Within: the first SIGINT only sets a flag (the yielded callable reads it), so generation stops after the current token
    and its result is kept; a second one interrupts as usual."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield lambda: False
        return

    def on_interrupt(signum: int, _frame: object) -> None:
        caught.append(signum)
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield lambda: bool(caught)
    finally:
        signal.signal(signal.SIGINT, previous)


def timing_line(s: GenerationStats) -> str:
    """Threads, load, prompt and decode timings, then fallbacks and the expert cache (as llama.cpp's timing block)."""
    return (
        f"threads {s.threads}, load {s.load_s:.2f}s, prompt {s.prompt_tokens} tokens in {s.prefill_s:.2f}s ({s.prompt_tok_s:.1f} tok/s), "
        f"{s.tokens} tokens, {s.decode_tok_s:.1f} tok/s decode, total {s.total_s:.2f}s, "
        f"fallback {s.fallback_tokens}, cache {s.cache_slots}/{s.total_experts} experts, hit rate {s.hit_rate:.0%}"
    )


def generation_json(llm: LLM, policy: PolicyConfig, result: GenerationResult) -> dict:
    """`generate --json`: token ids, text, finish reason, the policy it ran with, and the run's stats."""
    mobile = policy.name in ("mobile", "exact")
    return {
        "token_ids": result.token_ids,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "policy": {
            "name": policy.name,
            "tau": policy.tau if mobile else None,
            "criterion": policy.criterion if mobile else None,
            "little_k": None if policy.name == "big" else llm.little_k(policy),
            "draft_max": policy.draft_window if policy.name == "exact" else None,
        },
        "stats": result.stats.to_dict(),
    }


def add_chat_parser(sub: argparse._SubParsersAction) -> None:
    """`chat`."""
    c = sub.add_parser("chat", help="talk to the model in the terminal, replies streamed token by token")
    add_sampling_args(c, max_new_tokens=256)
    add_threads_arg(c)
    add_engine_args(c)
    add_policy_args(c)
    c.set_defaults(handler=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    """`mobile-moe chat`."""
    check_flags(args)
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed, stop_at_eos=True)
    llm = open_llm(args)
    llm.chat_prompt([{"role": "user", "content": "x"}])  # no chat template: a one-line error now, not after the first message
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused by itself, the lines around it kept
    return chat(llm, sampling, policy_from(args, llm))
