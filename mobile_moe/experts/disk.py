"""On-disk expert store: every expert's packed buffer as one 4 KiB-aligned record, read with O_DIRECT.

Layout of a store directory: `experts.bin` (record i = MoE layer row i // E, expert i % E, each `record_bytes` long,
the packed buffer first, zero padding after) and `manifest.json` (format, layout id, shapes, record size, an xxh3
hash per record, the source checkpoint's fingerprint). The manifest is written last, after the records are flushed,
by rename: a directory without one is an unfinished build and is never read.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import xxhash
from tqdm import tqdm

from mobile_moe.errors import CheckpointError, InvalidParameter
from mobile_moe.experts.formats import ExpertFormat
from mobile_moe.experts.store import ExpertLayout, ExpertShape, ExpertSizes

RECORD_ALIGN = 4096  # bytes: O_DIRECT needs offsets, sizes and buffers aligned to the device's logical block
RECORDS, MANIFEST = "experts.bin", "manifest.json"
STORE_VERSION = 2  # 2: records hashed with xxh3_64 (1: crc32, 16x slower to check: a tenth of a core at disk speed)

log = logging.getLogger("mobile_moe")


class StoreCorrupt(CheckpointError):
    """A record of an on-disk expert store failed its checksum, or could not be read."""


@dataclass(frozen=True)
class Manifest:
    """What a store holds and where; two stores are interchangeable iff everything but the checksums is equal."""

    fingerprint: str  # of the source checkpoint (`checkpoint_fingerprint`)
    layout_id: str  # the packed layout of each record (a kernel layout when the store was built for one)
    format: dict  # the expert format's config (name, group size)
    dtype: str  # the compute dtype the layout was packed for
    hidden: int
    intermediate: int
    bias: bool
    moe_layers: list[int]
    num_experts: int
    expert_bytes: int
    record_bytes: int
    version: int = STORE_VERSION
    checksums: tuple[int, ...] = ()  # xxh3_64 of each record

    def key(self) -> dict:
        """Everything that must match for a store to be reused."""
        d = asdict(self)
        d.pop("checksums")
        return d


def record_hash(data: bytes | memoryview) -> int:
    """A record's checksum: xxh3_64 (~80 GB/s on one core here, against ~5 GB/s for crc32)."""
    return xxhash.xxh3_64_intdigest(data)


