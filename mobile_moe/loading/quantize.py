"""`mobile-moe quantize`: a checkpoint directory whose routed experts are stored packed (int8 / int4).

The source streams tensor by tensor, layer by layer, into a staging store that holds the layer being packed; each
layer's shard is written once the layer is complete (host RAM stays near the dense weights plus one layer). The output
holds the dense weights unchanged (or, with `dense`, the linears loading/dense.py quantizes as packed fields
`<linear>.qweight` / `.scales` / `.zeros` beside their float biases), each MoE layer's packed fields in their own shard, a config with a
`quantization_config` block naming the format, and every other file of the source (tokenizer, calibration).
It is written into a temporary directory beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from mobile_moe.errors import CheckpointError, InvalidParameter
from mobile_moe.experts.formats import DEFAULT_GROUP_SIZE, ExpertFormat, make_format
from mobile_moe.experts.store import ExpertShape, StagingStore
from mobile_moe.loading.checkpoint import canonical_key, classify, count_tensors, dense_name, iter_tensors, packed_key, read_config, shard_files, unused
from mobile_moe.loading.dense import QUANTIZED, DenseChoice, dense_formats, quantized_fields
from mobile_moe.loading.loader import place_expert, stored_format
from mobile_moe.models.registry import build_model

WEIGHT_FILES = ("model.safetensors.index.json", "config.json")


@dataclass(frozen=True)
class QuantizeReport:
    """What `quantize` wrote."""

    out: Path
    expert_format: dict
    experts: int
    source_expert_bytes: int
    packed_expert_bytes: int
    dense: DenseChoice = DenseChoice(None)
    packed_dense: int = 0  # dense linears written packed


def _check_writable(out: Path) -> None:
    """Raise InvalidParameter unless a directory can be created beside `out`."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent):
            pass
    except OSError as e:
        raise InvalidParameter(f"cannot write {out}: {e.strerror or e}") from None


