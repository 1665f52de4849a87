"""One request's tokens from the worker thread to the client: stop strings, server-sent events, whole answers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from mobile_moe.config import PolicyConfig
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM, settled
from mobile_moe.engine.processors import TokenLogprob
from mobile_moe.serve.schemas import error
from mobile_moe.serve.scoring import chat_logprobs
from mobile_moe.serve.worker import Job

log = logging.getLogger("mobile_moe.serve")


class Generation:
    """One request's tokens as they arrive from the worker thread, with stop strings applied to the text."""

    def __init__(self, llm: LLM, loop: asyncio.AbstractEventLoop, stops: list[str], on_finish: Callable[[GenerationResult | None], None]) -> None:
        self.llm, self.loop, self.stops, self.on_finish = llm, loop, stops, on_finish
        self.events: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.text = ""  # the reply so far, cut at a stop string
        self.sent = ""  # the part of it already handed out
        self.stopped = False
        self.job: Job | None = None  # set once queued: its result's log-probability record (SamplingParams.logprobs)
        self.reported = 0  # tokens whose log-probabilities were handed out

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

    def _send(self, end: int, last: bool = False) -> None:
        """Hand text[len(sent):end] to the event loop, with the log-probabilities of the tokens received since the last
        hand-out (`last`: also when no text is left)."""
        delta = self.text[len(self.sent) : end]
        if delta or last:
            self.sent += delta
            entries = self._entries()
            if delta or entries:
                self.loop.call_soon_threadsafe(self.events.put_nowait, ("text", delta, entries))

    def _entries(self) -> list[TokenLogprob]:
        """The log-probability entries of the tokens received and not yet reported (none when not recorded)."""
        record = None if self.job is None or self.job.result is None else self.job.result.logprobs
        if record is None:
            return []
        new = record[self.reported : len(self.ids)]
        self.reported += len(new)
        return new

    def on_done(self, result, err) -> None:
        """Worker thread: the generation ended (result) or failed (err); counted even when the client already left."""
        self._send(len(self.text), last=True)  # what was held back for a stop string that never came
        self.loop.call_soon_threadsafe(self.on_finish, result)
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("done", result, err))


@dataclass(frozen=True)
class Reply:
    """How one generation is answered: its endpoint's format and what the request asked to be included."""

    chat: bool
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: int | None = None  # chat logprobs with this many alternatives (None: not asked)
    meta: dict = field(default_factory=dict)  # id, created, model
    policy: PolicyConfig | None = None
    prompt_tokens: int = 0

    @property
    def object(self) -> str:
        """The answer's `object`."""
        return "chat.completion" if self.chat else "text_completion"

    def usage(self, result: GenerationResult) -> dict:
        """OpenAI's usage object."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(result.token_ids), "total_tokens": self.prompt_tokens + len(result.token_ids)}

    def logprobs_of(self, llm: LLM, entries: list[TokenLogprob]) -> dict | None:
        """A choice's `logprobs`: OpenAI's chat format when asked, else null."""
        return chat_logprobs(llm, entries) if self.chat and self.logprobs is not None else None


def _finish(result, gen: Generation) -> str:
    """OpenAI finish_reason: a stop string, EOS or a finished grammar is "stop", the token limit "length"."""
    return "stop" if gen.stopped or result.finish_reason == "stop" else "length"


def _extension(policy: PolicyConfig | None, result) -> dict:
    """The request's MoBiLE settings echoed back with its fallback count."""
    assert policy is not None
    return {"policy": policy.name, "tau": policy.tau, "criterion": policy.criterion, "fallback_tokens": result.stats.fallback_tokens}


class GenerationFailed(Exception):
    """The engine failed a request (its message says why; its cause is the engine's exception)."""


def failed(e: GenerationFailed) -> JSONResponse:
    """A failed generation's 500: its cause and traceback in the log, one line to the client."""
    cause = e.__cause__
    log.error("generation failed: %s", e, exc_info=(type(cause), cause, cause.__traceback__) if cause is not None else None)
    return error(500, f"generation failed: {e}", "server_error")


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
            raise GenerationFailed(" ".join(str(err).split()) or type(err).__name__) from err
        if result is None:
            raise GenerationFailed("the request was cancelled")
        return text, result


async def complete(gen: Generation, reply: Reply) -> JSONResponse:
    """Wait for the whole generation and answer in one JSON object."""
    try:
        text, result = await collect(gen)
    except GenerationFailed as e:
        return failed(e)
    choice = {"index": 0, "finish_reason": _finish(result, gen)}
    entries = (result.logprobs or [])[: len(gen.ids)]  # an EOS that ended the reply is not part of it
    choice |= {"message": {"role": "assistant", "content": text}} if reply.chat else {"text": text}
    choice["logprobs"] = reply.logprobs_of(gen.llm, entries)
    body = {**reply.meta, "object": reply.object, "choices": [choice], "usage": reply.usage(result), "mobile_moe": _extension(reply.policy, result)}
    return JSONResponse(body)


def _data(obj: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj)}\n\n"


async def stream(gen: Generation, job: Job, reply: Reply) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format (with include_usage, a last chunk with the usage and no choices),
    then [DONE]; a client that leaves cancels the job."""
    obj = "chat.completion.chunk" if reply.chat else "text_completion"
    usage_field = {"usage": None} if reply.include_usage else {}

    def chunk(delta: str | None, finish: str | None, entries: list[TokenLogprob], extra: dict | None = None) -> str:
        choice: dict = {"index": 0, "finish_reason": finish}
        choice |= {"delta": {} if delta is None else {"content": delta}} if reply.chat else {"text": delta or ""}
        choice["logprobs"] = reply.logprobs_of(gen.llm, entries) if entries else None
        return _data({**reply.meta, "object": obj, "choices": [choice], **usage_field, **(extra or {})})

    try:
        if reply.chat:
            yield _data({**reply.meta, "object": obj, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}], **usage_field})
        while True:
            event = await gen.events.get()
            if event[0] == "text":
                yield chunk(event[1], None, event[2])
                continue
            _, result, err = event
            if err is not None:
                log.error("generation failed while streaming: %s", " ".join(str(err).split()), exc_info=(type(err), err, err.__traceback__))
                yield _data({"error": {"message": f"generation failed: {' '.join(str(err).split())}", "type": "server_error", "code": 500}})
            elif result is not None:
                yield chunk(None, _finish(result, gen), [], {"mobile_moe": _extension(reply.policy, result)})
                if reply.include_usage:
                    yield _data({**reply.meta, "object": obj, "choices": [], "usage": reply.usage(result)})
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancelled.set()  # the client left (or the stream ended): the worker stops at the next token
