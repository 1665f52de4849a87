"""How many expert slots the device cache gets: explicit, from a memory budget, or automatic; planned without allocating."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from mobile_moe.config import CacheConfig, EngineConfig
from mobile_moe.errors import CacheTooSmall, InvalidParameter
from mobile_moe.experts.disk import DiskStore, record_bytes
from mobile_moe.experts.host_memory import available_memory_bytes
from mobile_moe.experts.store import MATRICES, ExpertLayout, ExpertShape
from mobile_moe.layers.qlinear import QuantLinear
from mobile_moe.loading.dense import quantized_modules
from mobile_moe.loading.loader import dense_bytes, plan_load, resolve_dtype, resolve_format
from mobile_moe.models.registry import build_model
from mobile_moe.models.transformer import CausalLM

GIB = 1024**3
AUTO_FREE_FRACTION = 0.9  # share of free device memory an automatic budget takes
PREFILL_CHUNK = 512  # prompt tokens per prefill pass: bounds the transient activations a budget must hold


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    """KV-cache bytes one position takes across all layers."""
    k_shapes, v_shapes = model.kv_shapes()
    return sum(h * d for h, d in k_shapes + v_shapes) * dtype.itemsize


def kv_bytes(model: CausalLM, dtype: torch.dtype, context: int) -> int:
    """KV-cache bytes of one sequence of `context` positions: a sliding-window layer holds at most its window plus one
    prompt chunk (its ring, see `Runner.rings`)."""
    k_shapes, v_shapes = model.kv_shapes()
    held = [context if w is None else min(context, w + PREFILL_CHUNK) for w in model.kv_windows()]
    return sum((hk * dk + hv * dv) * n for (hk, dk), (hv, dv), n in zip(k_shapes, v_shapes, held)) * dtype.itemsize


def recurrent_bytes(model: CausalLM, dtype: torch.dtype) -> int:
    """Bytes of the recurrent layers' per-sequence states (conv windows, DeltaNet states), twice: the state and a fallback snapshot."""
    states = [m.new_state(torch.device("meta"), dtype) for m in model.modules() if hasattr(m, "new_state")]
    return 2 * sum(t.numel() * t.element_size() for state in states for t in state.tensors.values())


def snapshot_bytes(model: CausalLM, dtype: torch.dtype) -> int:
    """Bytes of one copy of a sequence's recurrent states: what prefix reuse keeps per held prompt (0 for attention-only models)."""
    return recurrent_bytes(model, dtype) // 2


