"""Behaviour checked against oracles that share no code with the engine's answer: transformers' own models decoding
MoBiLE by hand with confidences computed here (the fallback decision, teacher-forced scoring), the float model against
quantized experts, a sampler's analytic distribution, and where generation stops at an end-of-sequence token."""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from checkpoints import reference_model
from conftest import little_k, open_llm, small_cache

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config
from mobile_moe.engine.scoring import score_tokens
from mobile_moe.layers.sampler import sample
from mobile_moe.policy.importance import SIGNALS

PROMPT = [7, 3, 44, 19, 28, 90, 11]
OTHER_PROMPT = [40, 41, 12, 60, 3]
STEPS = 16  # tokens per generation: the prefill's, then 15 decode steps
UNDECIDED = 1e-4  # a confidence this close to tau could go either way under float32 rounding; the oracle must avoid it


# --- confidences, computed here from the definitions in docs/design.md §1 (float64, no engine code) ---


def softmax64(logits: torch.Tensor) -> torch.Tensor:
    """logits: [V] -> probabilities [V] float64, exp(l - max) / sum."""
    z = logits.double() - logits.double().max()
    return z.exp() / z.exp().sum()


def max_prob(logits: torch.Tensor) -> float:
    """Little's top-1 probability."""
    return float(softmax64(logits).max())


def entropy_confidence(logits: torch.Tensor) -> float:
    """1 - H(p) / log V: 1 for a one-hot distribution, 0 for a uniform one."""
    p = softmax64(logits)
    return float(1.0 + (p * p.log()).sum() / math.log(p.numel()))


def margin(logits: torch.Tensor) -> float:
    """Top-1 minus top-2 probability."""
    top = softmax64(logits).sort(descending=True).values
    return float(top[0] - top[1])


CONFIDENCE = {"max_prob": max_prob, "entropy": entropy_confidence, "margin": margin}


def middle_taus(confidences: list[float]) -> list[float]:
    """Taus halfway between neighbouring confidences, those splitting the steps most evenly first."""
    ordered = sorted(confidences)
    mid = len(ordered) // 2
    return [(ordered[i - 1] + ordered[i]) / 2 for i in sorted(range(1, len(ordered)), key=lambda i: abs(i - mid))]


# --- MoBiLE decoded by hand on transformers' models ---


@dataclass
class Replay:
    """What a greedy MoBiLE generation must give: every token, and per decode step little's logits, its confidence and
    the decision."""

    tokens: list[int]
    little: list[torch.Tensor]  # [V] each
    confidences: list[float]
    fell_back: list[bool]


class HandDecoder:
    """transformers' big model (all top-k experts) and little model (num_experts_per_tok = little k) of one checkpoint."""

    def __init__(self, path: Path) -> None:
        self.big = reference_model(path)
        self.little = reference_model(path, num_experts_per_tok=little_k(path.name))

    @torch.no_grad()
    def replay(self, prompt: list[int], tau: float, criterion: str, steps: int = STEPS) -> Replay:
        """Big prefill; then each step runs little on the last token, and when little's confidence is below tau forgets
        that pass (the cache as it was before it) and takes big's greedy token instead."""
        out = self.big(torch.tensor([prompt]), use_cache=True)
        kv, token = out.cache, int(out.logits[0, -1].argmax())
        result = Replay([token], [], [], [])
        for _ in range(steps - 1):
            before = copy.deepcopy(kv)
            little = self.little(torch.tensor([[token]]), cache=kv, use_cache=True).logits[0, -1]  # [V]
            conf = CONFIDENCE[criterion](little)
            if conf < tau:
                kv = before
                token = int(self.big(torch.tensor([[token]]), cache=kv, use_cache=True).logits[0, -1].argmax())
            else:
                token = int(little.argmax())
            result.tokens.append(token)
            result.little.append(little)
            result.confidences.append(conf)
            result.fell_back.append(conf < tau)
        return result

    def split_replay(self, prompt: list[int], criterion: str) -> tuple[float, Replay]:
        """(tau, the replay under it): the first tau between neighbouring confidences of an all-little decode, middle ones
        first, whose replay has both fallbacks and little steps and no confidence within UNDECIDED of tau."""
        for tau in middle_taus(self.replay(prompt, 0.0, criterion).confidences)[:4]:
            expected = self.replay(prompt, tau, criterion)
            if 0 < sum(expected.fell_back) < len(expected.fell_back) and decided(expected, tau):
                return tau, expected
        raise AssertionError("no tau near the middle splits this decode clearly")


