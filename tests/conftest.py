"""Shared fixtures: tiny checkpoints of every architecture, built once per test session."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import ARCHITECTURES, build_checkpoint, configs  # noqa: E402

from mobile_moe import LLM, engine_config  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist the workers share the cores: each runs torch on its share (oversubscribed threads run slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of a tiny random checkpoint in hub format."""
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: build_checkpoint(arch, root / arch) for arch in ARCHITECTURES}


def small_cache(arch: str) -> int:
    """A cache holding fewer than a quarter of the model's routed experts (but one layer's top-k)."""
    cfg = configs()[arch].get_text_config()
    k = cfg.num_experts_per_tok
    return max(k, 1)


def open_llm(path: Path, **cache) -> LLM:
    """Load a checkpoint with a small default cache."""
    return LLM(path, engine_config(progress=False, **cache))


def little_k(arch: str) -> int:
    """Experts per token of the little model."""
    return math.ceil(configs()[arch].get_text_config().num_experts_per_tok / 2)
