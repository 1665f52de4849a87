"""What the routes do: check a request, queue it on the engine worker, answer it whole or streamed."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace

from fastapi.responses import JSONResponse, StreamingResponse

from mobile_moe.config import PolicyConfig, SamplingParams, check_options
from mobile_moe.engine.generate import GenerationResult
from mobile_moe.engine.llm import LLM
from mobile_moe.engine.processors import check_processing
from mobile_moe.errors import MobileMoeError
from mobile_moe.serve.metrics import Metrics
from mobile_moe.serve.schemas import ChatRequest, Common, CompletionRequest, bounded, error
from mobile_moe.serve.scoring import scored_choice
from mobile_moe.serve.streaming import Generation, GenerationFailed, Reply, collect, complete, failed, stream
from mobile_moe.serve.worker import EngineWorker, Job, QueueFull

RETRY_AFTER_S = 1  # a full queue's 429 asks the client to wait this long (Retry-After)


@dataclass
class Usage:
    """A request's token counts, for its access-log line (filled as its generations finish)."""

    prompt: int = 0
    completion: int = 0


@dataclass
class Handlers:
    """The server's request logic over one model and its worker; create_app routes HTTP to these methods."""

    llm: LLM
    worker: EngineWorker
    metrics: Metrics
    model_name: str
    max_tokens_cap: int
    defaults: PolicyConfig

    def refused(self, body: Common) -> JSONResponse | None:
        """The error for a request this server does not serve as asked, else None."""
        if body.model is not None and body.model != self.model_name:  # as OpenAI and vLLM answer an unknown model
            return error(404, f"The model `{bounded(body.model)}` does not exist; this server serves `{self.model_name}`", "invalid_request_error")
        if body.stream_options is not None and not body.stream:
            return error(400, "stream_options: only with stream true")
        if isinstance(body, ChatRequest) and body.top_logprobs is not None and not body.logprobs:
            return error(400, "top_logprobs: needs logprobs true")
        return None

    def validate(self, body: Common, prompt: list[int], tokens: int, logprobs: int | None = None) -> tuple[PolicyConfig, SamplingParams | None] | JSONResponse:
        """The request's policy and sampling (None for 0 tokens), or the error to answer; `logprobs`: record the
        generated tokens' log-probabilities with this many alternatives."""
        bad = self.refused(body)
        if bad is not None:
            return bad
        if tokens > self.max_tokens_cap:
            return error(400, f"max_tokens {tokens} is above this server's cap {self.max_tokens_cap}")
        policy = replace(self.defaults, **{k: v for k, v in (("name", body.policy), ("tau", body.tau), ("criterion", body.criterion)) if v is not None})
        try:
            check_options(PolicyConfig(policy.name, body.tau, body.criterion))  # the request's own fields, by the CLI's rules
            policy = self.llm.resolve_policy(policy)
            self.llm.check_prompt(prompt)
            if not tokens:
                return policy, None
            sampling = self.sampling(body, tokens, logprobs)
            check_options(PolicyConfig(policy.name), sampling.temperature)  # what the policy asks of sampling
            check_processing(sampling, policy)
            return policy, sampling
        except MobileMoeError as e:
            return error(400, str(e))

    def sampling(self, body: Common, tokens: int, logprobs: int | None) -> SamplingParams:
        """The request's SamplingParams, a response_format's schema compiled (a bad schema: a one-line error naming it)."""
        schema = None if body.response_format is None else body.response_format.wanted()
        try:
            grammar = None if schema is None else self.llm.grammars.compile(schema)
        except MobileMoeError as e:
            raise type(e)(f"response_format: {e}") from None
        return SamplingParams(
            tokens,
            body.temperature,
            body.top_p,
            body.seed,
            logprobs=logprobs,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            json_schema=schema,
            grammar=grammar,
        )

    def start(self, body: Common, prompt: list[int], policy: PolicyConfig, sampling: SamplingParams, usage: Usage) -> tuple[Generation, Job] | JSONResponse:
        """Queue the generation; (its token stream, the job), or a 429 with Retry-After."""

        def finished(result: GenerationResult | None) -> None:
            self.metrics.record(result, len(prompt))
            usage.prompt += len(prompt)
            usage.completion += 0 if result is None else len(result.token_ids)

        gen = Generation(self.llm, asyncio.get_running_loop(), body.stops(), finished)
        job = Job(prompt, sampling, policy, gen.on_token, gen.on_done)
        gen.job = job
        try:
            self.worker.submit(job)
        except QueueFull as e:
            return error(429, str(e), "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        return gen, job

    def meta(self, chat: bool) -> dict:
        """The id, time and model every answer starts with."""
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}

    async def run(self, body: Common, prompt: list[int], reply: Reply, tokens: int, usage: Usage):
        """One prompt generated, answered whole or streamed."""
        checked = self.validate(body, prompt, tokens, reply.logprobs)
        if isinstance(checked, JSONResponse):
            return checked
        policy, sampling = checked
        assert sampling is not None
        started = self.start(body, prompt, policy, sampling, usage)
        if isinstance(started, JSONResponse):
            return started
        gen, job = started
        reply = replace(reply, meta=self.meta(reply.chat), policy=policy, prompt_tokens=len(prompt))
        if body.stream:
            return StreamingResponse(stream(gen, job, reply), media_type="text/event-stream")
        return await complete(gen, reply)

    async def score(self, body: CompletionRequest, prompts: list[list[int]], usage: Usage):
        """Several prompts, echo or logprobs: every prompt generated together (the worker batches them), then scored."""
        if body.stream:
            return error(400, "stream is not supported with echo, logprobs, max_tokens 0 or several prompts")
        if body.max_tokens == 0 and not body.echo:
            return error(400, "max_tokens 0 scores the prompt: it needs echo")
        checks = [self.validate(body, p, body.max_tokens) for p in prompts]
        bad = next((c for c in checks if isinstance(c, JSONResponse)), None)
        if bad is not None:
            return bad
        started = []
        for prompt, (policy, sampling) in zip(prompts, checks):  # type: ignore[misc]
            job = None if sampling is None else self.start(body, prompt, policy, sampling, usage)
            if isinstance(job, JSONResponse):
                return job
            started.append(job)
            usage.prompt += len(prompt) if job is None else 0
        try:
            outs = [(("", None) if job is None else await collect(job[0])) for job in started]
            choices = [
                await asyncio.to_thread(scored_choice, self.llm, i, prompt, text, result, body.echo, body.logprobs, policy)
                for i, (prompt, (text, result), (policy, _)) in enumerate(zip(prompts, outs, checks))
            ]  # type: ignore[misc]
        except GenerationFailed as e:
            return failed(e)
        except MobileMoeError as e:
            return error(400, str(e))
        completion = sum(0 if r is None else len(r.token_ids) for _, r in outs)
        usage_body = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": completion, "total_tokens": sum(map(len, prompts)) + completion}
        return JSONResponse({**self.meta(False), "object": "text_completion", "choices": choices, "usage": usage_body})

    async def completions(self, body: CompletionRequest, usage: Usage):
        """POST /v1/completions: one prompt generated, or several / echo / logprobs scored."""
        many = isinstance(body.prompt, list) and bool(body.prompt) and not isinstance(body.prompt[0], int)
        items = body.prompt if many else [body.prompt]
        prompts = [self.llm.encode(p) if isinstance(p, str) else list(p) for p in items]  # type: ignore[union-attr]
        if many or body.echo or body.logprobs is not None or body.max_tokens == 0:
            return await self.score(body, prompts, usage)
        return await self.run(body, prompts[0], Reply(chat=False, include_usage=self.include_usage(body)), body.max_tokens, usage)

    async def chat_completions(self, body: ChatRequest, usage: Usage):
        """POST /v1/chat/completions: the messages through the chat template, then generated (by default up to the
        context, within the server's cap)."""
        try:
            prompt = self.llm.chat_prompt([m.for_template() for m in body.messages])
        except MobileMoeError as e:
            return error(400, str(e))
        asked = {t for t in (body.max_tokens, body.max_completion_tokens) if t is not None}
        if len(asked) > 1:
            return error(400, "max_tokens and max_completion_tokens differ: send one of them")
        tokens = asked.pop() if asked else max(1, min(self.max_tokens_cap, self.llm.max_context - len(prompt)))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await self.run(body, prompt, Reply(chat=True, include_usage=self.include_usage(body), logprobs=logprobs), tokens, usage)

    @staticmethod
    def include_usage(body: Common) -> bool:
        """Whether a stream ends with a usage chunk."""
        return body.stream_options is not None and body.stream_options.include_usage
