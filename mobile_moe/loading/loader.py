"""Checkpoint directory -> our model on the compute device (dense weights) + host ExpertStore (routed experts)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PretrainedConfig

from mobile_moe.errors import CheckpointError, InvalidParameter
from mobile_moe.experts.disk import DiskStore, Manifest, StoreWriter, checkpoint_fingerprint, expected_manifest, read_manifest
from mobile_moe.experts.formats import DEFAULT_GROUP_SIZE, ExpertFormat, format_from_config, make_format
from mobile_moe.experts.host_memory import available_memory_bytes
from mobile_moe.experts.kernels import compute_format, layout_format, use_fused_kernels
from mobile_moe.experts.store import MATRICES, ExpertLayout, ExpertPacker, ExpertShape, ExpertStore, StagingStore, pins_host_store
from mobile_moe.layers.moe import Router
from mobile_moe.layers.qlinear import QuantLinear
from mobile_moe.loading.checkpoint import (
    ExpertTensor,
    FusedExpertTensor,
    HubExpertField,
    PackedExpertTensor,
    canonical_key,
    classify,
    count_tensors,
    dense_name,
    dense_tensor,
    iter_tensors,
    read_config,
    shard_files,
    unused,
)
from mobile_moe.loading.dense import DenseChoice, dense_formats, pack_dense, quantized_fields, replace_linears, resolve_dense, unregistered_bytes
from mobile_moe.models.registry import build_model
from mobile_moe.models.transformer import CausalLM, ModelInfo

log = logging.getLogger("mobile_moe")

FP32_BUFFERS = ("e_score_correction_bias",)


@dataclass
class LoadedModel:
    """A model ready to run: dense part on the device, experts in host memory."""

    model: CausalLM
    store: ExpertStore | DiskStore  # a DiskStore when the experts live in an on-disk store (`--offload-dir`)
    config: PretrainedConfig
    path: Path
    dtype: torch.dtype
    dtype_reason: str = ""  # why this compute dtype (`--dtype auto` says which it chose)
    dense_path: str = ""  # how dense linears are computed (`pack_dense`): e.g. '49 int4:_weight_int4pack_mm_for_cpu, 3 bf16'
    dense: DenseChoice = DenseChoice(None)  # the dense weights' format (`--dense-dtype`)


def fp32_names(model: CausalLM) -> frozenset[str]:
    """Dense tensors kept in float32 whatever the compute dtype: correction biases, and the weights of routers computed
    in float32 (transformers' `_keep_in_fp32_modules_strict` for DeepSeek, GLM-4.5 and ERNIE-4.5 checkpoints)."""
    names = {name for name, _ in model.named_buffers() if name.endswith(FP32_BUFFERS)}
    names |= {f"{prefix}.weight" for prefix, m in model.named_modules() if isinstance(m, Router) and m.spec.logits_fp32}
    return frozenset(names)


def dense_bytes(model: CausalLM, dtype: torch.dtype | None = None) -> int:
    """Bytes of every weight on the device (routed experts are not parameters); `dtype`: as if stored in it (planning on meta).
    Quantized linears count their packed fields as they are."""
    total, fp32 = unregistered_bytes(model), fp32_names(model)
    packed = {f"{prefix}.{n}".lstrip(".") for prefix, m in model.named_modules() if isinstance(m, QuantLinear) for n in m.names}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("rotary.inv_freq"):
            size = 4
        elif dtype is None or name in fp32 or name in packed:
            size = t.element_size()
        else:
            size = dtype.itemsize
        total += t.numel() * size
    return total


HOST_MEMORY_SHARE = 0.9  # of the RAM available, what a load may plan to fill (the rest: activations, the KV cache, Python)


@dataclass(frozen=True)
class LoadPlan:
    """What a checkpoint's config and the flags decide before any weight is read."""

    cfg: PretrainedConfig
    model: CausalLM  # on the meta device
    dtype: torch.dtype
    dtype_reason: str
    fmt: ExpertFormat
    shape: ExpertShape
    dense: DenseChoice = DenseChoice(None)
    packed: dict[str, ExpertFormat] = field(default_factory=dict)  # dense linears stored packed, by module name, in their format


def plan_load(cfg: PretrainedConfig, device: torch.device, dtype_name: str, expert_dtype: str, group_size: int | None, dense_dtype: str = "auto") -> LoadPlan:
    """The model built on meta (its quantized dense linears already QuantLinears), its compute dtype (and why), its
    experts' format and shape and its dense format."""
    with torch.device("meta"):
        model = build_model(cfg)
    dtype, why = resolve_dtype(dtype_name, cfg, device, model)
    info = model.info
    fmt = resolve_format(cfg, expert_dtype, group_size if expert_dtype == "int4" or dense_dtype != "int4" else None, dtype)
    dense = resolve_dense(cfg, dense_dtype, group_size, device, dtype, model_params(model))
    packed = dense_formats(model, dense)
    replace_linears(model, packed, quantize=False)
    return LoadPlan(cfg, model, dtype, why, fmt, ExpertShape(info.hidden, info.expert_intermediate, info.expert_bias), dense, packed)


def check_host_memory(plan: LoadPlan, device: torch.device) -> None:
    """Refuse in one line, before allocating, a load whose experts (and on the CPU the dense weights) would not fit in RAM."""
    available = available_memory_bytes()
    experts = len(plan.model.info.moe_layers) * plan.model.info.num_experts
    need_experts = ExpertLayout(plan.shape, plan.fmt).nbytes * experts
    need_dense = dense_bytes(plan.model, plan.dtype) if device.type == "cpu" else 0
    if available is None or need_experts + need_dense <= HOST_MEMORY_SHARE * available:
        return
    hint = "--offload-dir DIR (experts in an on-disk store, read on demand; --host-memory GB caps the RAM they take)"
    if stored_format(plan.cfg) is None and plan.fmt.name != "int4":
        try:
            int4 = ExpertLayout(plan.shape, make_format("int4", plan.dtype, None)).nbytes * experts
            hint = f"--expert-dtype int4 ({_size(int4)} of experts), or {hint}"
        except (InvalidParameter, ValueError):  # widths int4 cannot group
            pass
    dense = f" + {_size(need_dense)} of dense weights" if need_dense else ""
    raise InvalidParameter(
        f"the model needs about {_size(need_experts + need_dense)} of RAM ({_size(need_experts)} of {plan.fmt.name} experts{dense}) "
        f"but {_size(available)} are available: use {hint}"
    )


def check_fits_in_ram(directory: Path, device: torch.device, dtype_name: str = "auto", expert_dtype: str = "auto", group_size: int | None = None) -> None:
    """`check_host_memory` from a checkpoint's config.json alone (a hub download checks it before fetching the weights)."""
    check_host_memory(plan_load(read_config(directory), device, dtype_name, expert_dtype, group_size), device)


def _size(nbytes: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


AUTO_BF16_MIN_PARAMS = 200_000_000  # smaller models run faster in float32 on CPU (dispatch-bound: demo model 180 vs 127 tok/s)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles) rather than emulating it."""
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def auto_cpu_dtype(params: int, native_bf16: bool) -> tuple[torch.dtype, str]:
    """`--dtype auto` on CPU and why: bf16 for a model big enough to be bound by memory, on a CPU with native bf16."""
    if not native_bf16:
        hint = "; a model this large may decode faster with --dtype bfloat16 (slower prompts)" if params >= AUTO_BF16_MIN_PARAMS else ""
        return torch.float32, f"float32: this CPU has no native bf16 (AVX512-BF16 or AMX){hint}"
    if params < AUTO_BF16_MIN_PARAMS:
        return torch.float32, f"float32: {params / 1e6:.0f}M parameters run faster in float32 than in bf16 on CPU"
    return torch.bfloat16, "bfloat16: this CPU has native bf16"


def model_params(model: CausalLM) -> int:
    """Parameters of a (meta-built) model, routed experts included."""
    info = model.info
    experts = len(info.moe_layers) * info.num_experts * ExpertShape(info.hidden, info.expert_intermediate).numel
    return sum(p.numel() for p in model.parameters()) + experts


def resolve_dtype(name: str, cfg: PretrainedConfig, device: torch.device, model: CausalLM) -> tuple[torch.dtype, str]:
    """(compute dtype, why). `auto`: on CPU see `auto_cpu_dtype`; on CUDA the checkpoint's own precision."""
    if name != "auto":
        return getattr(torch, name), f"{name}: as asked"
    if device.type == "cpu":
        return auto_cpu_dtype(model_params(model), cpu_has_native_bf16())
    stored = getattr(cfg, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    dtype = stored if isinstance(stored, torch.dtype) else torch.bfloat16
    return dtype, f"{str(dtype).removeprefix('torch.')}: the checkpoint's precision"


def stored_format(cfg: PretrainedConfig) -> ExpertFormat | None:
    """The packed expert format a quantized checkpoint declares in `quantization_config`, else None."""
    qc = getattr(cfg, "quantization_config", None)
    if qc is None:
        return None
    return format_from_config(qc if isinstance(qc, dict) else qc.to_dict())


def resolve_format(cfg: PretrainedConfig, expert_dtype: str, group_size: int | None, dtype: torch.dtype) -> ExpertFormat:
    """The experts' format: what a quantized checkpoint stores, else `--expert-dtype` (auto: the compute dtype)."""
    wanted = make_format(expert_dtype, dtype, group_size)  # validates the flags even for quantized checkpoints
    stored = stored_format(cfg)
    if stored is None:
        return wanted
    if expert_dtype not in ("auto", stored.name) or (group_size is not None and group_size != getattr(stored, "group_size", None)):
        raise InvalidParameter(
            f"the checkpoint stores {stored.config()} experts; --expert-dtype {expert_dtype} cannot re-quantize them "
            "(use auto, or quantize the original checkpoint)"
        )
    return stored


def load(
    path: str | Path,
    device: torch.device,
    dtype_name: str = "auto",
    progress: bool = True,
    expert_dtype: str = "auto",
    group_size: int | None = None,
    fused_kernels: bool = True,
    offload_dir: Path | None = None,
    direct_io: bool = True,
    dense_dtype: str = "auto",
) -> LoadedModel:
    """Read config and weights, packing experts into the host store as they stream by; never materialise all experts on the device.

    With `offload_dir` the experts live in an on-disk store there: reused when its manifest matches this checkpoint,
    layout and dtype (then no expert tensor is read from the checkpoint), else built first from a full load."""
    path = Path(path)
    cfg = read_config(path)
    files = shard_files(path)
    plan = plan_load(cfg, device, dtype_name, expert_dtype, group_size, dense_dtype)
    model, dtype, why, fmt, shape, info = plan.model, plan.dtype, plan.dtype_reason, plan.fmt, plan.shape, plan.model.info
    check_runnable(info, path)
    disk: DiskStore | None = None
    if offload_dir is not None:
        wanted = store_manifest(checkpoint_fingerprint(path), shape, fmt, dtype, device, fused_kernels, list(info.moe_layers), info.num_experts)
        found = matching_manifest(offload_dir, wanted)
        if found is not None:
            disk = open_store(offload_dir, found, dtype, direct_io)
    if disk is None and offload_dir is None:  # building a store on disk holds only the layers being written
        check_host_memory(plan, device)
    fp32, interleaved = fp32_names(model), info.interleaved_experts
    if disk is None and offload_dir is not None:
        staging = StagingStore(list(info.moe_layers), info.num_experts, shape, fmt)
        with StoreWriter(offload_dir, wanted, progress) as writer:
            flusher = LayerFlusher(staging, writer, wanted, dtype)
            dense = _read_weights(files, cfg, staging, flusher, device, dtype, fp32, interleaved, progress, plan.packed)
            _finish(model, dense, staging, cfg, device, plan.packed)
            disk = flusher.finish(direct_io)  # the experts live on disk only
        store: ExpertStore | None = None
    else:
        store = None if disk is not None else ExpertStore(list(info.moe_layers), info.num_experts, shape, fmt, pin=pins_host_store(device, False))
        _finish(model, _read_weights(files, cfg, store, None, device, dtype, fp32, interleaved, progress, plan.packed), store, cfg, device, plan.packed)
        if store is not None and fused_kernels:
            use_fused_kernels(store, dtype, device, progress)
    model.prepare_weights()
    dense_path = pack_dense(model, dtype, device, fused_kernels)
    model.eval()
    store = disk if disk is not None else store
    return LoadedModel(model=model, store=store, config=cfg, path=path, dtype=dtype, dtype_reason=why, dense_path=dense_path, dense=plan.dense)


def check_runnable(info: ModelInfo, path: Path) -> None:
    """A CheckpointError, before any weight is read, for a config the engine cannot run (one a server must not start on)."""
    if info.moe_layers and not 1 <= info.top_k <= info.num_experts:
        raise CheckpointError(
            f"config.json in {path} routes each token to {info.top_k} experts of {info.num_experts}: experts per token must be 1 to {info.num_experts}"
        )


def _read_weights(  # noqa: PLR0913 - the loader's state, passed down
    files: list[Path],
    cfg: PretrainedConfig,
    store: ExpertPacker | None,
    flusher: LayerFlusher | None,
    device: torch.device,
    dtype: torch.dtype,
    fp32: frozenset[str],
    interleaved: bool,
    progress: bool,
    packed: dict[str, ExpertFormat] | None = None,
) -> dict[str, torch.Tensor]:
    """Stream every checkpoint tensor into the expert store (each layer written out by `flusher` once complete) or the
    dense state dict, which is returned."""
    dense: dict[str, torch.Tensor] = {}
    bar = tqdm(total=count_tensors(files), desc="loading weights", unit="tensor", disable=(not progress) or None, leave=False)
    for key, tensor in iter_tensors(files):
        bar.update()
        layer = _place(key, tensor, cfg, store, dense, device, dtype, fp32, interleaved, packed)
        if flusher is not None and layer is not None:
            flusher.flush(layer)
    bar.close()
    return dense


def open_store(directory: Path, manifest: Manifest, dtype: torch.dtype, direct_io: bool) -> DiskStore:
    """A finished store, opened for reading in the layout its manifest names."""
    return DiskStore(directory, manifest, layout_format(manifest.layout_id, manifest.format.get("group_size") or 0, dtype), direct_io)


class LayerFlusher:
    """Streams a store to disk while a checkpoint loads: each MoE layer, once complete, is written (in the compute
    layout) and its staging buffer freed, so peak memory stays near the layers being filled, not all experts."""

    def __init__(self, store: StagingStore, writer: StoreWriter, manifest: Manifest, dtype: torch.dtype) -> None:
        self.store, self.writer, self.manifest = store, writer, manifest
        self.kernel = None if manifest.layout_id == store.format.layout_id else layout_format(manifest.layout_id, manifest.format.get("group_size") or 0, dtype)
        self.layout = None if self.kernel is None else ExpertLayout(store.shape, self.kernel, nbytes=store.expert_bytes)

    def flush(self, layer: int) -> None:
        """Write and release `layer` if it is complete and not written yet."""
        if self.writer.written(layer) or not self.store.layer_complete(layer):
            return
        kernel, layout = self.kernel, self.layout
        convert = None if kernel is None or layout is None else (lambda buffer: self.store.converted(buffer, kernel, layout))
        self.writer.write_layer(layer, self.store.layer_block(layer), convert)
        self.store.release_layer(layer)

    def finish(self, direct_io: bool) -> DiskStore:
        """Write what is left (layers completed last), then the manifest; the finished store, opened for reading."""
        for layer in self.manifest.moe_layers:
            self.flush(layer)
        done = self.writer.finish()
        return DiskStore(self.writer.directory, done, self.kernel or self.store.format, direct_io)


def store_manifest(
    fingerprint: str, shape: ExpertShape, fmt: ExpertFormat, dtype: torch.dtype, device: torch.device, fused: bool, moe_layers: list[int], num_experts: int
) -> Manifest:
    """The manifest an on-disk store of this checkpoint must have: records in the layout compute will read."""
    portable = ExpertLayout(shape, fmt)
    kernel = compute_format(fmt, dtype, device, [shape.matrix_shape(m) for m in MATRICES]) if fused else None
    layout = portable if kernel is None else ExpertLayout(shape, kernel, nbytes=portable.nbytes)
    return expected_manifest(fingerprint, layout, dtype, moe_layers, num_experts)


def matching_manifest(directory: Path, wanted: Manifest) -> Manifest | None:
    """The store's manifest when it matches (reuse), None when there is no finished store (build); another store: an error."""
    found = read_manifest(directory)
    if found is None:
        return None
    if found.version != wanted.version and found.fingerprint == wanted.fingerprint:  # this checkpoint's store, an older layout
        log.warning("%s holds an expert store of version %d; rebuilding it as version %d", directory, found.version, wanted.version)
        return None
    if found.key() != wanted.key():
        flags = store_flags(found, wanted)
        if flags:
            raise InvalidParameter(f"{directory} holds this checkpoint's experts stored for {flags}: add {flags} to use it, or give another --offload-dir")
        differs = sorted(k for k, v in wanted.key().items() if found.key().get(k) != v)
        raise InvalidParameter(
            f"{directory} holds an expert store of another checkpoint or format (differs in {', '.join(differs)}): "
            "give another --offload-dir or delete that one"
        )
    return found


def store_flags(found: Manifest, wanted: Manifest) -> str | None:
    """The --expert-dtype / --group-size / --dtype flags under which a store of this very checkpoint would match, or None
    when it is another checkpoint's (or differs in what no flag sets, such as the kernel layout of another machine)."""
    fmt, want = found.format, wanted.format
    if found.fingerprint != wanted.fingerprint or fmt.get("expert_format") is None:
        return None
    flags = []
    if fmt.get("expert_format") != want.get("expert_format"):
        flags.append(f"--expert-dtype {fmt['expert_format']}")
    if fmt.get("group_size") is not None and fmt.get("group_size") != want.get("group_size", DEFAULT_GROUP_SIZE):
        flags.append(f"--group-size {fmt['group_size']}")
    if found.dtype != wanted.dtype:
        flags.append(f"--dtype {found.dtype}")
    return " ".join(flags) or None


def _place(
    key: str,
    tensor: torch.Tensor,
    cfg: PretrainedConfig,
    store: ExpertPacker | None,
    dense: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    fp32: frozenset[str],
    interleaved: bool = False,
    packed: dict[str, ExpertFormat] | None = None,
) -> int | None:
    """Route one checkpoint tensor to the expert store (packed there; skipped when None: the experts are on disk already) or the
    dense state dict (`fp32` names stay float32; the weights of `packed` linears are quantized, or taken packed as stored).
    Returns the MoE layer of an expert tensor, else None."""
    key = canonical_key(key)
    if unused(key, cfg.get_text_config().num_hidden_layers):
        return None
    kind = classify(key)
    if kind is not None:
        if store is not None:
            place_expert(key, kind, tensor, store, interleaved)
        return kind.layer
    if not key.endswith("rotary_emb.inv_freq"):
        name = dense_name(key)
        prefix, _, leaf = name.rpartition(".")
        fmt = (packed or {}).get(prefix)
        if fmt is not None and leaf == "weight":
            dense.update(quantized_fields(prefix, fmt, tensor, device))
        elif fmt is not None and leaf != "bias":
            dense[name] = tensor.to(device)  # a packed field, as `quantize --dense-dtype` wrote it
        else:
            dense[name] = dense_tensor(name, tensor).to(device=device, dtype=torch.float32 if name in fp32 else dtype)
    return None


def place_expert(
    key: str,
    kind: ExpertTensor | FusedExpertTensor | PackedExpertTensor | HubExpertField,
    tensor: torch.Tensor,
    store: ExpertPacker,
    interleaved: bool = False,
) -> None:
    """Pack one expert tensor of the checkpoint into the store; a tensor that does not fit is a CheckpointError.

    `interleaved` (gpt-oss): fused float tensors are [E, in, out] and gate_up's gate/up outputs alternate; they are
    turned into our [E, out, in], gate rows first. Hub blocks / scales / biases are copied as packed fields."""
    if kind.layer not in store.layers:
        moe = ", ".join(map(str, store.layers)) or "none"
        raise CheckpointError(f"tensor {key} is a routed expert of layer {kind.layer}, a dense layer in the config (MoE layers: {moe})")
    try:
        if isinstance(kind, ExpertTensor):
            store.put(kind.layer, kind.expert, kind.part, tensor)
        elif isinstance(kind, FusedExpertTensor):
            if interleaved:
                tensor = _gate_rows_first(tensor.transpose(1, 2), kind.part)
            store.put_fused(kind.layer, kind.part, tensor)
        elif isinstance(kind, HubExpertField):
            tensor = _gate_rows_first(tensor, kind.part) if interleaved else tensor
            store.put_packed(kind.layer, kind.part, kind.field, tensor.to(store.format.bias_dtype) if kind.field == "bias" else tensor)
        elif not store.format.quantized:
            raise ValueError("packed expert tensors need a quantization_config naming their format")
        else:
            store.put_packed(kind.layer, kind.part, kind.field, tensor)
    except (ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"tensor {key} does not fit the config: {e}") from None


def _gate_rows_first(t: torch.Tensor, part: str) -> torch.Tensor:
    """[E, 2I, ...] with gate and up rows alternating (gpt-oss) -> gate rows, then up rows; `down` passes unchanged."""
    return torch.cat((t[:, 0::2], t[:, 1::2]), dim=1) if part == "gate_up" else t


def _finish(
    model: CausalLM, dense: dict[str, torch.Tensor], store: ExpertPacker | None, cfg: PretrainedConfig, device: torch.device, packed: dict | None = None
) -> None:
    """Assign dense weights, tie the LM head if asked (a quantized head: the embedding's packed copy), and check nothing is missing."""
    head = (packed or {}).get("lm_head")
    tied = getattr(cfg, "tie_word_embeddings", False) and "model.embed_tokens.weight" in dense
    if tied and head is not None and not any(k.startswith("lm_head.") and k != "lm_head.bias" for k in dense):
        dense.update(quantized_fields("lm_head", head, dense["model.embed_tokens.weight"], device))
    elif "lm_head.weight" not in dense and tied and head is None:
        dense["lm_head.weight"] = dense["model.embed_tokens.weight"]
    expected = set(model.state_dict().keys())
    missing = sorted(expected - dense.keys())
    unexpected = sorted(dense.keys() - expected)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} weights the config does not describe, e.g. {unexpected[0]}")
    lacking = [] if store is None else store.missing()
    if lacking:
        raise CheckpointError(f"checkpoint lacks {len(lacking)} expert weights, e.g. {lacking[0]}")
    try:
        model.load_state_dict(dense, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match the config: {' '.join(str(e).split())[:300]}") from None
    model.rotary.to(device)
