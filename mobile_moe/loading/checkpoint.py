"""Reading a Hugging Face checkpoint directory: config, safetensors shards, and which tensor is what."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from mobile_moe.errors import CheckpointError
from mobile_moe.models.registry import check_supported

_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
_PACKED = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)\.(\w+)$")
_HUB_FIELD = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales|bias)$")  # gpt-oss
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_MTP = re.compile(r"model\.mtp")  # ERNIE-4.5's multi-token-prediction modules (model.mtp_block.*, model.mtp_emb_norm.*, ...)
_NOT_TEXT = re.compile(r"mtp\.|model\.visual\.")  # Qwen3.5: multi-token prediction, vision tower
TEXT_PREFIXES = (("model.language_model.", "model."),)  # vision-language checkpoints (Qwen3.5) nest the text stack
PART_NAMES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
DENSE_RENAMES = (
    (".block_sparse_moe.", ".mlp."),  # Mixtral
    (".linear_attn.", ".self_attn."),  # Qwen3.5's Gated DeltaNet layers sit in the token-mixer slot
    (".shared_experts.", ".shared_expert."),  # DeepSeek, GLM-4.5, ERNIE-4.5
    (".mlp.moe_statics.", ".mlp.gate."),  # ERNIE-4.5 keeps the router's correction bias in a sibling module
    (".mlp.router.", ".mlp.gate."),  # gpt-oss
)


@dataclass(frozen=True)
class ExpertTensor:
    """One projection of one expert in a per-expert checkpoint."""

    layer: int
    expert: int
    part: str  # gate | up | down


@dataclass(frozen=True)
class FusedExpertTensor:
    """All experts of a layer in one 3-D tensor."""

    layer: int
    part: str  # gate_up | down


@dataclass(frozen=True)
class PackedExpertTensor:
    """One packed field (e.g. qweight, scales) of all experts of a layer, as `mobile-moe quantize` writes it."""

    layer: int
    part: str  # gate_up | down
    field: str


@dataclass(frozen=True)
class HubExpertField:
    """A gpt-oss expert tensor of all experts of a layer: MXFP4 `blocks` / `scales`, or a `bias`, rows in hub order."""

    layer: int
    part: str  # gate_up | down
    field: str  # blocks | scales | bias


def classify(key: str) -> ExpertTensor | FusedExpertTensor | PackedExpertTensor | HubExpertField | None:
    """What a checkpoint key holds: an expert piece, a fused or packed expert tensor, or None for a dense weight."""
    if m := _EXPERT.match(key):
        return ExpertTensor(int(m[1]), int(m[2]), PART_NAMES[m[3]])
    if m := _FUSED.match(key):
        return FusedExpertTensor(int(m[1]), "gate_up" if m[2] == "gate_up_proj" else "down")
    if m := _PACKED.match(key):
        return PackedExpertTensor(int(m[1]), "gate_up" if m[2] == "gate_up_proj" else "down", m[3])
    if m := _HUB_FIELD.match(key):
        return HubExpertField(int(m[1]), "gate_up" if m[2] == "gate_up_proj" else "down", m[3])
    return None


def packed_key(layer: int, matrix: str, field: str) -> str:
    """The checkpoint key of one packed field of a layer's experts."""
    return f"model.layers.{layer}.mlp.experts.{matrix}_proj.{field}"


def layer_of(key: str) -> int | None:
    """Decoder layer index a key belongs to, if any."""
    m = _LAYER.match(key)
    return int(m[1]) if m else None


def unused(key: str, num_layers: int) -> bool:
    """True for weights decoding never uses: multi-token-prediction layers (DeepSeek-V3, GLM-4.5) and modules (ERNIE-4.5)."""
    layer = layer_of(key)
    return (layer is not None and layer >= num_layers) or _MTP.match(key) is not None or _NOT_TEXT.match(key) is not None


def canonical_key(key: str) -> str:
    """The key with a vision-language checkpoint's text-stack prefix reduced to the text-only one (`model.language_model.` -> `model.`)."""
    for old, new in TEXT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def dense_name(key: str) -> str:
    """Our module's parameter name for a dense checkpoint key."""
    for old, new in DENSE_RENAMES:
        key = key.replace(old, new)
    return key


def dense_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in our module's shape: correction biases are [E] (ERNIE-4.5 stores [1, E])."""
    return tensor.reshape(-1) if name.endswith("e_score_correction_bias") else tensor


