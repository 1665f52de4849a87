"""The CUDA int4 layout (`CudaInt4`, torch's tinygemm `_weight_int4pack_mm`) around its two ops, on CPU: the ops are
replaced by a plain stand-in, so what is tested is the engine's part (nibble order, fields, repack, slots, the load-time
check), not the kernel; on a GPU every load checks the kernel itself (`cuda_int4_agrees`)."""

from __future__ import annotations

import logging

import torch

from mobile_moe import LLM, engine_config
from mobile_moe.bench.synthetic import build_synthetic
from mobile_moe.config import SamplingParams
from mobile_moe.experts.formats import Int4Format, unpack_int4
from mobile_moe.experts.kernels import INT4_OFFSET, CudaInt4, cuda_int4_agrees, inner_k_tiles, layout_format

CPU = torch.device("cpu")


class StandInTinygemm(CudaInt4):
    """tinygemm's ops on CPU: the 'tiles' are the codes' bytes as they arrive (even column high), the matmul dequantizes."""

    def convert(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.contiguous().view(torch.int32)  # [out, in / 8]

    def matmul(self, x: torch.Tensor, tiles: torch.Tensor, scale_zeros: torch.Tensor) -> torch.Tensor:
        groups, out, _ = scale_zeros.shape
        packed = tiles.reshape(out, -1).view(torch.uint8)  # [out, in / 2]
        codes = unpack_int4((packed >> 4) | (packed << 4)).float().view(out, groups, -1)  # back to even column low
        scale, zero = scale_zeros.float().transpose(0, 1).unbind(-1)  # [out, G]
        w = ((codes - INT4_OFFSET) * scale[..., None] + zero[..., None]).view(out, -1)
        return (x.float() @ w.t()).to(torch.bfloat16)


class NibblesUnswapped(StandInTinygemm):
    """A layout mistake the load-time check must catch: codes handed over with the portable nibble order."""

    def convert(self, codes: torch.Tensor) -> torch.Tensor:
        return super().convert((codes >> 4) | (codes << 4))


def test_the_load_time_check_accepts_a_right_layout_and_refuses_a_wrong_one(caplog):
    shapes = [(128, 128), (128, 64)]
    assert inner_k_tiles([inp for _, inp in shapes]) == 4 and inner_k_tiles([96]) == 2 and inner_k_tiles([2048, 1024]) == 8 and inner_k_tiles([48]) is None
    assert cuda_int4_agrees(StandInTinygemm(Int4Format(32), CPU, 4), shapes)
    project_log = logging.getLogger("mobile_moe")
    project_log.addHandler(caplog.handler)
    try:
        assert not cuda_int4_agrees(NibblesUnswapped(Int4Format(32), CPU, 4), shapes)
    finally:
        project_log.removeHandler(caplog.handler)
    assert "disagrees with the reference path" in caplog.text


def test_the_layout_id_names_the_tiles_and_rebuilds_the_format():
    fmt = CudaInt4(Int4Format(64), CPU, 8)
    again = layout_format(fmt.layout_id, 64, torch.bfloat16)
    assert type(again) is CudaInt4 and again.layout_id == "int4:_weight_int4pack_mm:t8" and again.inner_k_tiles == 8
    assert again.group_size == 64 and again.dtype == torch.bfloat16


def _synthetic() -> LLM:
    """OLMoE shapes / 16 (hidden 128, experts 64 wide), int4 g32 experts in the portable layout, float32 compute."""
    loaded = build_synthetic("olmoe-1b-7b", CPU, "float32", shrink=16, expert_dtype="int4", group_size=32, fused_kernels=False)
    return LLM(loaded, engine_config(progress=False, expert_cache=16))


def test_a_store_repacked_into_the_cuda_layout_decodes_as_the_portable_one():
    """Repack, slot copies, typed int32 views and both decode paths (offloaded, and gathered on the device) carry the
    layout intact: logits and greedy tokens as dequantize-then-matmul gives them (activations rounded to bf16 apart)."""
    reference, repacked = _synthetic(), _synthetic()
    store = repacked.loaded.store
    store.repack(StandInTinygemm(store.format, CPU, inner_k_tiles([128, 64])))
    assert store.expert_bytes == reference.loaded.store.expert_bytes and store.format.layout_id == "int4:_weight_int4pack_mm:t4"
    repacked.reset_cache(16)
    ids = list(range(3, 40))
    want, got = reference.logits(ids), repacked.logits(ids)
    # the stand-in multiplies in float32 (5e-6 here); codes with their nibbles swapped give 1.5e-3 (random experts add little)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    sampling = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    for llm in (reference, repacked):  # every expert resident, slots gathered by index as on CUDA
        llm.reset_cache(llm.loaded.store.total_experts)
        llm.cache.load_all()
        llm.runner.executor.device_indexed = True
    assert repacked.generate(ids, sampling).token_ids == reference.generate(ids, sampling).token_ids
