"""One request's tokens from the worker thread to the client: stop strings, server-sent events, whole answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi.responses import JSONResponse

from mobile_moe.config import PolicyConfig
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM, settled
from mobile_moe.serve.schemas import error
from mobile_moe.serve.worker import Job


class Generation:
    """One request's tokens as they arrive from the worker thread, with stop strings applied to the text."""

    def __init__(self, llm: LLM, loop: asyncio.AbstractEventLoop, stops: list[str], on_finish: Callable[[GenerationResult | None], None]) -> None:
        self.llm, self.loop, self.stops, self.on_finish = llm, loop, stops, on_finish
        self.events: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.text = ""  # the reply so far, cut at a stop string
        self.sent = ""  # the part of it already handed out
        self.stopped = False

    def on_token(self, token: int) -> bool:
        """Worker thread: decode, cut at a stop string, hand the new text to the loop; False stops generation.

        Text that could be the start of a stop string, or a character whose bytes are still arriving, is held back until
        the next tokens decide.
        """
        self.ids.append(token)
        self.text = self.llm.decode(self.ids) or ""
        cut = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            self._send(len(self.text))
        else:
            whole = settled(self.text)  # a character still arriving byte by byte waits
            self._send(len(whole) - self._held_back(whole))
        return not self.stopped

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        return max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)

    def _send(self, end: int) -> None:
        """Hand text[len(sent):end] to the event loop."""
        delta = self.text[len(self.sent) : end]
        if delta:
            self.sent += delta
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("text", delta))

    def on_done(self, result, err) -> None:
        """Worker thread: the generation ended (result) or failed (err); counted even when the client already left."""
        self._send(len(self.text))  # what was held back for a stop string that never came
        self.loop.call_soon_threadsafe(self.on_finish, result)
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("done", result, err))


def _finish(result, gen: Generation) -> str:
    """OpenAI finish_reason: a stop string or EOS is "stop", the token limit "length"."""
    return "stop" if gen.stopped or result.finish_reason == "stop" else "length"


def _extension(policy: PolicyConfig, result) -> dict:
    """The request's MoBiLE settings echoed back with its fallback count."""
    return {"policy": policy.name, "tau": policy.tau, "criterion": policy.criterion, "fallback_tokens": result.stats.fallback_tokens}


class GenerationFailed(Exception):
    """The engine failed a request (its message says why)."""


async def collect(gen: Generation) -> tuple[str, GenerationResult]:
    """Wait for the whole generation: (its text, cut at a stop string; the result)."""
    text = ""
    while True:
        event = await gen.events.get()
        if event[0] == "text":
            text += event[1]
            continue
        _, result, err = event
        if err is not None:
            raise GenerationFailed(" ".join(str(err).split()) or type(err).__name__)
        if result is None:
            raise GenerationFailed("the request was cancelled")
        return text, result


async def complete(gen: Generation, job: Job, meta: dict, chat: bool, policy: PolicyConfig, prompt_tokens: int) -> JSONResponse:
    """Wait for the whole generation and answer in one JSON object."""
    try:
        text, result = await collect(gen)
    except GenerationFailed as e:
        return error(500, f"generation failed: {e}", "server_error")
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(result.token_ids), "total_tokens": prompt_tokens + len(result.token_ids)}
    choice = {"index": 0, "finish_reason": _finish(result, gen)}
    choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    obj = "chat.completion" if chat else "text_completion"
    return JSONResponse({**meta, "object": obj, "choices": [choice], "usage": usage, "mobile_moe": _extension(policy, result)})


async def stream(gen: Generation, job: Job, meta: dict, chat: bool, policy: PolicyConfig) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, then [DONE]; a client that leaves cancels the job."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, extra: dict | None = None) -> str:
        choice = {"index": 0, "finish_reason": finish}
        choice |= {"delta": {} if delta is None else {"content": delta}} if chat else {"text": delta or ""}
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice], **(extra or {})})}\n\n"

    try:
        if chat:
            yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"
        while True:
            event = await gen.events.get()
            if event[0] == "text":
                yield chunk(event[1], None)
                continue
            _, result, err = event
            if err is not None:
                yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error', 'code': 500}})}\n\n"
            else:
                yield chunk(None, _finish(result, gen), {"mobile_moe": _extension(policy, result)})
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancelled.set()  # the client left (or the stream ended): the worker stops at the next token
