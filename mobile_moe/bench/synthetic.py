"""Random-weight models with the exact shapes of public MoE checkpoints, built in memory (no files)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch
import transformers as T

from mobile_moe.bench.costinputs import dequant_traffic, model_cost
from mobile_moe.bench.costmodel import ModelCost
from mobile_moe.errors import InvalidParameter
from mobile_moe.experts.disk import DiskStore, StoreWriter
from mobile_moe.experts.formats import ExpertFormat, FloatFormat, make_format
from mobile_moe.experts.kernels import INT4_OFFSET, layout_format, use_fused_kernels
from mobile_moe.experts.store import MATRICES, ExpertLayout, ExpertPacker, ExpertShape, ExpertStore, StagingStore, pins_host_store
from mobile_moe.loading.dense import dense_formats, pack_dense, replace_linears, resolve_dense
from mobile_moe.loading.loader import LayerFlusher, LoadedModel, matching_manifest, model_params, open_store, resolve_dtype, store_manifest
from mobile_moe.models.registry import build_model
from mobile_moe.models.transformer import CausalLM, ModelInfo

INIT_STD = 0.02

SHAPES: Mapping[str, tuple[type, dict]] = MappingProxyType(
    {
        "olmoe-1b-7b": (
            T.OlmoeConfig,
            dict(
                vocab_size=50304,
                hidden_size=2048,
                intermediate_size=1024,
                num_hidden_layers=16,
                num_attention_heads=16,
                num_key_value_heads=16,
                num_experts=64,
                num_experts_per_tok=8,
                max_position_embeddings=4096,
                norm_topk_prob=False,
            ),
        ),
        "qwen1.5-moe-a2.7b": (
            T.Qwen2MoeConfig,
            dict(
                vocab_size=151936,
                hidden_size=2048,
                intermediate_size=5632,
                moe_intermediate_size=1408,
                shared_expert_intermediate_size=5632,
                num_hidden_layers=24,
                num_attention_heads=16,
                num_key_value_heads=16,
                num_experts=60,
                num_experts_per_tok=4,
                max_position_embeddings=8192,
                norm_topk_prob=False,
            ),
        ),
        "deepseek-v2-lite": (
            T.DeepseekV2Config,
            dict(
                vocab_size=102400,
                hidden_size=2048,
                intermediate_size=10944,
                moe_intermediate_size=1408,
                num_hidden_layers=27,
                num_attention_heads=16,
                num_key_value_heads=16,
                n_routed_experts=64,
                num_experts_per_tok=6,
                n_shared_experts=2,
                first_k_dense_replace=1,
                kv_lora_rank=512,
                q_lora_rank=None,
                qk_rope_head_dim=64,
                qk_nope_head_dim=128,
                v_head_dim=128,
                topk_method="greedy",
                routed_scaling_factor=1.0,
                max_position_embeddings=4096,
            ),
        ),
        "qwen3-30b-a3b": (
            T.Qwen3MoeConfig,
            dict(
                vocab_size=151936,
                hidden_size=2048,
                intermediate_size=6144,
                moe_intermediate_size=768,
                num_hidden_layers=48,
                num_attention_heads=32,
                num_key_value_heads=4,
                head_dim=128,
                num_experts=128,
                num_experts_per_tok=8,
                max_position_embeddings=40960,
                norm_topk_prob=True,
            ),
        ),
        "mixtral-8x7b": (
            T.MixtralConfig,
            dict(
                vocab_size=32000,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                num_local_experts=8,
                num_experts_per_tok=2,
                max_position_embeddings=32768,
            ),
        ),
        # transformers' config defaults are these models' published shapes, except where a field is given
        "gpt-oss-20b": (T.GptOssConfig, dict(num_hidden_layers=24, num_local_experts=32, num_key_value_heads=8)),  # experts ship as MXFP4
        "qwen3.5-35b-a3b": (T.Qwen3_5MoeTextConfig, dict(num_key_value_heads=2)),
        "glm-4.5-air": (T.Glm4MoeConfig, dict(attention_bias=True, num_key_value_heads=8)),
        "ernie-4.5-21b-a3b": (T.Ernie4_5_MoeConfig, dict(num_key_value_heads=4)),
    }
)
CODE_STD = {torch.int8: 255 / 12**0.5, torch.uint8: 16 / 12**0.5}  # std of uniform int8 [-127, 127] and int4 [0, 15] codes


def _fill_random(name: str, field: torch.Tensor, gen: torch.Generator) -> None:
    """Random contents, in place, of one packed field of a layer's experts: weights of std ~INIT_STD once dequantized."""
    if name == "bias":  # expert biases (gpt-oss)
        field.zero_()
    elif name == "weight":
        field.normal_(0.0, INIT_STD, generator=gen)
    elif name in ("qweight", "blocks", "packed"):  # int8 codes, or int4 / FP4 codes two per byte in any layout (any byte is valid)
        low, high = (-127, 128) if field.dtype == torch.int8 else (0, 256)
        field.random_(low, high, generator=gen)
    elif name == "tiles":  # CUDA int4 tiles: eight codes per int32 (any word is valid)
        field.random_(-(2**31), 2**31, generator=gen)
    elif name == "scale_zeros":  # the int4 kernels' (scale, zero') pairs for codes centred on 8: w = (q - 8) * scale + zero'
        scale = INIT_STD / CODE_STD[torch.uint8]
        field[..., 0].fill_(scale)
        field[..., 1].fill_((INT4_OFFSET - 7.5) * scale)  # a portable zero of 7.5, the middle code
    elif name == "scales" and field.dtype == torch.uint8:  # MXFP4 E8M0 exponents: random FP4 codes have std ~3.2
        field.fill_(127 + round(math.log2(INIT_STD / 3.2)))
    else:
        codes = torch.int8 if field.ndim == 2 else torch.uint8  # int8 scales are [E, out]; int4 scales and zeros [E, out, groups]
        field.fill_(INIT_STD / CODE_STD[codes] if name == "scales" else 7.5)  # int4 zeros: the middle code


