"""One LLM shared by threads: calls are serialised and each equals its solo run; a failed call leaves the object usable."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from mobile_moe import LLM, PolicyConfig, SamplingParams, engine_config

PROMPTS = [[3 + i, 9, 4 + 2 * i, 17, 5] for i in range(8)]
GREEDY = SamplingParams(max_new_tokens=6, stop_at_eos=False)
MOBILE = PolicyConfig("mobile", tau=0.5)


def solo(path, prompt: list[int]) -> list[int]:
    """What one prompt gives on a fresh engine of its own."""
    return LLM(path, engine_config(expert_cache=6, progress=False)).generate(prompt, GREEDY, MOBILE).token_ids


def test_threads_sharing_one_llm_get_their_solo_outputs(checkpoints):
    path = checkpoints["qwen3_moe"]
    alone = [solo(path, p) for p in PROMPTS]
    shared = LLM(path, engine_config(expert_cache=6, progress=False))  # 6 slots: room for one step at a time
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda p: shared.generate(p, GREEDY, MOBILE).token_ids, PROMPTS))
    assert together == alone


def test_a_failed_call_leaves_the_llm_usable(checkpoints):
    path = checkpoints["qwen3_moe"]
    llm = LLM(path, engine_config(expert_cache=6, progress=False))
    transfer, real_load, calls = llm.cache.transfer, llm.cache.transfer.load, []

    def failing_load(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected transfer fault")
        return real_load(*args, **kwargs)

    transfer.load = failing_load
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(PROMPTS[0], GREEDY, MOBILE)
    transfer.load = real_load
    cache = llm.cache
    assert all(s.pins == 0 for s in cache.slots)
    assert len(cache.free) + len(cache.where) == cache.num_slots  # no slot lost to the failed copy
    assert llm.generate(PROMPTS[1], GREEDY, MOBILE).token_ids == solo(path, PROMPTS[1])


def test_tokens_stream_as_they_are_made_and_a_callback_can_stop_generation(checkpoints):
    llm = LLM(checkpoints["qwen3_moe"], engine_config(expert_cache=6, progress=False))
    whole = llm.generate(PROMPTS[2], GREEDY, MOBILE)
    seen: list[int] = []
    streamed = llm.generate(PROMPTS[2], GREEDY, MOBILE, on_token=lambda t: seen.append(t) or True)
    assert seen == streamed.token_ids == whole.token_ids and streamed.finish_reason == "length"
    stopped: list[int] = []
    cut = llm.generate(PROMPTS[2], GREEDY, MOBILE, on_token=lambda t: stopped.append(t) or len(stopped) < 2)  # a client leaves after 2
    assert cut.token_ids == whole.token_ids[:2] and cut.finish_reason == "cancelled"
    assert all(s.pins == 0 for s in llm.cache.slots)
    assert llm.generate(PROMPTS[2], GREEDY, MOBILE).token_ids == whole.token_ids  # the engine is free and unchanged
