"""An in-process model for lm-evaluation-harness (pinned in the `lm-eval` extra): big vs mobile task scores one
argument apart.

    from lm_eval import simple_evaluate
    from mobile_moe.eval.lm_eval_backend import MobileMoeLM
    simple_evaluate(model=MobileMoeLM(policy="mobile", criterion="margin", tau=0.2), tasks=[...])

Importing the module also registers it with lm-eval as `mobile-moe` (lm-eval's own registry), so
`simple_evaluate(model="mobile-moe", model_args="policy=little,expert_cache=64", ...)` works too. Loglikelihoods
are teacher-forced under the policy (engine/scoring.py: mobile position by position through the pass it would
have emitted from); generation tasks decode through the engine, all requests of a call batched together.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401 (lm-eval registers its own models only into an empty registry: keep local-completions etc.)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.engine.llm import LLM, engine_config
from mobile_moe.engine.scoring import score_tokens


@register_model("mobile-moe")
class MobileMoeLM(LM):
    """lm-eval's LM interface over one mobile-moe LLM and one policy."""

    def __init__(
        self,
        pretrained: str | None = None,
        policy: str = "big",
        tau: float | None = None,
        criterion: str | None = None,
        expert_dtype: str = "auto",
        expert_cache: int | None = None,
        dtype: str = "auto",
        max_batch: int = 8,
        **_: object,
    ) -> None:
        super().__init__()
        config = engine_config(
            progress=False,
            dtype=dtype,
            expert_dtype=expert_dtype,
            expert_cache=None if expert_cache is None else int(expert_cache),
            max_batch=int(max_batch),
            batch_little="always",
        )
        self.llm = LLM(Path(pretrained) if pretrained and Path(pretrained).exists() else (pretrained or DEMO_MODEL), config)
        self.policy = self.llm.resolve_policy(PolicyConfig(policy, None if tau is None else float(tau), criterion))  # type: ignore[arg-type]

    def _ids(self, text: str) -> list[int]:
        return self.llm.encode(text) if text else []

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of the continuation's log-probabilities, whether each of its tokens was the most probable one)."""
        ids = (context or list(self.llm.eos_token_ids[:1])) + continuation
        ids = ids[-(self.llm.max_context - 1) :]
        scores = score_tokens(self.llm, ids, self.policy, top=1)
        n = len(continuation)
        greedy = all(top[0][0] == token for top, token in zip(scores.top[-n:], continuation))
        return float(sum(scores.token_logprobs[-n:])), greedy  # type: ignore[arg-type]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """log P(continuation | context) per request."""
        return [self._score(self._ids(context), self._ids(continuation)) for context, continuation in (r.args for r in requests)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """log P(text) per request, from an EOS start (texts longer than the context are scored on their end)."""
        return [self._score([], self._ids(text))[0] for (text,) in (r.args for r in requests)]

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, as gen_kwargs ask) continuations, cut at the first `until` string; all requests decoded together."""
        prompts, samplings, stops = [], [], []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts.append(self._ids(context)[-(self.llm.max_context // 2) :] or list(self.llm.eos_token_ids[:1]))
            samplings.append(SamplingParams(max_new_tokens=int(kwargs.get("max_gen_toks", 256)), temperature=temperature))
        results = self.llm.generate(prompts, samplings, self.policy) if prompts else []
        return [_cut(r.text or "", s) for r, s in zip(results, stops)]


def _cut(text: str, stops: list[str]) -> str:
    """The text up to its first stop string."""
    ends = [text.find(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else text
