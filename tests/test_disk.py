"""The disk tier: an on-disk expert store read on demand gives exactly the in-RAM tokens, and is never trusted blindly."""

from __future__ import annotations

import gc
import json
import logging
import threading
import weakref
from pathlib import Path

import httpx
import pytest
import torch
from conftest import small_cache
from test_datapath import FakeFence, Records
from test_serve import PROMPT, serving

from mobile_moe import LLM, engine_config
from mobile_moe.cli import bench as bench_command
from mobile_moe.cli import main
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.errors import CacheTooSmall, CheckpointError, InvalidParameter
from mobile_moe.experts.cache import ExpertCache
from mobile_moe.experts.disk import MANIFEST, RECORDS, StoreCorrupt, aligned_empty
from mobile_moe.experts.reader import Priority, ReadPool
from mobile_moe.experts.store import pins_host_store
from mobile_moe.experts.transfer import TransferEngine
from mobile_moe.loading.budget import GIB

STEPS = SamplingParams(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
MOBILE = PolicyConfig("mobile", tau=0.9, criterion="max_prob")


def _llm(path: Path, store: Path | None, expert_dtype: str = "auto", dtype: str = "float32", **kw) -> LLM:
    return LLM(path, engine_config(progress=False, dtype=dtype, expert_dtype=expert_dtype, offload_dir=None if store is None else str(store), **kw))


@pytest.mark.parametrize(
    ("arch", "expert_dtype", "dtype"),
    [
        ("qwen3_moe", "auto", "float32"),
        ("qwen3_moe", "int8", "float32"),
        ("deepseek_v2", "auto", "float32"),
        ("deepseek_v2", "int8", "float32"),
        ("qwen3_moe", "int8", "bfloat16"),
        ("qwen3_moe", "int4", "bfloat16"),  # int8: records streamed in the fused kernel layout
        ("gpt_oss", "auto", "float32"),  # expert biases: a layer is complete only with them
    ],
)
def test_disk_tier_decodes_exactly_like_ram(checkpoints, tmp_path: Path, arch: str, expert_dtype: str, dtype: str):
    slots = small_cache(arch)
    kw = dict(expert_cache=slots, group_size=16 if expert_dtype == "int4" else None)
    ram = _llm(checkpoints[arch], None, expert_dtype, dtype, **kw)
    disk = _llm(checkpoints[arch], tmp_path / "store", expert_dtype, dtype, **kw)
    assert disk.cache.reader is not None and disk.loaded.store.total_experts > slots
    assert disk.loaded.store.format.layout_id == ram.loaded.store.format.layout_id  # the kernel layout where RAM has one
    for policy in (PolicyConfig("big"), PolicyConfig("little"), MOBILE):
        want, got = ram.generate([5, 6, 7, 8], STEPS, policy), disk.generate([5, 6, 7, 8], STEPS, policy)
        assert got.token_ids == want.token_ids
        assert got.stats.fallback_tokens == want.stats.fallback_tokens
        assert got.stats.disk_bytes > 0 and want.stats.disk_bytes == 0
    again = _llm(checkpoints[arch], tmp_path / "store", expert_dtype, dtype, **kw)  # reused: no expert read from the checkpoint
    assert again.generate([5, 6, 7, 8], STEPS).token_ids == ram.generate([5, 6, 7, 8], STEPS).token_ids


def _three_tiers(path: Path, store: Path, host_records: int, expert_dtype: str = "auto", dtype: str = "float32", **kw) -> LLM:
    """Disk -> host tier of `host_records` records -> a compute cache of `expert_cache` slots: the CUDA data path, on the CPU."""
    record = _llm(path, store, expert_dtype, dtype, **kw).loaded.store.record_bytes  # builds the store
    return _llm(path, store, expert_dtype, dtype, host_memory=host_records * record / GIB, **kw)


def _no_pins(llm: LLM) -> bool:
    caches = [llm.cache] + ([llm.cache.host] if llm.cache.host is not None else [])
    return all(slot.pins == 0 for cache in caches for slot in cache.slots)


@pytest.mark.parametrize(("arch", "expert_dtype", "dtype"), [("olmoe", "auto", "float32"), ("qwen3_moe", "int4", "bfloat16")])
def test_three_tiers_decode_exactly_like_ram_and_count_each_tier(checkpoints, tmp_path: Path, arch: str, expert_dtype: str, dtype: str):
    slots = small_cache(arch)
    kw = dict(expert_cache=slots, group_size=16 if expert_dtype == "int4" else None)
    ram = _llm(checkpoints[arch], None, expert_dtype, dtype, **kw)
    three = _three_tiers(checkpoints[arch], tmp_path / "store", slots + 4, expert_dtype, dtype, **kw)
    assert three.cache.host is not None and three.cache.reader is None
    assert three.cache.host.num_slots == slots + 4 < three.loaded.store.total_experts
    host_hits = 0
    for policy in (PolicyConfig("big"), PolicyConfig("little"), MOBILE):
        want, got = ram.generate([5, 6, 7, 8], STEPS, policy), three.generate([5, 6, 7, 8], STEPS, policy)
        assert got.token_ids == want.token_ids and got.stats.fallback_tokens == want.stats.fallback_tokens
        assert got.stats.disk_bytes > 0 and got.stats.h2d_bytes >= got.stats.expert_misses * three.loaded.store.expert_bytes
        assert got.stats.host_tier_hits <= got.stats.expert_misses + got.stats.prefetched
        host_hits += got.stats.host_tier_hits
        assert _no_pins(three)
    assert host_hits > 0  # some compute-cache misses were served from RAM, not the disk


def test_a_host_tier_smaller_than_one_layers_top_k_is_refused(checkpoints, tmp_path: Path):
    path, slots = checkpoints["olmoe"], small_cache("olmoe")
    with pytest.raises(CacheTooSmall, match=r"--host-memory .* too small for one layer's top-\d+ experts"):
        _three_tiers(path, tmp_path / "store", slots - 1, expert_cache=slots)


def test_a_store_without_its_manifest_is_rebuilt_never_used(checkpoints, tmp_path: Path):
    path, store = checkpoints["olmoe"], tmp_path / "store"
    want = _llm(path, store).generate([3, 4, 5], STEPS).token_ids
    (store / MANIFEST).unlink()  # a build killed before its last step
    with open(store / RECORDS, "r+b") as f:  # ... and whose records are garbage
        f.write(b"\xff" * 8192)
    assert _llm(path, store).generate([3, 4, 5], STEPS).token_ids == want  # rebuilt
    assert (store / MANIFEST).exists()


@pytest.mark.parametrize("tiers", [2, 3])
def test_a_damaged_record_is_named_and_the_engine_stays_usable(checkpoints, tmp_path: Path, tiers: int):
    path, store, slots = checkpoints["olmoe"], tmp_path / "store", small_cache("olmoe")
    llm = _llm(path, store, expert_cache=slots) if tiers == 2 else _three_tiers(path, store, slots + 2, expert_cache=slots)
    want = llm.generate([3, 4, 5], STEPS).token_ids
    llm.reset_cache(llm.planned_slots)
    raw = (store / RECORDS).read_bytes()
    (store / RECORDS).write_bytes(bytes(_damage_every_record(raw, store)))
    with pytest.raises(StoreCorrupt, match=r"layer \d+ expert \d+ .* fails its checksum"):
        llm.generate([3, 4, 5], STEPS)
    assert _no_pins(llm)
    (store / RECORDS).write_bytes(raw)  # repaired: the same engine serves the next request
    assert llm.generate([3, 4, 5], STEPS).token_ids == want


def test_a_read_failing_while_a_decode_computes_the_resident_experts_leaves_no_pin(checkpoints, tmp_path: Path):
    """Decode on the disk tier computes cached experts while the missing ones are read; a missing one that fails its
    checksum raises, its slot is emptied, no slot stays pinned, and the next request (store repaired) decodes exactly."""
    path, store = checkpoints["olmoe"], tmp_path / "store"
    llm = _llm(path, store, expert_cache=small_cache("olmoe"))
    want = llm.generate([3, 4, 5], STEPS).token_ids
    cache = llm.cache
    layer = max(llm.loaded.model.info.moe_layers, key=lambda m: sum(at == m for at, _ in cache.where))  # the most cached layer
    resident = sorted(e for (at, e) in cache.where if at == layer)[:2]
    missing = [e for e in range(cache.store.num_experts) if (layer, e) not in cache.where][:2]
    assert len(resident) == len(missing) == 2
    raw = (store / RECORDS).read_bytes()
    (store / RECORDS).write_bytes(bytes(_damage_every_record(raw, store)))
    x = torch.randn(1, llm.loaded.model.info.hidden)
    weights = torch.full((1, 4), 0.25)
    with pytest.raises(StoreCorrupt, match=r"fails its checksum"):
        llm.runner.executor.run(layer, x, torch.tensor([resident + missing]), weights)
    assert all(slot.pins == 0 for slot in cache.slots)
    assert all((layer, e) not in cache.where for e in missing) and all((layer, e) in cache.where for e in resident)
    (store / RECORDS).write_bytes(raw)
    assert llm.generate([3, 4, 5], STEPS).token_ids == want


def test_a_store_of_an_older_version_for_this_checkpoint_is_rebuilt(checkpoints, tmp_path: Path):
    path, store = checkpoints["olmoe"], tmp_path / "store"
    want = _llm(path, store).generate([3, 4, 5], STEPS).token_ids
    manifest = json.loads((store / MANIFEST).read_text())
    old = {**manifest, "version": 1, "crc32": manifest.pop("checksums")}
    del old["checksums"]
    (store / MANIFEST).write_text(json.dumps(old))  # as written before records were hashed with xxh3
    assert _llm(path, store).generate([3, 4, 5], STEPS).token_ids == want
    assert json.loads((store / MANIFEST).read_text())["version"] == manifest["version"] == 2


def test_a_truncated_or_foreign_store_is_refused_in_one_line(checkpoints, tmp_path: Path):
    store = tmp_path / "store"
    _llm(checkpoints["olmoe"], store)
    with pytest.raises(InvalidParameter, match="another checkpoint or format"):
        _llm(checkpoints["qwen3_moe"], store)
    with open(store / RECORDS, "r+b") as f:
        f.truncate(4096)
    with pytest.raises(CheckpointError, match="truncated"):
        _llm(checkpoints["olmoe"], store)


def test_a_store_packed_in_another_kernel_layout_is_refused(checkpoints, tmp_path: Path):
    """A store whose records are in another layout (e.g. packed under a torch whose int4 kernel blocks rows differently)
    is refused, naming the layout, rather than read as this one."""
    store = tmp_path / "store"
    _llm(checkpoints["qwen3_moe"], store, "int8", "bfloat16")
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest["layout_id"] == "int8:_weight_int8pack_mm"  # records in the fused kernel's layout
    (store / MANIFEST).write_text(json.dumps({**manifest, "layout_id": "int8"}))  # as if written where no kernel ran
    with pytest.raises(InvalidParameter, match="differs in layout_id"):
        _llm(checkpoints["qwen3_moe"], store, "int8", "bfloat16")


def test_buffered_reads_when_direct_io_is_off(checkpoints, tmp_path: Path):
    records = Records()  # on the mobile_moe logger itself: it does not propagate once the CLI has set it up
    logging.getLogger("mobile_moe").addHandler(records)
    try:
        llm = _llm(checkpoints["olmoe"], tmp_path / "store", expert_cache=small_cache("olmoe"), direct_io=False)
    finally:
        logging.getLogger("mobile_moe").removeHandler(records)
    assert not llm.loaded.store.direct
    assert any("page cache" in r.getMessage() for r in records.records)
    assert llm.generate([3, 4, 5], STEPS).token_ids == _llm(checkpoints["olmoe"], None).generate([3, 4, 5], STEPS).token_ids


class _SlowSource:
    """A record source whose first read blocks until released; records the order reads start in."""

    def __init__(self) -> None:
        self.order: list[tuple[int, int]] = []
        self.release = threading.Event()

    def read(self, layer: int, expert: int, dst: torch.Tensor) -> int:
        self.order.append((layer, expert))
        if len(self.order) == 1:
            self.release.wait(10)
        return dst.numel()


def test_demand_reads_overtake_queued_prefetches():
    source = _SlowSource()
    pool = ReadPool(source, readers=1)
    dst = torch.empty(8, dtype=torch.uint8)
    first = pool.submit((0, 0), dst, Priority.DEMAND)  # occupies the only reader
    while not source.order:
        threading.Event().wait(0.01)
    futures = [
        pool.submit((0, 1), dst, Priority.LOOKAHEAD),
        pool.submit((0, 2), dst, Priority.FALLBACK),
        pool.submit((0, 3), dst, Priority.LOOKAHEAD),
        pool.submit((0, 4), dst, Priority.DEMAND),
    ]
    promoted = pool.submit((0, 3), dst, Priority.DEMAND)  # a queued lookahead the engine now needs
    assert promoted is futures[2]
    elsewhere = pool.submit((0, 3), torch.empty(8, dtype=torch.uint8), Priority.DEMAND)  # e.g. a newer cache's slot: its own read
    assert elsewhere is not promoted
    source.release.set()
    for f in [first, *futures, elsewhere]:
        f.result(10)
    pool.close()
    assert source.order == [(0, 0), (0, 4), (0, 3), (0, 3), (0, 2), (0, 1)]  # demands in arrival order, fallback, lookahead


@pytest.mark.parametrize("tiers", [2, 3])
def test_a_demand_for_an_expert_still_queued_as_a_prefetch_moves_its_read_ahead(checkpoints, tmp_path: Path, tiers: int):
    disk = _llm(checkpoints["olmoe"], tmp_path / "store").loaded.store
    source = _SlowSource()
    pool, cpu = ReadPool(source, readers=1), torch.device("cpu")
    cache = ExpertCache(disk, 8, cpu, TransferEngine(cpu), reader=pool)
    if tiers == 3:
        cache = ExpertCache(disk, 4, cpu, TransferEngine(cpu), host=cache)
    layer = disk.manifest.moe_layers[0]
    cache.prefetch(layer, [0])  # occupies the only reader
    while not source.order:
        threading.Event().wait(0.01)
    cache.prefetch(layer, [1, 2, 3], Priority.LOOKAHEAD)
    slots = cache.acquire(layer, [3], wait=False)  # the layer needs expert 3 now
    source.release.set()
    cache.ready(slots[0])
    cache.release(slots)
    pool.close()
    assert source.order == [(layer, 0), (layer, 3), (layer, 1), (layer, 2)]


class _CopiesInFlight(TransferEngine):
    """Copies to the "device" that stay in flight until their fences are set done, as a CUDA copy looks from the host."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.fences: list[FakeFence] = []

    def load(self, dst, src, prefetch, after=()):
        ticket = super().load(dst, src, prefetch, after)
        ticket.event = FakeFence(done=False)
        self.fences.append(ticket.event)
        return ticket

    def wait(self, ticket):  # compute is ordered after the copy on the device: the host does not wait
        ticket.event = None
        super().wait(ticket)

    def synchronize(self):
        for fence in self.fences:
            fence.done = True


def test_a_host_record_stays_pinned_until_its_copy_to_the_device_has_finished(checkpoints, tmp_path: Path):
    disk = _llm(checkpoints["olmoe"], tmp_path / "store").loaded.store
    pool, cpu, transfer = ReadPool(disk), torch.device("cpu"), _CopiesInFlight()
    host = ExpertCache(disk, 4, cpu, TransferEngine(cpu), reader=pool)
    cache = ExpertCache(disk, 8, cpu, transfer, host=host)
    layer = disk.manifest.moe_layers[0]
    pins = lambda experts: [host.slots[host.where[(layer, e)]].pins for e in experts]  # noqa: E731
    cache.release(cache.acquire(layer, [0, 1]))  # read into the host tier, copies issued, still in flight
    assert pins([0, 1]) == [1, 1]
    transfer.fences[0].done = True
    cache.release(cache.acquire(layer, [0]))  # a hit here; the finished copy gives its host record back
    assert pins([0, 1]) == [0, 1]
    cache.release(cache.acquire(layer, [2, 3, 4]))  # the host tier's 4 records: one still pinned by its copy
    cache.release(cache.acquire(layer, [5]))  # every host record pinned: the demand waits for the copies, then reads
    assert all(f.done for f in transfer.fences[:-1]) and not transfer.fences[-1].done  # all but expert 5's own copy
    assert pins([5]) == [1] and sum(slot.pins for slot in host.slots) == 1
    record = aligned_empty(disk.record_bytes)  # O_DIRECT reads need a page-aligned buffer
    disk.read(layer, 5, record)
    assert torch.equal(cache.pool[cache.where[(layer, 5)]], record[: disk.expert_bytes])
    pool.close()


def test_bench_on_the_disk_tier_reports_reads_and_mobiles_ceiling(tmp_path: Path, capsys, monkeypatch):

    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--synthetic",
        "olmoe-1b-7b",
        "--shrink",
        "16",
        "--prompts",
        "1",
        "--new-tokens",
        "4",
        "--rounds",
        "1",
        "--fallback-rate",
        "0.5",
        "--skip-transformers",
        "--quiet",
        "--host-memory",
        "0.004",
        "--lookahead",
        "--json",
        str(out),
    ]
    assert main(args + ["--offload-dir", str(tmp_path / "store")]) == 0
    report = json.loads(out.read_text())
    disk, systems = report["disk"], {s["name"]: s for s in report["systems"]}
    assert set(systems) == {"big", "mobile", "little"}  # resident needs a host budget holding every expert
    assert disk["direct_io"] and disk["disk_probe_gb_s"] > 0 and disk["peak_rss_bytes"] > 0
    assert disk["mobile_bytes_ceiling"] == pytest.approx(2 / (1 + systems["mobile"]["fallback_rate"]))
    assert all(s["disk_bytes_per_token"] > 0 and s["disk_read_gb_s"] > 0 and s["disk_probe_gb_s"] > 0 for s in systems.values())
    assert 0 <= systems["mobile"]["lookahead_precision"] <= 1 and systems["big"]["lookahead_precision"] is None  # lookahead: mobile only
    assert set(report["predicted"]) == {"this-disk", "nvme-pcie4", "sata-ssd"}
    assert "disk tier (" in capsys.readouterr().out
    monkeypatch.setattr(bench_command, "filesystem_type", lambda path: "tmpfs")  # a directory in memory: no disk tier to report
    assert main(args + ["--offload-dir", str(tmp_path / "in-memory")]) == 2
    assert "bench reports a disk tier only on a disk" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--offload-dir", "/proc/no-such-dir/store"], "cannot write the expert store in /proc/no-such-dir/store"),
        (["--host-memory", "1"], "give --offload-dir too"),
    ],
)
def test_disk_tier_flags_fail_in_one_line(tmp_path: Path, capsys, flags: list[str], message: str):
    flags = [str(tmp_path / "store") if f == "STORE" else f for f in flags]
    assert main(["generate", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_server_answers_a_damaged_record_with_500_and_keeps_serving(tmp_path: Path):
    store = tmp_path / "store"
    llm = LLM(DEMO_MODEL, engine_config(progress=False, offload_dir=str(store), host_memory=0.004))
    raw = (store / RECORDS).read_bytes()
    (store / RECORDS).write_bytes(bytes(_damage_every_record(raw, store)))
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    with serving(llm) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 500 and "fails its checksum" in r.json()["error"]["message"]
        (store / RECORDS).write_bytes(raw)
        ok = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def _damage_every_record(raw: bytes, store: Path) -> bytearray:
    """The records with the first byte of each flipped."""
    manifest = json.loads((store / MANIFEST).read_text())
    damaged = bytearray(raw)
    for i in range(len(manifest["checksums"])):
        damaged[i * manifest["record_bytes"]] ^= 0xFF
    return damaged


def test_a_store_built_for_the_disk_is_not_page_locked_on_cuda():
    """Records only pass through the staging store on their way to disk, one layer at a time: pinning it would lock every
    expert in RAM (locked pages cannot be released per layer). Copies to the device come from the disk tier's own buffers."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pins_host_store(cuda, building_on_disk=False)
    assert not pins_host_store(cuda, building_on_disk=True)
    assert not pins_host_store(cpu, building_on_disk=False) and not pins_host_store(cpu, building_on_disk=True)


def test_reset_cache_waits_for_reads_in_flight_and_frees_both_tiers_pools_at_once(checkpoints, tmp_path: Path):
    """The host tier's feed pointed back at the device cache: the cycle kept the old pools (pinned memory on CUDA) alive
    until the garbage collector ran. Reads still landing in the old pools are waited for first."""
    slots = small_cache("olmoe")
    llm = _three_tiers(checkpoints["olmoe"], tmp_path / "store", slots + 4, expert_cache=slots)
    llm.generate([5, 6, 7, 8], STEPS, MOBILE)
    layer = llm.info.moe_layers[-1]
    llm.cache.prefetch(layer, [e for e in range(llm.info.num_experts) if (layer, e) not in llm.cache.where][:2])
    reads = [s.ticket.future for c in (llm.cache, llm.cache.host) for s in c.slots if s.ticket is not None and s.ticket.future is not None]
    pools = [weakref.ref(llm.cache.pool), weakref.ref(llm.cache.host.pool)]
    gc.disable()
    try:
        llm.reset_cache(slots)
    finally:
        gc.enable()
    assert [pool() for pool in pools] == [None, None]  # freed by reference counting alone
    assert all(read.done() for read in reads)
    assert llm.generate([5, 6, 7, 8], STEPS, MOBILE).token_ids  # the new caches work