def _random_layer(store: ExpertPacker, layer: int, gen: torch.Generator, device: torch.device) -> None:
    """Fill every packed field of a layer's experts with random contents, made on the device (the generator's) one field at a time."""
    for matrix in MATRICES:
        for (field, _), view in zip(store.layout.fields[matrix], store.layer_fields(layer)[matrix]):
            if device.type == "cpu":
                _fill_random(field.name, view, gen)
            else:
                made = torch.empty(view.shape, dtype=view.dtype, device=device)
                _fill_random(field.name, made, gen)
                view.copy_(made)
        store.mark_filled(layer, matrix)


SHRUNK_WIDTHS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "kv_lora_rank")


def synthetic_config(name: str, shrink: int = 1, layers: int | None = None) -> T.PretrainedConfig:
    """The config of a named shape; shrink > 1 divides widths (not layers, experts or top-k) for CPU tests; `layers` keeps the
    first that many decoder layers (a CPU rehearsal of a GPU run)."""
    if name not in SHAPES:
        raise InvalidParameter(f"unknown synthetic model {name!r} (known: {', '.join(SHAPES)})")
    cls, fields = SHAPES[name]
    fields = dict(fields)
    if layers is not None:
        fields["num_hidden_layers"] = _kept_layers(cls, fields, layers)
    if shrink > 1:
        defaults = cls()  # the fields a shape does not give
        for key in SHRUNK_WIDTHS:
            value = fields.get(key, getattr(defaults, key, None))
            if isinstance(value, int):
                fields[key] = max(8, value // shrink)
        kv = max(1, fields["num_key_value_heads"] // shrink)
        heads = fields.get("num_attention_heads", defaults.num_attention_heads)
        fields["num_attention_heads"] = max(kv, heads // shrink // kv * kv)
        fields["num_key_value_heads"] = kv
    return cls(**fields, bos_token_id=0, eos_token_id=1, pad_token_id=0)


def _kept_layers(cls: type, fields: dict, layers: int) -> int:
    """`layers`, checked: at least one, at most the shape's, and past its leading dense layers (so that some layer has experts)."""
    full = fields.get("num_hidden_layers", getattr(cls(), "num_hidden_layers", None))
    dense = fields.get("first_k_dense_replace", getattr(cls(), "first_k_dense_replace", 0)) or 0
    if not dense < layers <= full:
        raise InvalidParameter(f"--layers must be in {dense + 1}..{full} for this shape, got {layers}")
    return layers


def synthetic_expert_numel(cfg: T.PretrainedConfig) -> int:
    """Weights in one routed expert of a config."""
    with torch.device("meta"):
        info = build_model(cfg).info
    return ExpertShape(info.hidden, info.expert_intermediate).numel


def full_size_cost(name: str, fmt: ExpertFormat | None = None, layers: int | None = None) -> ModelCost:
    """Cost-model sizes of the full-width model in bf16, experts packed as `fmt` (for predictions from a reduced-width run's trace;
    `layers`: of its first that many layers, as the run kept)."""
    cfg = synthetic_config(name, layers=layers)
    with torch.device("meta"):
        model = build_model(cfg)
    info = model.info
    layout = ExpertLayout(ExpertShape(info.hidden, info.expert_intermediate, info.expert_bias), fmt or FloatFormat(torch.bfloat16))
    return model_cost(model, layout.nbytes, bytes_per_param=2, dequant_bytes=dequant_traffic(layout, torch.bfloat16))


def _random_dense(model: CausalLM, gen: torch.Generator) -> None:
    """Random dense weights in place: norms 1, embeddings of unit variance, the rest N(0, INIT_STD); correction biases 0."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and p.dim() == 1:
                p.fill_(1.0)
            elif pname == "model.embed_tokens.weight":
                p.normal_(0.0, 1.0, generator=gen)  # token identity dominates the residual stream: routes follow tokens
            else:
                p.normal_(0.0, INIT_STD, generator=gen)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.zero_()


def build_synthetic(  # noqa: PLR0913 - the bench's model flags, by keyword
    name: str,
    device: torch.device,
    dtype_name: str = "auto",
    shrink: int = 1,
    seed: int = 0,
    expert_dtype: str = "auto",
    group_size: int | None = None,
    fused_kernels: bool = True,
    offload_dir: Path | None = None,
    direct_io: bool = True,
    layers: int | None = None,
    dense_dtype: str = "auto",
) -> LoadedModel:
    """Random dense weights made on the device in the compute dtype, random experts made there (already packed: random codes and scales) and
    copied into (pinned) host memory.

    Embeddings have unit variance so that, as in a trained model with load-balanced routers, each token is
    routed by its own identity; with small random embeddings the shared part of the residual stream
    would send every token to the same few experts and make caching look far better than it is.
    With `offload_dir` the experts go to an on-disk store instead, one layer at a time (reused when it matches).
    `layers`: only the first that many decoder layers (see `synthetic_config`). `dense_dtype`: the dense linears are
    quantized from their random float weights as a checkpoint's would be (loading/dense.py).
    """
    cfg = synthetic_config(name, shrink, layers)
    with torch.device("meta"):
        model = build_model(cfg)
    dtype, why = (
        resolve_dtype(dtype_name, cfg, device, model) if dtype_name != "auto" or device.type == "cpu" else (torch.bfloat16, "bfloat16: synthetic on cuda")
    )
    inv_freq = model.rotary.inv_freq
    model.to(dtype)  # on meta: the weights are made in the compute dtype, never in float32 first
    model.to_empty(device=device)
    model.rotary.inv_freq = inv_freq.to(device)  # rotary frequencies stay float32
    gen = torch.Generator(device=device).manual_seed(seed)
    _random_dense(model, gen)
    info = model.info
    fmt = make_format(expert_dtype, dtype, group_size if expert_dtype == "int4" else None)
    dense = resolve_dense(cfg, dense_dtype, group_size, device, dtype, model_params(model))
    replace_linears(model, dense_formats(model, dense), quantize=True)
    model.prepare_weights()
    dense_path = pack_dense(model, dtype, device, fused_kernels)
    model.eval()
    fingerprint = f"synthetic:{name}:shrink={shrink}:seed={seed}" + ("" if layers is None else f":layers={layers}")
    store = _random_experts(info, fmt, dtype, device, gen, fused_kernels, offload_dir, direct_io, fingerprint)
    return LoadedModel(model=model, store=store, config=cfg, path=Path(f"synthetic:{name}"), dtype=dtype, dtype_reason=why, dense_path=dense_path, dense=dense)


def _random_experts(
    info: ModelInfo,
    fmt: ExpertFormat,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    fused_kernels: bool,
    offload_dir: Path | None,
    direct_io: bool,
    fingerprint: str,
) -> ExpertStore | DiskStore:
    """Random packed experts in host memory, or, with `offload_dir`, in an on-disk store written one layer at a time
    (an existing store of the same model and layout is reused as is)."""
    shape = ExpertShape(info.hidden, info.expert_intermediate, info.expert_bias)
    if offload_dir is not None:
        return _random_disk_store(info, shape, fmt, dtype, device, gen, fused_kernels, offload_dir, direct_io, fingerprint)
    store = ExpertStore(list(info.moe_layers), info.num_experts, shape, fmt, pin=pins_host_store(device, False))
    for layer in store.layers:
        _random_layer(store, layer, gen, device)
    if fused_kernels:
        use_fused_kernels(store, dtype, device, progress=True)
    return store


def _random_disk_store(  # noqa: PLR0913 - the build's settings, passed down
    info: ModelInfo,
    shape: ExpertShape,
    fmt: ExpertFormat,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    fused_kernels: bool,
    offload_dir: Path,
    direct_io: bool,
    fingerprint: str,
) -> DiskStore:
    """The on-disk store of random experts: reused when one of this model and layout is there, else made and written one
    layer at a time (RAM holds one layer of experts)."""
    wanted = store_manifest(fingerprint, shape, fmt, dtype, device, fused_kernels, list(info.moe_layers), info.num_experts)
    found = matching_manifest(offload_dir, wanted)
    if found is not None:
        return open_store(offload_dir, found, dtype, direct_io)
    records = layout_format(wanted.layout_id, wanted.format.get("group_size") or 0, dtype)  # made in the layout compute reads: no repacking
    staging = StagingStore(list(info.moe_layers), info.num_experts, shape, records, nbytes=wanted.expert_bytes)
    with StoreWriter(offload_dir, wanted, True) as writer:
        flusher = LayerFlusher(staging, writer, wanted, dtype)
        for layer in staging.layers:
            _random_layer(staging, layer, gen, device)
            flusher.flush(layer)  # written and freed
        return flusher.finish(direct_io)
