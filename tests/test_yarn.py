"""DeepSeek's YaRN rotary as real checkpoints configure it (DeepSeek-V2-Lite, DeepSeek-V3: `rope_scaling` with type yarn,
factor 40, mscale and mscale_all_dim) against transformers: interpolated frequencies, the cos/sin attention factor
mscale / mscale_all_dim, and the softmax scale times mscale_all_dim's mscale squared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import reference_model
from conftest import open_llm, small_cache

from mobile_moe import PolicyConfig, SamplingParams

PROMPT = [(11 * i + 5) % 90 + 4 for i in range(40)]
ORIGINAL_CONTEXT = 64  # original_max_position_embeddings: wavelengths longer than this get interpolated
FACTOR = 40  # as both real configs
ATOL = 1e-4  # float32, as test_parity

# config.json's rope as each checkpoint writes it (original_max_position_embeddings 4096 there, scaled down here)
ROPES = {
    "v2-lite": ("deepseek_v2", "rope_scaling", {"type": "yarn", "factor": FACTOR, "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}),
    "v3": ("deepseek_v3", "rope_scaling", {"type": "yarn", "factor": FACTOR, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}),
    # unequal mscales (cos/sin scaled by mscale / mscale_all_dim != 1), in transformers' own rope_parameters form
    "unequal": (
        "deepseek_v3",
        "rope_parameters",
        {"rope_type": "yarn", "factor": FACTOR, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 32, "beta_slow": 1},
    ),
}


@pytest.fixture(scope="module", params=list(ROPES))
def yarn_checkpoint(request, checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of a tiny DeepSeek checkpoint with the rope of ROPES[param] in its config.json, the original: the same
    weights with the default rope)."""
    arch, key, rope = ROPES[request.param]
    plain = checkpoints[arch]
    path = tmp_path_factory.mktemp(f"yarn-{request.param}") / arch
    shutil.copytree(plain, path)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(
        {key: {**rope, "original_max_position_embeddings": ORIGINAL_CONTEXT}, "rope_theta": 10000.0, "max_position_embeddings": FACTOR * ORIGINAL_CONTEXT}
    )
    (path / "config.json").write_text(json.dumps(config))
    return path, plain


def test_yarn_logits_and_greedy_tokens_match_transformers(yarn_checkpoint):
    """Prefill logits and a 12-token greedy decode (through the KV cache) equal transformers'; the oracle runs YaRN, which
    moves these logits far beyond ATOL from the default rope's, so a rope read as default, a missing attention factor
    or a missing softmax mscale fails."""
    path, plain = yarn_checkpoint
    reference = reference_model(path)
    assert reference.config.rope_parameters["rope_type"] == "yarn"
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT])).logits[0]
        default = reference_model(plain)(torch.tensor([PROMPT])).logits[0]
        out = reference.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert (expected - default).abs().max() > 100 * ATOL
    llm = open_llm(path, expert_cache=small_cache(path.name))
    torch.testing.assert_close(llm.logits(PROMPT), expected, atol=ATOL, rtol=0)
    got = llm.generate(PROMPT, SamplingParams(max_new_tokens=12, stop_at_eos=False), PolicyConfig("big"))
    assert got.token_ids == out[0, len(PROMPT) :].tolist()
