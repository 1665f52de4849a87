"""Stores built one layer at a time: no build reserves every expert, a build that stops leaves nothing that passes for a
store, and a load that cannot fit in RAM is refused before it starts."""

from __future__ import annotations

import errno
import re
import weakref
from pathlib import Path

import pytest
import torch
from conftest import small_cache

from mobile_moe import LLM, engine_config
from mobile_moe.bench.synthetic import build_synthetic
from mobile_moe.cli import main
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.errors import CheckpointError, InvalidParameter
from mobile_moe.experts import disk, store
from mobile_moe.experts.disk import MANIFEST, RECORDS, read_manifest
from mobile_moe.loading import budget, quantize
from mobile_moe.loading.checkpoint import read_config
from mobile_moe.loading.loader import open_store
from mobile_moe.loading.quantize import quantize_checkpoint

STEPS = SamplingParams(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
POLICIES = (PolicyConfig("big"), PolicyConfig("little"), PolicyConfig("mobile", tau=0.9, criterion="max_prob"))


class Allocations:
    """Wraps the store's host allocator: every request's size, and the most bytes its buffers held at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self.live = self.most = 0
        allocate = store.allocate_host

        def observed(nbytes: int, pin: bool, *args):
            buffer = allocate(nbytes, pin, *args)
            self.sizes.append(nbytes)
            self.live += nbytes
            self.most = max(self.most, self.live)
            weakref.finalize(buffer, self._freed, nbytes)
            return buffer

        monkeypatch.setattr(store, "allocate_host", observed)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes


def _llm(path: Path, offload: Path | None, expert_dtype: str, dtype: str, **kw) -> LLM:
    return LLM(path, engine_config(progress=False, dtype=dtype, expert_dtype=expert_dtype, offload_dir=None if offload is None else str(offload), **kw))


@pytest.mark.parametrize(
    ("arch", "expert_dtype", "dtype", "group"),
    [
        ("qwen3_moe", "fp32", "float32", None),
        ("qwen3_moe", "bf16", "bfloat16", None),
        ("qwen3_moe", "fp16", "float32", None),
        ("qwen3_moe", "int8", "bfloat16", None),  # records converted to the fused kernel's layout on their way to disk
        ("qwen3_moe", "int4", "bfloat16", 16),
        ("gpt_oss", "mxfp4", "float32", None),  # fused expert tensors with biases
    ],
)
def test_a_checkpoint_build_stages_at_most_two_layers_and_decodes_like_ram(checkpoints, tmp_path: Path, monkeypatch, arch, expert_dtype, dtype, group):
    ram = _llm(checkpoints[arch], None, expert_dtype, dtype, group_size=group, expert_cache=small_cache(arch))
    allocations = Allocations(monkeypatch)
    built = _llm(checkpoints[arch], tmp_path / "store", expert_dtype, dtype, group_size=group, expert_cache=small_cache(arch))
    layer_bytes = built.loaded.store.num_experts * built.loaded.store.expert_bytes
    assert len(allocations.sizes) == len(built.info.moe_layers)  # each layer staged once, none reserved for the whole model
    assert max(allocations.sizes) == layer_bytes and allocations.most <= 2 * layer_bytes
    for policy in POLICIES:
        assert built.generate([5, 6, 7, 8], STEPS, policy).token_ids == ram.generate([5, 6, 7, 8], STEPS, policy).token_ids


@pytest.mark.parametrize(("expert_dtype", "group"), [("auto", None), ("int8", None), ("int4", 32), ("mxfp4", None)])
def test_a_synthetic_build_stages_one_layer_at_a_time_and_decodes_like_ram(tmp_path: Path, monkeypatch, expert_dtype, group):
    """Without fused kernels both builds draw the same random experts; the disk build holds one layer of them at a time."""
    kw = dict(dtype_name="float32", shrink=16, expert_dtype=expert_dtype, group_size=group, fused_kernels=False, layers=3)
    ram = LLM(build_synthetic("olmoe-1b-7b", torch.device("cpu"), **kw), engine_config(progress=False, expert_cache=8))
    allocations = Allocations(monkeypatch)
    loaded = build_synthetic("olmoe-1b-7b", torch.device("cpu"), offload_dir=tmp_path / "store", **kw)
    layer_bytes = loaded.store.num_experts * loaded.store.expert_bytes
    assert allocations.sizes == [layer_bytes] * 3 and allocations.most == layer_bytes
    built = LLM(loaded, engine_config(progress=False, expert_cache=8))
    for policy in POLICIES:
        assert built.generate([5, 6, 7, 8], STEPS, policy).token_ids == ram.generate([5, 6, 7, 8], STEPS, policy).token_ids


@pytest.mark.parametrize(("to", "arch", "group"), [("int8", "olmoe", None), ("int4", "olmoe", 8), ("mxfp4", "gpt_oss", None)])
def test_quantize_stages_at_most_two_layers_and_loads_like_on_the_fly_packing(checkpoints, tmp_path: Path, monkeypatch, to, arch, group):
    allocations = Allocations(monkeypatch)
    report = quantize_checkpoint(checkpoints[arch], tmp_path / "packed", to, group, progress=False)
    layers = len(allocations.sizes)
    layer_bytes = report.packed_expert_bytes // layers
    assert allocations.sizes == [layer_bytes] * layers and allocations.most <= 2 * layer_bytes
    monkeypatch.undo()
    packed = LLM(tmp_path / "packed", engine_config(progress=False, expert_cache=6))
    on_the_fly = LLM(checkpoints[arch], engine_config(progress=False, expert_cache=6, expert_dtype=to, group_size=group))
    assert packed.generate([5, 6, 7, 8], STEPS).token_ids == on_the_fly.generate([5, 6, 7, 8], STEPS).token_ids


def _failing_pwrite(monkeypatch: pytest.MonkeyPatch, after: int, error: BaseException) -> None:
    """Records write normally until `after` of them are on disk, then the next write raises `error`."""
    pwrite, calls = disk.os.pwrite, [0]

    def failing(fd: int, data, offset: int) -> int:
        calls[0] += 1
        if calls[0] > after:
            raise error
        return pwrite(fd, data, offset)

    monkeypatch.setattr(disk.os, "pwrite", failing)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RuntimeError("killed"), "failed at layer 1: killed; its records were removed"),  # a build stopped midway, at its second layer
        (OSError(errno.ENOSPC, "No space left on device"), "(layer 1): No space left on device; its records were removed"),  # a full disk
    ],
)
def test_a_build_that_stops_midway_leaves_no_store_and_says_so_in_one_line(checkpoints, tmp_path: Path, monkeypatch, capsys, error, message):
    path, directory = checkpoints["olmoe"], tmp_path / "store"
    ram = _llm(path, None, "auto", "float32")
    want, experts = ram.generate([3, 4, 5], STEPS).token_ids, ram.loaded.store.num_experts
    _failing_pwrite(monkeypatch, experts + 2, error)
    argv = ["generate", "--model", str(path), "--prompt-ids", "3,4,5", "--max-new-tokens", "6", "--dtype", "float32", "--offload-dir", str(directory)]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(directory) in err and message in err, err
    assert not (directory / MANIFEST).exists() and not (directory / RECORDS).exists() and read_manifest(directory) is None
    monkeypatch.undo()
    assert _llm(path, directory, "auto", "float32").generate([3, 4, 5], STEPS).token_ids == want  # built again from scratch


def test_an_interrupted_build_removes_its_records(checkpoints, tmp_path: Path, monkeypatch):
    directory = tmp_path / "store"
    _failing_pwrite(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        build_synthetic("olmoe-1b-7b", torch.device("cpu"), "float32", shrink=16, offload_dir=directory, layers=2)
    assert list(directory.iterdir()) == []  # no records, no manifest


def test_a_store_without_its_manifest_is_refused_by_a_reader_in_one_line(checkpoints, tmp_path: Path):
    directory = tmp_path / "store"
    llm = _llm(checkpoints["olmoe"], directory, "auto", "float32")
    manifest = read_manifest(directory)
    assert manifest is not None
    (directory / MANIFEST).unlink()  # as a build that wrote every record but stopped before its last step
    with pytest.raises(CheckpointError, match=r"holds no finished expert store \(no manifest.json") as caught:
        open_store(directory, manifest, llm.loaded.dtype, True)
    assert "\n" not in str(caught.value)


def test_a_full_disk_while_quantizing_keeps_nothing(checkpoints, tmp_path: Path, monkeypatch):
    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantize, "save_file", full)
    out = tmp_path / "packed"
    with pytest.raises(InvalidParameter, match=r"cannot write .*packed: No space left on device; nothing was kept") as caught:
        quantize_checkpoint(checkpoints["olmoe"], out, "int8", progress=False)
    assert "\n" not in str(caught.value) and list(tmp_path.iterdir()) == []  # neither the output nor its temporary directory


def test_the_load_prints_its_ram_plan_before_it_starts(checkpoints, tmp_path: Path, capsys):
    argv = ["generate", "--model", str(checkpoints["olmoe"]), "--prompt-ids", "3,4,5", "--max-new-tokens", "2", "--offload-dir", str(tmp_path / "s")]
    assert main([*argv, "--host-memory", "0.001"]) == 0
    err = capsys.readouterr().err
    plan = next(line for line in err.splitlines() if "RAM: dense weights" in line)
    assert "host tier" in plan and "KV cache" in plan and "available" in plan and "left" in plan
    assert err.index(plan) < err.index("wrote ")  # printed before the store is built; the build says what it wrote and how fast


def _plan(path: Path, host_memory: float) -> budget.HostPlan:
    return budget.host_plan_for_config(read_config(path), engine_config(offload_dir="unused", host_memory=host_memory))


@pytest.mark.parametrize(
    ("host_memory", "room", "message"),
    [
        ("1e-5", None, r"--host-memory 1e-05 GB holds 1 expert records of .* MiB: too small for one layer's top-4 experts"),
        ("1", 5, r"--host-memory 1 GB \(.* GiB\) \+ dense weights \(.*\) \+ KV cache \(.*\) is more than the .* of RAM available: give --host-memory"),
        ("1", 3, r"of RAM is available, less than the dense weights \(.*\) \+ the KV cache \(.*\) \+ one layer's top-4 experts .*: this model cannot run"),
    ],
)
def test_a_host_budget_that_cannot_run_is_refused_in_one_line_before_loading(checkpoints, tmp_path: Path, monkeypatch, capsys, host_memory, room, message):
    """`room`: RAM available for that many expert records beside the dense weights and the KV cache (else this machine's)."""
    path, directory = checkpoints["olmoe"], tmp_path / "store"
    if room is not None:
        plan = _plan(path, float(host_memory))
        assert plan.host_slots == plan.total_experts > room  # the whole model's records would fit in the budget, not in the RAM
        monkeypatch.setattr(budget, "available_memory_bytes", lambda: plan.dense_bytes + plan.kv_bytes + room * plan.record_bytes)
    argv = ["generate", "--model", str(path), "--prompt-ids", "3,4,5", "--offload-dir", str(directory), "--host-memory", host_memory]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (directory / RECORDS).exists()  # refused before the build