def decided(replay: Replay, tau: float) -> bool:
    """Whether no confidence of the replay is within UNDECIDED of tau."""
    return min(abs(c - tau) for c in replay.confidences) > UNDECIDED


def assert_generation_is(result, expected: Replay) -> None:
    """The engine's tokens, decisions and recorded confidences are the hand decode's."""
    assert result.token_ids == expected.tokens
    assert [s.fell_back for s in result.steps[1:]] == expected.fell_back
    assert [s.confidence for s in result.steps[1:]] == pytest.approx(expected.confidences, abs=1e-5)
    assert result.stats.fallback_tokens == sum(expected.fell_back)


GREEDY = SamplingParams(max_new_tokens=STEPS, stop_at_eos=False)


@pytest.mark.parametrize("arch, criterion", [("qwen3_moe", "max_prob"), ("deepseek_v3", "max_prob"), ("olmoe", "entropy"), ("mixtral", "margin")])
def test_mobile_falls_back_exactly_where_littles_own_softmax_is_below_tau(checkpoints, arch: str, criterion: str):
    """This fails if the engine's confidence is not the criterion's (e.g. 1 - max p), or tau is applied the wrong way."""
    tau, expected = HandDecoder(checkpoints[arch]).split_replay(PROMPT, criterion)
    llm = open_llm(checkpoints[arch], expert_cache=small_cache(arch))
    assert_generation_is(llm.generate(PROMPT, GREEDY, PolicyConfig("mobile", tau=tau, criterion=criterion)), expected)
    # recording every signal (calibration data) measures through another path: the same decisions, each signal as defined
    recorded = llm.generate(PROMPT, GREEDY, PolicyConfig("mobile", tau=tau, criterion=criterion, record_signals=True))
    assert_generation_is(recorded, expected)
    for step, little in zip(recorded.steps[1:], expected.little):
        for name, definition in CONFIDENCE.items():
            assert step.signals[SIGNALS.index(name)] == pytest.approx(definition(little), abs=1e-5)


def test_batched_mobile_rows_fall_back_where_their_own_softmax_is_below_tau(checkpoints):
    """Two prompts decoded together (the server's path), little first for both: each row follows its own hand decode."""
    hand = HandDecoder(checkpoints["qwen3_moe"])
    tau, first = hand.split_replay(PROMPT, "max_prob")
    second = hand.replay(OTHER_PROMPT, tau, "max_prob")
    assert decided(second, tau)
    llm = LLM(checkpoints["qwen3_moe"], engine_config(progress=False, max_batch=2, batch_little="always"))
    results = llm.generate([PROMPT, OTHER_PROMPT], GREEDY, PolicyConfig("mobile", tau=tau, criterion="max_prob"))
    assert_generation_is(results[0], first)
    assert_generation_is(results[1], second)


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
def test_mobile_scoring_takes_little_where_its_own_softmax_clears_tau(checkpoints, criterion: str):
    """Teacher-forced scoring under mobile (lm-eval's loglikelihood): each position's log-probability is little's where
    little's confidence there is at least tau, else big's; both from transformers, the confidence computed here. This
    fails if the scoring's confidence is not the criterion's."""
    hand = HandDecoder(checkpoints["qwen3_moe"])
    ids = PROMPT + hand.replay(PROMPT, 0.0, "max_prob").tokens  # [T]
    with torch.no_grad():
        big = hand.big(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)  # [T - 1, V]
        little_logits = hand.little(torch.tensor([ids[:-1]])).logits[0]
    confidences = [CONFIDENCE[criterion](row) for row in little_logits]
    tau = next(t for t in middle_taus(confidences) if min(abs(c - t) for c in confidences) > UNDECIDED)
    confident = torch.tensor(confidences) >= tau  # [T - 1]
    assert 0 < int(confident.sum()) < len(confidences)
    chosen = torch.where(confident[:, None], little_logits.double().log_softmax(-1), big)  # [T - 1, V]
    expected = chosen.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    llm = open_llm(checkpoints["qwen3_moe"])
    got = score_tokens(llm, ids, PolicyConfig("mobile", tau=tau, criterion=criterion), top=0).token_logprobs
    assert got[0] is None and got[1:] == pytest.approx(expected, abs=1e-4)


