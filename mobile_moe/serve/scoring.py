"""The completions endpoint's scoring answers (what lm-eval's `local-completions` client sends and reads): `echo`,
`logprobs` with top alternatives, `max_tokens` 0, in OpenAI's legacy completions format."""

from __future__ import annotations

from itertools import accumulate

from mobile_moe.config import PolicyConfig
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM
from mobile_moe.engine.processors import TokenLogprob
from mobile_moe.engine.scoring import score_tokens


def scored_choice(
    llm: LLM, index: int, prompt: list[int], text: str, result: GenerationResult | None, echo: bool, top: int | None, policy: PolicyConfig
) -> dict:
    """One choice: the (echoed prompt and) completion text, and with `top` set, each token's log-probability under the
    policy (teacher-forced, engine/scoring.py) with its `top` alternatives; the prompt's tokens are scored only with echo."""
    generated = [] if result is None else result.token_ids
    finish = "length" if result is None or result.finish_reason == "length" else "stop"  # EOS, or a stop string (cancelled)
    choice: dict = {"index": index, "text": ((llm.decode(prompt) or "") if echo else "") + text, "finish_reason": finish, "logprobs": None}
    if top is None:
        return choice
    ids = prompt + generated
    scores = score_tokens(llm, ids, policy, top)
    pieces = [piece(llm, t) for t in ids]
    offsets = [0, *accumulate(len(p) for p in pieces)][:-1]
    first = 0 if echo else len(prompt)
    alternatives = [None if i == 0 else {piece(llm, t): lp for t, lp in alts} for i, alts in enumerate(scores.top)]
    choice["logprobs"] = {
        "tokens": pieces[first:],
        "token_logprobs": scores.token_logprobs[first:],
        "top_logprobs": alternatives[first:],
        "text_offset": offsets[first:] if echo else [o - offsets[first] for o in offsets[first:]],
    }
    return choice


def piece(llm: LLM, token: int) -> str:
    """A token's text (its id when the model has no tokenizer)."""
    text = llm.decode([token])
    return str(token) if text is None else text


def chat_logprobs(llm: LLM, entries: list[TokenLogprob]) -> dict:
    """A chat choice's `logprobs`: per generated token its text, log-probability (under the pass that emitted it, before
    penalties and a grammar's mask), UTF-8 bytes and most probable alternatives, in OpenAI's chat format."""
    return {"content": [_entry(llm, e.token, e.logprob) | {"top_logprobs": [_entry(llm, t, lp) for t, lp in e.top]} for e in entries]}


def _entry(llm: LLM, token: int, logprob: float) -> dict:
    text = piece(llm, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