def quantize_checkpoint(src: Path, out: Path, to: str, group_size: int | None = None, progress: bool = True, dense_dtype: str | None = None) -> QuantizeReport:
    """Write `src` with its routed experts packed as `to` (int8 | int4 | mxfp4), and its dense linears as `dense_dtype`
    (int8 | int4; None: unchanged), into the new directory `out`, one MoE layer at a time (RAM holds the dense weights and
    the layer being packed, never every expert)."""
    if to not in ("int8", "int4", "mxfp4"):
        raise InvalidParameter(f"--to must be int8, int4 or mxfp4, got {to!r}")
    if dense_dtype is not None and dense_dtype not in QUANTIZED:
        raise InvalidParameter(f"--dense-dtype must be int8 or int4, got {dense_dtype!r}")
    if out.exists():
        raise InvalidParameter(f"output directory {out} already exists; choose a new --out")
    _check_writable(out)  # before the long read, not after
    cfg = read_config(src)
    if stored_format(cfg) is not None:
        raise InvalidParameter(f"{src} is already quantized ({cfg.quantization_config}); quantize the original checkpoint")
    fmt = make_format(to, torch.float32, group_size if to == "int4" or dense_dtype != "int4" else None)
    dense_choice = DenseChoice(dense_dtype, group_size or DEFAULT_GROUP_SIZE) if dense_dtype else DenseChoice(None)
    files = shard_files(src)
    with torch.device("meta"):
        model = build_model(cfg)
    info, packed = model.info, dense_formats(model, dense_choice)
    shape = ExpertShape(info.hidden, info.expert_intermediate, info.expert_bias)
    store = StagingStore(list(info.moe_layers), info.num_experts, shape, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        shards = LayerShards(tmp, store, progress)
        dense, source_bytes = _read(files, cfg, store, shards, progress, info.interleaved_experts, packed)
        lacking = store.missing()
        if lacking:
            raise CheckpointError(f"checkpoint lacks {len(lacking)} expert weights, e.g. {lacking[0]}")
        _write_rest(tmp, src, dense, shards, fmt, dense_choice)
        _usual_permissions(tmp)
        tmp.rename(out)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InvalidParameter(f"cannot write {out}: {_one_line(e)}; nothing was kept") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizeReport(out, fmt.config(), store.total_experts, source_bytes, store.nbytes, dense_choice, len(packed))


def _one_line(e: BaseException) -> str:
    """An OS or safetensors error in one line."""
    return getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__


class LayerShards:
    """The output's shards: the dense weights in the first, each MoE layer's packed fields in one of its own, written (and
    its staging buffer freed) as soon as the layer is complete."""

    def __init__(self, directory: Path, store: StagingStore, progress: bool) -> None:
        self.directory, self.store = directory, store
        self.count = 1 + len(store.layers)
        self.weight_map: dict[str, str] = {}
        self.bar = tqdm(
            total=store.nbytes, desc=f"writing packed experts to {directory.parent}", unit="B", unit_scale=True, disable=(not progress) or None, leave=False
        )

    def name(self, i: int) -> str:
        """File name of shard i (0: the dense weights)."""
        return f"model-{i + 1:05d}-of-{self.count:05d}.safetensors"

    def flush(self, layer: int) -> None:
        """Write a complete layer's shard and free its buffer."""
        if layer in self.store.released or not self.store.layer_complete(layer):
            return
        tensors = {}
        for matrix, placed in self.store.layout.fields.items():
            for (field, _), view in zip(placed, self.store.layer_fields(layer)[matrix]):
                tensors[packed_key(layer, matrix, field.name)] = view.contiguous()  # one field of one layer at a time
        name = self.name(1 + self.store.layers[layer])
        save_file(tensors, str(self.directory / name), metadata={"format": "pt"})
        del tensors
        self.weight_map.update(dict.fromkeys((packed_key(layer, m, f.name) for m, placed in self.store.layout.fields.items() for f, _ in placed), name))
        self.store.release_layer(layer)
        self.bar.update(self.store.layer_bytes)
        self.bar.set_postfix_str(f"layer {len(self.store.released)}/{len(self.store.layers)}", refresh=False)

    def write_dense(self, dense: dict[str, torch.Tensor]) -> None:
        """The first shard: the dense tensors as stored."""
        save_file({k: t.contiguous() for k, t in dense.items()}, str(self.directory / self.name(0)), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(dense, self.name(0)))
        self.bar.close()


def _read(  # noqa: PLR0913 - the source, where it goes, how
    files: list[Path],
    cfg,
    store: StagingStore,
    shards: LayerShards,
    progress: bool,
    interleaved: bool = False,
    packed: dict[str, ExpertFormat] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Pack experts into `store` as they stream by (each layer written by `shards` once complete); returns the dense tensors
    (keys and dtypes as stored; the weights of `packed` linears, by module name, as their packed fields) and the source
    expert bytes."""
    dense: dict[str, torch.Tensor] = {}
    source_bytes = 0
    bar = tqdm(total=count_tensors(files), desc="quantizing experts", unit="tensor", disable=(not progress) or None, leave=False)
    for key, tensor in iter_tensors(files):
        bar.update()
        if unused(canonical_key(key), cfg.get_text_config().num_hidden_layers):
            continue  # e.g. DeepSeek-V3's multi-token-prediction layers
        kind = classify(canonical_key(key))  # dense tensors keep their stored keys
        if kind is None:
            dense.update(_dense_entry(key, tensor, packed or {}))
            continue
        place_expert(key, kind, tensor, store, interleaved)
        source_bytes += tensor.numel() * tensor.element_size()
        shards.flush(kind.layer)
    bar.close()
    return dense, source_bytes


def _dense_entry(key: str, tensor: torch.Tensor, packed: dict[str, ExpertFormat]) -> dict[str, torch.Tensor]:
    """One dense tensor under its stored key, or, the weight of a linear in `packed`, its packed fields under the stored prefix."""
    prefix, _, leaf = key.rpartition(".")
    fmt = packed.get(dense_name(canonical_key(prefix)))
    if fmt is None or leaf != "weight":
        return {key: tensor}
    return quantized_fields(prefix, fmt, tensor, torch.device("cpu"))


def _usual_permissions(directory: Path) -> None:
    """The temporary directory and its files get the permissions a plain mkdir / open would have given them."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def _write_rest(tmp: Path, src: Path, dense: dict[str, torch.Tensor], shards: LayerShards, fmt: ExpertFormat, dense_choice: DenseChoice) -> None:
    """The dense shard, the shards' index, the config with quantization_config, and the source's other files."""
    shards.write_dense(dense)
    total = sum((tmp / shards.name(i)).stat().st_size for i in range(shards.count))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(shards.weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {**fmt.config(), **dense_choice.config()}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in src.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name not in WEIGHT_FILES:
            shutil.copy2(file, tmp / file.name)