# --- quantized experts against the float model ---

QUANT_PROMPT = [5, 17, 33, 8, 61, 12, 40, 3, 77, 21, 9, 50, 2, 70, 14, 88]
GROUP = 8  # int4 group: divides every test model's hidden (32) and expert widths (16)
NOISE_DRAWS = 3


def half_step(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w: [..., out, in] -> half the format's rounding step at each weight [..., out, in], from its documented grid:
    int8 spans each row's largest |w| with 127 steps; int4 spans each group of GROUP's [min, max] with 15."""
    if fmt == "int8":
        return (w.abs().amax(-1, keepdim=True) / 127 / 2).expand_as(w)
    g = w.unflatten(-1, (-1, GROUP))  # [..., out, in / GROUP, GROUP]
    return ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15 / 2).expand_as(g).flatten(-2)


def rms(x: torch.Tensor) -> float:
    """Root mean square of a tensor."""
    return float(x.double().pow(2).mean().sqrt())


@cache
def float_logits(path: Path) -> torch.Tensor:
    """transformers' float32 logits of QUANT_PROMPT [T, V]."""
    with torch.no_grad():
        return reference_model(path)(torch.tensor([QUANT_PROMPT])).logits[0]


@cache
def rounding_noise_error(path: Path, fmt: str) -> float:
    """The median over NOISE_DRAWS of the RMS logit error of transformers' model whose routed experts carry uniform noise
    of up to half the format's step: what rounding to that grid costs the logits, measured without any quantizer."""
    errors = []
    for seed in range(NOISE_DRAWS):
        model, gen = reference_model(path), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, w in model.named_parameters():
                if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, out, in] routed experts only
                    w.add_(half_step(w, fmt) * (2 * torch.rand(w.shape, generator=gen) - 1))
            errors.append(rms(model(torch.tensor([QUANT_PROMPT])).logits[0] - float_logits(path)))
    return sorted(errors)[NOISE_DRAWS // 2]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("fmt, fused", [("int8", True), ("int8", False), ("int4", False)])
def test_quantized_experts_cost_the_logits_what_their_rounding_does(checkpoints, arch: str, fmt: str, fused: bool):
    """Bound: the quantized model's RMS logit error against transformers' float32 model is within a factor 3 (either way)
    of the error of uniform noise of up to half a quantization step on every routed expert weight (measured 0.9-1.3x
    here). This fails under a wrong scale (int4 or int8 weights x1.5 give 8-200x), and for experts left unquantized."""
    llm = LLM(checkpoints[arch], engine_config(progress=False, expert_dtype=fmt, group_size=GROUP if fmt == "int4" else None, fused_kernels=fused))
    assert llm.loaded.store.format.quantized
    error, noise = rms(llm.logits(QUANT_PROMPT) - float_logits(checkpoints[arch])), rounding_noise_error(checkpoints[arch], fmt)
    assert noise / 3 < error < 3 * noise, f"{fmt} logit error {error:.4g} against rounding noise {noise:.4g}"


# --- temperature and nucleus sampling against the analytic distribution ---

SAMPLER_LOGITS = torch.tensor([2.0, 1.2, 0.9, 0.3, 0.0, -0.4, -1.0, -2.5])
DRAWS = 10_000
FREQUENCY_BOUND = 5 * 0.5 / math.sqrt(DRAWS)  # 5 standard deviations of a frequency at its widest (p = 1/2): 0.025


def nucleus_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / T) [V] float64 cut to the most probable tokens whose mass before each is under top_p, renormalised."""
    p = softmax64(logits / temperature)
    order = p.argsort(descending=True)
    mass_before = p[order].cumsum(0) - p[order]  # [V] in descending order
    kept = torch.zeros_like(p)
    kept[order[mass_before < top_p]] = p[order[mass_before < top_p]]
    return kept / kept.sum()


# each case tells a mistake apart by several bounds: T ignored or inverted moves a frequency by 0.12-0.27; a nucleus one
# token short moves one by 0.14 or 0.31, one token long draws a token that must never come
@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.8), (1.5, 1.0), (1.0, 0.6)])
def test_sampler_draws_softmax_over_temperature_cut_to_the_nucleus(temperature: float, top_p: float):
    expected = nucleus_distribution(SAMPLER_LOGITS, temperature, top_p)  # [V]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(SAMPLER_LOGITS, temperature, top_p, gen) for _ in range(DRAWS)])
    frequency = torch.bincount(draws, minlength=len(SAMPLER_LOGITS)).double() / DRAWS
    assert torch.all(frequency[expected == 0] == 0), "a token outside the nucleus was drawn"
    assert float((frequency - expected).abs().max()) < FREQUENCY_BOUND


def sampled_by_hand(model, prompt: list[int], steps: int, temperature: float, top_p: float, seed: int) -> list[int]:
    """Tokens drawn by the sampler (checked above) from transformers' logits at each position, in order from one generator."""
    gen, ids = torch.Generator().manual_seed(seed), list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(sample(model(torch.tensor([ids])).logits[0, -1], temperature, top_p, gen)))
    return ids[len(prompt) :]


