"""Shared fixtures: tiny checkpoints of every architecture, built once per test session."""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import ARCHITECTURES, build_checkpoint, configs  # noqa: E402

from mobile_moe import LLM, engine_config  # noqa: E402
from mobile_moe.engine.runner import RunnerOptions  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Engines decode eagerly unless a test asks otherwise (no compilation by default). Under pytest-xdist the workers
    share the cores: each runs torch on its share (oversubscribed threads run slower), also in
    the commands it runs (through OMP_NUM_THREADS, which the CLI's default thread count defers to)."""
    os.environ.setdefault("MOBILE_MOE_COMPILED_DIR", "off")  # no default ahead-of-time compilation (tests/test_compile.py turns it on)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory every xdist worker of this run sees (the run's base temp dir), or this process's own without xdist."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return tmp_path_factory.mktemp(name)
    root = tmp_path_factory.getbasetemp().parent / name  # basetemp is per worker; its parent is the run's
    root.mkdir(exist_ok=True)
    return root


def build_once(arch: str, root: Path) -> Path:
    """root/arch built by whichever worker comes first (under a file lock, renamed into place), reused by the others."""
    path = root / arch
    with FileLock(str(root / f"{arch}.lock")):
        if not path.is_dir():
            partial = root / f".{arch}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            os.replace(build_checkpoint(arch, partial), path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of a tiny random checkpoint in hub format, built once per run and shared by its workers."""
    root = shared_dir(tmp_path_factory, "ckpt")
    return {arch: build_once(arch, root) for arch in ARCHITECTURES}


def small_cache(arch: str) -> int:
    """A cache holding fewer than a quarter of the model's routed experts (but one layer's top-k)."""
    cfg = configs()[arch].get_text_config()
    k = cfg.num_experts_per_tok
    return max(k, 1)


def open_llm(path: Path, options: RunnerOptions | None = None, **cache) -> LLM:
    """Load a checkpoint; without `expert_cache`, the CPU default: every expert, the cache being the store itself."""
    return LLM(path, engine_config(progress=False, **cache), options)


def little_k(arch: str) -> int:
    """Experts per token of the little model."""
    return math.ceil(configs()[arch].get_text_config().num_experts_per_tok / 2)


@pytest.fixture
def one_thread():
    """One torch thread for a test of many tiny passes (more threads only add synchronisation to them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