def prefix_snapshots(gb: float, model: CausalLM, dtype: torch.dtype) -> int:
    """Recurrent-state snapshots a `--prefix-cache GB` budget keeps (a large number for attention-only models, 0 when off);
    raises InvalidParameter, in one line, for a budget on but under one sequence's snapshot."""
    if gb <= 0:
        return 0
    size = snapshot_bytes(model, dtype)
    if not size:
        return 1 << 30
    if gb * GIB < size:
        need = f"{size / 2**20:.1f} MiB; give at least {size / GIB:.4f} GB, or 0 to turn reuse off"
        raise InvalidParameter(f"--prefix-cache {gb:g} GB cannot hold one sequence's recurrent states ({need})")
    return int(gb * GIB // size)


def scratch_bytes(model: CausalLM, dtype: torch.dtype, context: int) -> int:
    """Estimate of the largest transient activations: one prefill chunk through a layer (expert pairs, MLP widths, mask)."""
    info, chunk = model.info, min(PREFILL_CHUNK, context)
    widest = max((m.out_features for m in model.model.layers.modules() if isinstance(m, (nn.Linear, QuantLinear))), default=0)
    per_token = info.top_k * (2 * info.hidden + 3 * info.expert_intermediate) + 3 * widest + 8 * info.hidden
    return chunk * per_token * dtype.itemsize + chunk * context  # + boolean causal mask


def dense_dequant_bytes(model: CausalLM, dtype: torch.dtype) -> int:
    """Transient bytes of the largest quantized dense matrix a prompt chunk dequantizes (above its kernel's row threshold);
    the LM head is left out: a prompt runs it on its last position only (scoring every position, as `eval` does, is not planned)."""
    mats = [m for m in quantized_modules(model) if m is not model.lm_head]
    return max((m.fmt.dequant_bytes(m.out_features, m.in_features, dtype) for m in mats), default=0)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SlotPlan:
    """The expert slots a cache gets and where the budget went."""

    slots: int
    total_experts: int
    expert_bytes: int
    budget_bytes: int | None = None  # None: no budget applies (explicit slot count, or CPU)
    dense_bytes: int = 0
    kv_bytes: int = 0
    scratch_bytes: int = 0
    context: int = 0
    rows: int = 1  # sequences whose KV cache the plan holds
    prefix_snapshots: int = 0  # recurrent-state snapshots prefix reuse may keep (`prefix_snapshots`)
    prefix_bytes: int = 0  # what they take of the budget: one per held sequence (the pool's rows and the single one), at most

    def describe(self) -> str:
        """One line: budget split and resulting slots."""
        if self.budget_bytes is None:
            return f"{self.slots} of {self.total_experts} expert slots ({self.expert_bytes / 2**20:.1f} MiB each)"
        return (
            f"a {self.budget_bytes / GIB:.2f} GiB budget = {self.dense_bytes / GIB:.2f} GiB dense weights + "
            f"{self.kv_bytes / GIB:.2f} GiB KV cache ({self._kv_shape()}) + {self._prefix()}{self.scratch_bytes / GIB:.2f} GiB activations + "
            f"{self.slots} of {self.total_experts} expert slots ({self.expert_bytes / 2**20:.1f} MiB each)"
        )

    def _prefix(self) -> str:
        """'X GiB prefix snapshots + ' when prefix reuse keeps recurrent states, else nothing."""
        return f"{self.prefix_bytes / GIB:.2f} GiB prefix snapshots + " if self.prefix_bytes else ""

    def _kv_shape(self) -> str:
        """'C tokens' or 'R rows x C tokens'."""
        return f"{self.context} tokens" if self.rows == 1 else f"{self.rows} rows x {self.context} tokens"


def plan_slots(
    cfg: CacheConfig,
    model: CausalLM,
    expert_bytes: int,
    total_experts: int,
    device: torch.device,
    dtype: torch.dtype,
    max_context: int,
    dequant_bytes: int = 0,
    rows: int = 1,
    prefix_gb: float = 0.0,
) -> SlotPlan:
    """The slot plan; raises CacheTooSmall when one layer's top-k would not fit. `model` may live on the meta device.

    `dequant_bytes`: transient memory for dequantizing one packed expert matrix, counted with the activations;
    `rows`: sequences decoded together, each with its own KV cache of the full context; `prefix_gb`: `--prefix-cache`
    (prefix reuse reads the KV caches in place; the recurrent-state snapshots it keeps are counted beside them).
    """
    top_k = model.info.top_k
    snapshots = prefix_snapshots(prefix_gb, model, dtype)
    prefix = min(rows + 1, snapshots) * snapshot_bytes(model, dtype)
    if cfg.slots is not None:
        plan = SlotPlan(min(cfg.slots, total_experts), total_experts, expert_bytes, prefix_snapshots=snapshots)
        reason = f"--expert-cache {cfg.slots}"
    elif cfg.host_memory_gb is not None and device.type == "cpu":  # the host cache is the compute cache
        plan = SlotPlan(min(int(cfg.host_memory_gb * GIB) // expert_bytes, total_experts), total_experts, expert_bytes, prefix_snapshots=snapshots)
        reason = f"--host-memory {cfg.host_memory_gb:g} GB ({expert_bytes / 2**20:.2f} MiB per expert record)"
    else:
        budget = _budget_bytes(cfg, model, device)
        if budget is None:
            return SlotPlan(total_experts, total_experts, expert_bytes, prefix_snapshots=snapshots)  # CPU without a budget: every expert gets a slot
        context = min(model.info.max_context, max_context)
        dense = dense_bytes(model, dtype)
        kv = rows * (kv_bytes(model, dtype, context) + recurrent_bytes(model, dtype))
        scratch = scratch_bytes(model, dtype, context) + max(dequant_bytes, dense_dequant_bytes(model, dtype))  # one at a time
        slots = max(0, (budget - dense - kv - prefix - scratch) // expert_bytes)
        plan = SlotPlan(min(slots, total_experts), total_experts, expert_bytes, budget, dense, kv, scratch, context, rows, snapshots, prefix)
        reason = plan.describe()
    if plan.slots < top_k:
        raise CacheTooSmall(f"{reason}: too small for one layer's top-{top_k} experts (need >= {top_k} slots)")
    return plan


def host_tier_slots(cfg: CacheConfig, store: DiskStore, top_k: int) -> int:
    """Records the host tier holds between the disk and a separate compute cache: `--host-memory GB` of records, else every
    expert; raises CacheTooSmall when that is under one layer's top-k (each copy to the device pins its host record)."""
    total = store.total_experts
    if cfg.host_memory_gb is None:
        return total
    slots = min(int(cfg.host_memory_gb * GIB) // store.record_bytes, total)
    if slots < top_k:
        raise CacheTooSmall(
            f"--host-memory {cfg.host_memory_gb:g} GB holds {slots} expert records of {store.record_bytes / 2**20:.2f} MiB: "
            f"too small for one layer's top-{top_k} experts (need >= {top_k})"
        )
    return slots


def _budget_bytes(cfg: CacheConfig, model: CausalLM, device: torch.device) -> int | None:
    """The memory budget in bytes, or None when no budget applies."""
    if cfg.gpu_memory_gb is not None:
        return int(cfg.gpu_memory_gb * GIB)
    if device.type == "cuda":  # dense weights are already on the device: free memory excludes them
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * AUTO_FREE_FRACTION) + dense_bytes(model)
    return None


def plan_for_config(model_cfg: PretrainedConfig, config: EngineConfig) -> SlotPlan:
    """The slot plan of a checkpoint config under an engine config, built on the meta device: nothing is allocated."""
    device = torch.device(config.device)
    if device.type == "cuda" and config.cache.slots is None and config.cache.gpu_memory_gb is None and not torch.cuda.is_available():
        raise InvalidParameter("planning for cuda on a machine without CUDA needs --gpu-memory or --expert-cache")
    plan = plan_load(model_cfg, device, config.dtype, config.expert_dtype, config.group_size, config.dense_dtype)  # dense linears as they will be stored
    model, dtype, info = plan.model, plan.dtype, plan.model.info
    layout = ExpertLayout(plan.shape, plan.fmt)
    total = info.num_experts * len(info.moe_layers)
    scratch = dequant_scratch_bytes(layout, dtype)
    return plan_slots(config.cache, model, layout.nbytes, total, device, dtype, config.max_context, scratch, config.max_batch, config.prefix_cache_gb)


def dequant_scratch_bytes(layout: ExpertLayout, dtype: torch.dtype) -> int:
    """Transient bytes to dequantize the largest matrix of one expert (0 when experts are read in place)."""
    return max(layout.format.dequant_bytes(*layout.shape.matrix_shape(m), dtype) for m in MATRICES)


@dataclass(frozen=True)
class HostPlan:
    """What a load with an on-disk expert store will hold in RAM, from the config alone (before any weight is read)."""

    dense_bytes: int  # dense weights in RAM (0 when they live on a CUDA device)
    kv_bytes: int  # KV cache and recurrent states in RAM (0 on a CUDA device)
    host_slots: int  # expert records the host tier holds (on CPU: the compute cache)
    record_bytes: int
    top_k: int
    total_experts: int
    available_bytes: int | None  # MemAvailable; None where it cannot be read
    host_memory_gb: float | None  # --host-memory, when given

    @property
    def host_bytes(self) -> int:
        """Bytes of the host tier."""
        return self.host_slots * self.record_bytes

    @property
    def need_bytes(self) -> int:
        """RAM the load holds once running."""
        return self.dense_bytes + self.kv_bytes + self.host_bytes

    def describe(self) -> str:
        """One line: what the load will hold in RAM and what is left."""
        left = "" if self.available_bytes is None else f"; {_gib(self.available_bytes)} available, {_gib(self.available_bytes - self.need_bytes)} left"
        return (
            f"RAM: dense weights {_gib(self.dense_bytes)} + host tier {_gib(self.host_bytes)} ({self.host_slots} of {self.total_experts} experts, "
            f"{self.record_bytes / 2**20:.1f} MiB each) + KV cache {_gib(self.kv_bytes)} = {_gib(self.need_bytes)}{left}"
        )

    def check(self) -> None:
        """Refuse in one line a host tier under one layer's top-k, or a load the RAM available cannot hold."""
        flag = "a host tier of every expert" if self.host_memory_gb is None else f"--host-memory {self.host_memory_gb:g} GB"
        if self.host_slots < self.top_k:
            raise CacheTooSmall(
                f"{flag} holds {self.host_slots} expert records of {self.record_bytes / 2**20:.2f} MiB: too small for one layer's top-{self.top_k} experts "
                f"(need >= {self.top_k})"
            )
        if self.available_bytes is None:
            return
        least = self.dense_bytes + self.kv_bytes + self.top_k * self.record_bytes
        if least > self.available_bytes:
            raise CacheTooSmall(
                f"{_gib(self.available_bytes)} of RAM is available, less than the dense weights ({_gib(self.dense_bytes)}) + the KV cache "
                f"({_gib(self.kv_bytes)}) + one layer's top-{self.top_k} experts ({_gib(self.top_k * self.record_bytes)}): this model cannot run here"
            )
        if self.need_bytes > self.available_bytes:
            most = (self.available_bytes - self.dense_bytes - self.kv_bytes) / GIB
            raise CacheTooSmall(
                f"{flag} ({_gib(self.host_bytes)}) + dense weights ({_gib(self.dense_bytes)}) + KV cache ({_gib(self.kv_bytes)}) is more than the "
                f"{_gib(self.available_bytes)} of RAM available: give --host-memory {math.floor(most * 10) / 10:g} or less"
            )


def _gib(nbytes: int) -> str:
    """Bytes as GiB with two decimals."""
    return f"{nbytes / GIB:.2f} GiB"


def host_plan_for_config(model_cfg: PretrainedConfig, config: EngineConfig) -> HostPlan:
    """The RAM a load of this checkpoint config with an on-disk store (`config.offload_dir`) will hold; nothing is allocated."""
    device = torch.device(config.device)
    with torch.device("meta"):
        model = build_model(model_cfg)
    dtype, _ = resolve_dtype(config.dtype, model_cfg, device, model)
    info = model.info
    layout = ExpertLayout(
        ExpertShape(info.hidden, info.expert_intermediate, info.expert_bias), resolve_format(model_cfg, config.expert_dtype, config.group_size, dtype)
    )
    record, total, cache = record_bytes(layout.nbytes), info.num_experts * len(info.moe_layers), config.cache
    on_cpu = device.type == "cpu"
    if cache.host_memory_gb is not None:
        slots = min(int(cache.host_memory_gb * GIB) // record, total)
    else:  # on CPU an explicit compute cache is the host tier; else every expert gets a record in RAM
        slots = cache.slots if on_cpu and cache.slots is not None else total
    context = min(info.max_context, config.max_context)
    kv = config.max_batch * (kv_bytes(model, dtype, context) + recurrent_bytes(model, dtype)) if on_cpu else 0
    dense = dense_bytes(model, dtype) if on_cpu else 0
    return HostPlan(dense, kv, min(slots, total), record, info.top_k, total, available_memory_bytes(), cache.host_memory_gb)