def test_generation_samples_every_step_from_transformers_logits_with_its_seeded_generator(checkpoints):
    """Big decoding at T = 0.7, top-p 0.5, seeded: each token is the sampler's draw from transformers' logits at that
    position, made in order from one generator seeded with the request's seed. This fails if the engine drops the
    temperature or the nucleus (the hand decode without them differs) or reseeds between steps."""
    model = reference_model(checkpoints["qwen3_moe"])
    expected = sampled_by_hand(model, PROMPT, 12, 0.7, 0.5, seed=7)
    assert expected != sampled_by_hand(model, PROMPT, 12, 0.7, 1.0, seed=7)  # the nucleus changes this draw
    assert expected != sampled_by_hand(model, PROMPT, 12, 1.0, 0.5, seed=7)  # and so does the temperature
    sampling = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.5, seed=7, stop_at_eos=False)
    assert open_llm(checkpoints["qwen3_moe"]).generate(PROMPT, sampling, PolicyConfig("big")).token_ids == expected


# --- end of sequence ---

EOS_STEPS = 12


def greedy_by_transformers(path: Path, prompt: list[int], eos: int | None) -> list[int]:
    """transformers' greedy continuation of up to EOS_STEPS tokens, ending with the EOS token when it comes."""
    with torch.no_grad():
        out = reference_model(path).generate(torch.tensor([prompt]), max_new_tokens=EOS_STEPS, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def eos_checkpoint(checkpoints, tmp_path_factory) -> tuple[Path, int]:
    """(a copy of the qwen3_moe checkpoint whose EOS token greedy decoding of PROMPT emits 4th or later, that token)."""
    tokens = greedy_by_transformers(checkpoints["qwen3_moe"], PROMPT, None)
    eos = next(t for j, t in enumerate(tokens) if j >= 3 and t not in tokens[:j])
    path = tmp_path_factory.mktemp("eos") / "qwen3_moe"
    shutil.copytree(checkpoints["qwen3_moe"], path)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({**config, "eos_token_id": eos}))
    return path, eos