def checkpoint_fingerprint(path: Path) -> str:
    """A fingerprint of a checkpoint directory: its config and every weight file's name, size and modification time."""
    h = zlib.crc32((path / "config.json").read_bytes()) if (path / "config.json").exists() else 0
    parts = [f"config:{h:08x}"]
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def record_bytes(expert_bytes: int) -> int:
    """An expert's record size: its packed bytes rounded up to RECORD_ALIGN."""
    return -(-expert_bytes // RECORD_ALIGN) * RECORD_ALIGN


def expected_manifest(fingerprint: str, layout: ExpertLayout, dtype: torch.dtype, moe_layers: list[int], num_experts: int) -> Manifest:
    """The manifest a store for this checkpoint, layout and compute dtype must have (checksums left empty)."""
    shape, fmt = layout.shape, layout.format
    return Manifest(
        fingerprint,
        fmt.layout_id,
        fmt.config(),
        str(dtype).removeprefix("torch."),
        shape.hidden,
        shape.intermediate,
        shape.bias,
        list(moe_layers),
        num_experts,
        layout.nbytes,
        record_bytes(layout.nbytes),
    )


class StoreWriter:
    """Writes a store's records one layer at a time, as layers become complete (so RAM need hold only a few layers);
    `finish` flushes them and then writes the manifest, by rename. Used as a context manager, a build that stops for any
    reason (a failed write, a full disk, an interrupt) removes its records: nothing is left that could pass for a store."""

    def __init__(self, directory: Path, manifest: Manifest, progress: bool = True) -> None:
        self.directory, self.manifest, self.progress = directory, manifest, progress
        total = len(manifest.moe_layers) * manifest.num_experts
        self.sums: list[int | None] = [None] * total
        self.rows = {layer: row for row, layer in enumerate(manifest.moe_layers)}
        self.nbytes, self.written_bytes, self.started = total * manifest.record_bytes, 0, time.perf_counter()
        self.fd: int | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / MANIFEST).unlink(missing_ok=True)  # from here until the rename the directory is an unfinished build
            (directory / RECORDS).unlink(missing_ok=True)  # its space counts as free below
            self._check_space()
            self.fd = os.open(directory / RECORDS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise InvalidParameter(f"cannot write the expert store in {directory}: {e.strerror or e}") from None
        self.bar = tqdm(
            total=self.nbytes, desc=f"writing experts to {directory}", unit="B", unit_scale=True, unit_divisor=1024, disable=(not progress) or None, leave=False
        )

    def _check_space(self) -> None:
        """Refuse before writing a store the file system has no room for."""
        free = shutil.disk_usage(self.directory).free
        if free < self.nbytes:
            raise InvalidParameter(
                f"the expert store in {self.directory} needs {self.nbytes / 1e9:.1f} GB but its disk has {free / 1e9:.1f} GB free: "
                "give an --offload-dir on a larger disk, or a smaller --expert-dtype"
            )

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        if error is not None:
            self.abort()

    def written(self, layer: int) -> bool:
        """Whether a layer's records are on disk."""
        row = self.rows[layer]
        return self.sums[row * self.manifest.num_experts] is not None

    def write_layer(self, layer: int, block: torch.Tensor, convert: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """block: uint8 [E, expert_bytes] of one layer (each expert passed through `convert` first, when given), written and
        flushed to the disk; a failure removes the records and is raised as one line naming the store."""
        try:
            self._write_records(layer, block, convert)
        except KeyboardInterrupt:
            self.abort()
            raise
        except OSError as e:
            self.abort()
            raise InvalidParameter(f"cannot write the expert store in {self.directory} (layer {layer}): {e.strerror or e}; its records were removed") from None
        except Exception as e:
            self.abort()
            why = " ".join(str(e).split()) or type(e).__name__
            raise CheckpointError(f"building the expert store in {self.directory} failed at layer {layer}: {why}; its records were removed") from e

    def _write_records(self, layer: int, block: torch.Tensor, convert: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Pad, hash and write each expert's record of a layer, then flush the layer and drop it from the page cache."""
        m, padded = self.manifest, torch.zeros(self.manifest.record_bytes, dtype=torch.uint8)
        assert self.fd is not None, "the store's writer was aborted"
        first, data = self.rows[layer] * m.num_experts, memoryview(padded.numpy())
        for expert in range(m.num_experts):
            padded[: m.expert_bytes].copy_(block[expert] if convert is None else convert(block[expert]))
            offset = (first + expert) * m.record_bytes
            if os.pwrite(self.fd, data, offset) != m.record_bytes:
                raise OSError(errno.EIO, "short write")
            self.sums[first + expert] = record_hash(data)
            self.bar.update(m.record_bytes)
        os.fdatasync(self.fd)  # a full disk or a failing device shows here, at this layer, not at the end
        os.posix_fadvise(self.fd, first * m.record_bytes, m.num_experts * m.record_bytes, os.POSIX_FADV_DONTNEED)  # written: no need to cache it
        self.written_bytes += m.num_experts * m.record_bytes
        self.bar.set_postfix_str(f"layer {len(self.written_layers())}/{len(self.rows)}", refresh=False)

    def written_layers(self) -> list[int]:
        """MoE layers whose records are on disk."""
        return [layer for layer in self.rows if self.written(layer)]

    def finish(self) -> Manifest:
        """Flush the records, then write the manifest (the store is complete only once this returns)."""
        missing = [i for i, c in enumerate(self.sums) if c is None]
        if missing:
            self.abort()
            raise CheckpointError(f"expert store in {self.directory}: {len(missing)} records were never written; its records were removed")
        done = Manifest(**{**asdict(self.manifest), "checksums": tuple(c for c in self.sums if c is not None)})
        tmp = self.directory / (MANIFEST + ".tmp")
        try:
            assert self.fd is not None, "the store's writer was aborted"
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            tmp.write_text(json.dumps(asdict(done)))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / MANIFEST)  # the last step: from here the store is complete
        except OSError as e:
            self.abort()
            raise InvalidParameter(f"cannot write the expert store in {self.directory}: {e.strerror or e}; its records were removed") from None
        self.bar.close()
        if self.progress:
            seconds = time.perf_counter() - self.started
            rate = self.nbytes / 1e9 / seconds
            print(f"wrote {self.nbytes / 1e9:.2f} GB of experts to {self.directory} in {seconds:.0f} s ({rate:.2f} GB/s)", file=sys.stderr)
        return done

    def abort(self) -> None:
        """Stop writing and remove the records (and a manifest not yet renamed into place): the directory holds no store."""
        self.bar.close()
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        for name in (RECORDS, MANIFEST + ".tmp", MANIFEST):
            try:
                (self.directory / name).unlink(missing_ok=True)
            except OSError:
                pass


def read_manifest(directory: Path) -> Manifest | None:
    """The store's manifest, or None when there is none (no store, or a build that did not finish)."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        raw["checksums"] = tuple(raw.pop("checksums", raw.pop("crc32", ())))  # "crc32": a version 1 store (rebuilt)
        return Manifest(**raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid expert store manifest ({e}); delete the directory to rebuild it") from None


class DiskStore(ExpertSizes):
    """Read side of a store: the same description as an `ExpertStore` (format, shape, layers), records read on demand."""

    def __init__(self, directory: Path, manifest: Manifest, fmt: ExpertFormat, direct: bool = True) -> None:
        self.directory, self.manifest = directory, manifest
        self.format, self.shape = fmt, ExpertShape(manifest.hidden, manifest.intermediate, manifest.bias)
        self.layout = ExpertLayout(self.shape, fmt, nbytes=manifest.expert_bytes)
        self.num_experts = manifest.num_experts
        self.layers = {layer: row for row, layer in enumerate(manifest.moe_layers)}  # MoE layer -> its row of records
        self.record_bytes = manifest.record_bytes
        self.path = directory / RECORDS
        if not (directory / MANIFEST).is_file():
            raise CheckpointError(f"{directory} holds no finished expert store (no {MANIFEST}: a build that stopped); delete it or build it again")
        expected = self.record_bytes * self.total_experts
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != expected:
            raise CheckpointError(
                f"{self.path} holds {max(size, 0)} bytes, its manifest says {expected}: the store is truncated; delete {directory} to rebuild it"
            )
        self.direct = False
        self.fd = self._open(direct)

    def _open(self, direct: bool) -> int:
        """Open the records with O_DIRECT where the file system allows it, else buffered (each read then drops its pages)."""
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
                return fd
            except OSError:
                pass
        log.warning(
            "%s: O_DIRECT %s; reading through the page cache and dropping each record's pages after the read",
            self.path,
            "not asked for" if not direct else "refused by this file system",
        )
        return os.open(self.path, os.O_RDONLY)

    pinned_bytes = 0  # nothing of the store is held in host memory

    def index(self, layer: int, expert: int) -> int:
        """Record number of an expert."""
        return self.layers[layer] * self.num_experts + expert

    def read(self, layer: int, expert: int, dst: torch.Tensor) -> int:
        """Read one expert's record into `dst` (uint8 [record_bytes], page-aligned) and check it; returns the bytes read."""
        index = self.index(layer, expert)
        offset = index * self.record_bytes
        view = memoryview(dst.numpy())
        try:
            got = os.preadv(self.fd, [view], offset)
            if not self.direct:
                os.posix_fadvise(self.fd, offset, self.record_bytes, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise StoreCorrupt(f"reading layer {layer} expert {expert} from {self.path}: {e.strerror or e}") from None
        if got != self.record_bytes:
            raise StoreCorrupt(f"layer {layer} expert {expert}: short read of {self.path} ({got} of {self.record_bytes} bytes)")
        if record_hash(view) != self.manifest.checksums[index]:
            raise StoreCorrupt(f"layer {layer} expert {expert} in {self.path} fails its checksum: the store is damaged; delete {self.directory} to rebuild it")
        return got

    def close(self) -> None:
        """Release the file descriptor."""
        os.close(self.fd)


def aligned_empty(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] starting on a page boundary (what O_DIRECT reads need), in anonymous memory."""
    area = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(area, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path` (from /proc/self/mounts; "unknown" where that cannot be read)."""
    target, best, kind = str(Path(path).resolve()), "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and (target == fields[1] or target.startswith(fields[1].rstrip("/") + "/")) and len(fields[1]) > len(best):
                    best, kind = fields[1], fields[2]
    except OSError:
        pass
    return kind