def read_config(path: Path) -> PretrainedConfig:
    """The checkpoint's config, after checking the directory and the architecture."""
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"no config.json in {path}")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config.json in {path} is not valid JSON: {e}") from None
    check_required_keys(raw, path)
    check_supported(raw.get("model_type"), raw.get("architectures"))
    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises several types for bad configs
        raise CheckpointError(f"cannot parse config.json in {path}: {one_line(e)}") from None
    check_experts(cfg, path)
    return cfg


REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")  # transformers would fill in its own defaults
TOP_K_KEYS = ("num_experts_per_tok", "moe_k")
EXPERT_KEYS = ("n_routed_experts", "moe_num_experts", "num_local_experts", "num_experts")


def check_required_keys(raw: dict, path: Path) -> None:
    """A CheckpointError naming the first key config.json lacks that the engine cannot guess: `model_type`, and the text stack's
    sizes (nested under `text_config` in vision-language checkpoints)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json in {path} must be a JSON object")
    if not raw.get("model_type"):
        raise CheckpointError(f"config.json in {path} lacks 'model_type' (the architecture, e.g. qwen3_moe)")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    missing = [key for key in REQUIRED_KEYS if key not in text]
    if missing:
        raise CheckpointError(f"config.json in {path} lacks {', '.join(repr(k) for k in missing)}")


def check_experts(cfg: PretrainedConfig, path: Path) -> None:
    """A CheckpointError unless the config routes each token to between 1 and the number of routed experts."""
    text = cfg.get_text_config()
    top_k = next(((key, getattr(text, key)) for key in TOP_K_KEYS if isinstance(getattr(text, key, None), int)), None)
    experts = next(((key, getattr(text, key)) for key in EXPERT_KEYS if isinstance(getattr(text, key, None), int)), None)
    if top_k is None or experts is None:
        return  # the architecture's builder names what it lacks
    if not 1 <= top_k[1] <= experts[1]:
        raise CheckpointError(
            f"config.json in {path} routes each token to {top_k[1]} experts of {experts[1]}: {top_k[0]} must be 1 to {experts[1]} (its {experts[0]})"
        )


def shard_files(path: Path) -> list[Path]:
    """The safetensors files holding the weights, checked to exist."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {one_line(e)}") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"missing shard {missing[0]} listed in {index.name} ({len(missing)} missing)")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for every tensor of every shard, decoder layer by decoder layer (other tensors first): a layer split
    across shards, or a shard whose keys sort layer 10 before layer 2, still arrives in one piece, so a build that writes
    each layer once complete holds one layer at a time. Unreadable or truncated files raise CheckpointError."""
    with ExitStack() as stack:
        handles = [_open_shard(stack, file) for file in files]
        order = sorted((_layer_rank(canonical_key(key)), i, key) for i, f in enumerate(handles) for key in _keys(f, files[i]))
        for _, i, key in order:
            try:
                tensor = handles[i].get_tensor(key)
            except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
                raise CheckpointError(f"cannot read {files[i].name}: {one_line(e)} (truncated or corrupt shard?)") from None
            yield key, tensor


def _open_shard(stack: ExitStack, file: Path):  # -> safetensors' safe_open handle
    """A shard opened for the life of `stack`."""
    try:
        return stack.enter_context(safe_open(str(file), framework="pt"))
    except Exception as e:
        raise CheckpointError(f"cannot read {file.name}: {one_line(e)} (truncated or corrupt shard?)") from None


def _keys(handle, file: Path) -> list[str]:
    """A shard's tensor names."""
    try:
        return list(handle.keys())
    except Exception as e:
        raise CheckpointError(f"cannot read {file.name}: {one_line(e)} (truncated or corrupt shard?)") from None


def _layer_rank(key: str) -> int:
    """Where a key's tensor comes in the reading order: tensors outside decoder layers (-1) first, then layer by layer."""
    layer = layer_of(key)
    return -1 if layer is None else layer


def count_tensors(files: list[Path]) -> int:
    """Number of tensors in all shards (reads headers only)."""
    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                total += len(list(f.keys()))
        except Exception as e:
            raise CheckpointError(f"cannot read {file.name}: {one_line(e)} (truncated or corrupt shard?)") from None
    return total


def one_line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split()) or type(e).__name__