def assert_stopped_at(result, streamed: list[int], expected: list[int], eos: int) -> None:
    """The generation is transformers' up to and including EOS, ends as "stop", and the callback saw all but the EOS."""
    assert expected[-1] == eos and eos not in expected[:-1]
    assert result.token_ids == expected and result.finish_reason == "stop"
    assert streamed == expected[:-1]


@pytest.mark.parametrize("policy", [PolicyConfig("big"), PolicyConfig("mobile", tau=1.5, kv_repair=4, rollback=True)], ids=["big", "mobile-rollback"])
def test_generation_stops_at_eos_without_streaming_it(eos_checkpoint, policy: PolicyConfig):
    """mobile with tau above 1 emits big's tokens, through the stream that holds tokens back for rollbacks."""
    path, eos = eos_checkpoint
    streamed: list[int] = []
    result = open_llm(path).generate(PROMPT, SamplingParams(max_new_tokens=EOS_STEPS), policy, on_token=lambda t: streamed.append(t) or True)
    assert_stopped_at(result, streamed, greedy_by_transformers(path, PROMPT, eos), eos)


def test_batched_rows_stop_at_eos_without_streaming_it(eos_checkpoint):
    """Rows decoded together (the server's worker path): the row that reaches EOS stops there, the other runs on."""
    path, eos = eos_checkpoint
    expected = [greedy_by_transformers(path, prompt, eos) for prompt in (PROMPT, OTHER_PROMPT)]
    assert len(expected[1]) == EOS_STEPS and eos not in expected[1]
    streamed: list[list[int]] = [[], []]
    llm = LLM(path, engine_config(progress=False, max_batch=2))
    first, second = llm.generate(
        [PROMPT, OTHER_PROMPT], SamplingParams(max_new_tokens=EOS_STEPS), PolicyConfig("big"), on_token=lambda i, t: streamed[i].append(t) or True
    )
    assert_stopped_at(first, streamed[0], expected[0], eos)
    assert second.token_ids == streamed[1] == expected[1] and second.finish_reason == "length"


def test_server_stops_at_eos_and_never_sends_its_text(tmp_path):
    """The demo model with a word it writes as its EOS: the server's text, streamed or whole, is the greedy continuation
    (big, which test_parity holds to transformers) cut before that token, and finish_reason is stop."""
    import httpx
    from test_serve import serving

    from mobile_moe.engine.calibration import DEMO_MODEL

    prompt = "def add(a, b):"
    llm = LLM(DEMO_MODEL, engine_config(progress=False))
    ids = llm.encode(prompt)
    tokens = llm.generate(ids, SamplingParams(max_new_tokens=EOS_STEPS, stop_at_eos=False), PolicyConfig("big")).token_ids
    eos = next(t for j, t in enumerate(tokens) if j >= 3 and t not in tokens[:j] and llm.decode([t]).strip())  # a visible word
    for item in DEMO_MODEL.iterdir():  # the demo checkpoint with that EOS; the tokenizer's own EOS stays one too
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((DEMO_MODEL / "config.json").read_text()), "eos_token_id": eos}))
    expected = tokens[: tokens.index(eos)]
    text = llm.decode(expected)
    assert text != llm.decode(expected + [eos])  # the EOS token's text would show
    body = {"prompt": prompt, "max_tokens": EOS_STEPS, "temperature": 0}
    with serving(LLM(tmp_path, engine_config(progress=False))) as (url, _):
        whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        lines = [
            line[6:] for line in httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=60).text.splitlines() if line.startswith("data: {")
        ]
    chunks = [json.loads(line)["choices"][0] for line in lines]
    assert whole["text"] == text and whole["finish_reason"] == "stop"
    assert "".join(c["text"] for c in chunks) == text and chunks[-1]["finish_reason"] == "stop"
