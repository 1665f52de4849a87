"""What the routes do: check a request, queue it on the engine worker, answer it whole or streamed."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace

from fastapi.responses import JSONResponse, StreamingResponse

from mobile_moe.config import PolicyConfig, SamplingParams, check_options
from mobile_moe.engine.llm import LLM
from mobile_moe.errors import MobileMoeError
from mobile_moe.serve.metrics import Metrics
from mobile_moe.serve.schemas import ChatRequest, Common, CompletionRequest, error
from mobile_moe.serve.scoring import scored_choice
from mobile_moe.serve.streaming import Generation, GenerationFailed, collect, complete, stream
from mobile_moe.serve.worker import EngineWorker, Job, QueueFull


@dataclass
class Handlers:
    """The server's request logic over one model and its worker; create_app routes HTTP to these methods."""

    llm: LLM
    worker: EngineWorker
    metrics: Metrics
    model_name: str
    max_tokens_cap: int
    defaults: PolicyConfig

    def validate(self, body: Common, prompt: list[int]) -> tuple[PolicyConfig, SamplingParams | None] | JSONResponse:
        """The request's policy and sampling (None for max_tokens 0), or the error to answer."""
        if body.model is not None and body.model != self.model_name:  # as OpenAI and vLLM answer an unknown model
            return error(404, f"The model `{body.model}` does not exist; this server serves `{self.model_name}`", "invalid_request_error")
        if body.max_tokens > self.max_tokens_cap:
            return error(400, f"max_tokens {body.max_tokens} is above this server's cap {self.max_tokens_cap}")
        policy = replace(self.defaults, **{k: v for k, v in (("name", body.policy), ("tau", body.tau), ("criterion", body.criterion)) if v is not None})
        try:
            check_options(PolicyConfig(policy.name, body.tau, body.criterion))  # the request's own fields, by the CLI's rules
            policy = self.llm.resolve_policy(policy)
            self.llm.check_prompt(prompt)
            return policy, (SamplingParams(body.max_tokens, body.temperature, body.top_p, body.seed) if body.max_tokens else None)
        except MobileMoeError as e:
            return error(400, str(e))

    def start(self, body: Common, prompt: list[int], policy: PolicyConfig, sampling: SamplingParams) -> tuple[Generation, Job] | JSONResponse:
        """Queue the generation; (its token stream, the job), or a 429."""
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        gen = Generation(self.llm, asyncio.get_running_loop(), stops, lambda result: self.metrics.record(result, len(prompt)))
        job = Job(prompt, sampling, policy, gen.on_token, gen.on_done)
        try:
            self.worker.submit(job)
        except QueueFull as e:
            return error(429, str(e), "rate_limit_error")
        return gen, job

    def meta(self, chat: bool) -> dict:
        """The id, time and model every answer starts with."""
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}

    async def run(self, body: Common, prompt: list[int], chat: bool):
        """One prompt generated, answered whole or streamed."""
        checked = self.validate(body, prompt)
        if isinstance(checked, JSONResponse):
            return checked
        policy, sampling = checked
        assert sampling is not None
        started = self.start(body, prompt, policy, sampling)
        if isinstance(started, JSONResponse):
            return started
        gen, job = started
        if body.stream:
            return StreamingResponse(stream(gen, job, self.meta(chat), chat, policy), media_type="text/event-stream")
        return await complete(gen, job, self.meta(chat), chat, policy, len(prompt))

    async def score(self, body: CompletionRequest, prompts: list[list[int]]):
        """Several prompts, echo or logprobs: every prompt generated together (the worker batches them), then scored."""
        if body.stream:
            return error(400, "stream is not supported with echo, logprobs, max_tokens 0 or several prompts")
        if body.max_tokens == 0 and not body.echo:
            return error(400, "max_tokens 0 scores the prompt: it needs echo")
        checks = [self.validate(body, p) for p in prompts]
        bad = next((c for c in checks if isinstance(c, JSONResponse)), None)
        if bad is not None:
            return bad
        started = []
        for prompt, (policy, sampling) in zip(prompts, checks):  # type: ignore[misc]
            job = None if sampling is None else self.start(body, prompt, policy, sampling)
            if isinstance(job, JSONResponse):
                return job
            started.append(job)
        try:
            outs = [(("", None) if job is None else await collect(job[0])) for job in started]
            choices = [
                await asyncio.to_thread(scored_choice, self.llm, i, prompt, text, result, body.echo, body.logprobs, policy)
                for i, (prompt, (text, result), (policy, _)) in enumerate(zip(prompts, outs, checks))
            ]  # type: ignore[misc]
        except GenerationFailed as e:
            return error(500, f"generation failed: {e}", "server_error")
        except MobileMoeError as e:
            return error(400, str(e))
        completion = sum(0 if r is None else len(r.token_ids) for _, r in outs)
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": completion, "total_tokens": sum(map(len, prompts)) + completion}
        return JSONResponse({**self.meta(False), "object": "text_completion", "choices": choices, "usage": usage})

    async def completions(self, body: CompletionRequest):
        """POST /v1/completions: one prompt generated, or several / echo / logprobs scored."""
        many = isinstance(body.prompt, list) and bool(body.prompt) and not isinstance(body.prompt[0], int)
        items = body.prompt if many else [body.prompt]
        prompts = [self.llm.encode(p) if isinstance(p, str) else list(p) for p in items]  # type: ignore[union-attr]
        if many or body.echo or body.logprobs is not None or body.max_tokens == 0:
            return await self.score(body, prompts)
        return await self.run(body, prompts[0], chat=False)

    async def chat_completions(self, body: ChatRequest):
        """POST /v1/chat/completions: the messages through the chat template, then generated."""
        try:
            prompt = self.llm.chat_prompt([m.model_dump() for m in body.messages])
        except MobileMoeError as e:
            return error(400, str(e))
        return await self.run(body, prompt, chat=True)
