"""The CUDA int4 layout (`CudaInt4`, torch's tinygemm `_weight_int4pack_mm`) around its two ops, on CPU: the ops are
replaced by a stand-in that writes and reads the tiles as torch's int4mm.cu does and multiplies through torch's CPU int4
kernel (the same w = (q - 8) * scale + zero), so what is tested is the engine's part (nibble order, fields, repack,
slots, the load-time check) against the real layout, not the kernel's speed; on a GPU every load checks the kernel
itself (`cuda_int4_agrees`)."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from mobile_moe import LLM, engine_config
from mobile_moe.bench.synthetic import build_synthetic
from mobile_moe.config import SamplingParams
from mobile_moe.engine.runner import RunnerOptions
from mobile_moe.experts.formats import Int4Format
from mobile_moe.experts.kernels import INT4_OFFSET, CudaInt4, cuda_int4_agrees, inner_k_tiles, layout_format

CPU = torch.device("cpu")


def tinygemm_tiles(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """`_convert_weight_to_int4pack` on CPU, as int4mm.cu's `matrix_to_m16n8k16_Bint4_layout` writes it: codes uint8
    [n, k / 2] (even column in the high nibble) -> int32 [n / 8, k / (16 t), 32, t / 2]. Lane l of a warp holds row
    l / 4 of its 8-row tile; each int32 packs two 16-column k tiles, bytes l % 4 + (0, 4, 8, 12) of the pair: their high
    nibbles (even columns) in nibbles 0-3, their low nibbles (odd columns) in nibbles 4-7."""
    n, half_k = codes.shape
    t = inner_k_tiles
    v = codes.view(n // 8, 8, half_k // (8 * t), t // 2, 4, 4).long()  # [n/8, lane/4, k/(16t), t/2, byte/4, lane%4]
    nibbles = torch.cat((v >> 4, v & 15), 4)  # [n/8, lane/4, k/(16t), t/2, 8, lane%4]: nibble j of each int32
    pack = sum(nibbles[:, :, :, :, j] << (4 * j) for j in range(8))  # [n/8, lane/4, k/(16t), t/2, lane%4] in [0, 2^32)
    pack = torch.where(pack >= 1 << 31, pack - (1 << 32), pack).to(torch.int32)  # the same bits as int32
    return pack.permute(0, 2, 1, 4, 3).reshape(n // 8, -1, 32, t // 2).contiguous()


def tinygemm_codes(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of `tinygemm_tiles`: int32 [n / 8, k / (16 t), 32, t / 2] -> codes int32 [n, k] (column order)."""
    tiles_n, outer, _, pairs = tiles.shape
    words = tiles.view(tiles_n, outer, 8, 4, pairs).permute(0, 2, 1, 4, 3)  # [n/8, lane/4, k/(16t), t/2, lane%4]
    nibbles = torch.stack([(words >> (4 * j)) & 15 for j in range(8)], -2)  # [n/8, lane/4, k/(16t), t/2, 8, lane%4]
    even_odd = torch.stack((nibbles[..., :4, :], nibbles[..., 4:, :]), -1)  # [..., byte/4, lane%4, 2]: each byte's columns
    return even_odd.reshape(tiles_n * 8, -1)  # [n, k]


class StandInTinygemm(CudaInt4):
    """tinygemm's two CUDA ops on CPU: `convert` writes int4mm.cu's tiles, `matmul` reads them back and multiplies with
    w = (q - 8) * scale + zero, (scale, zero) [k / g, n, 2], through torch's CPU int4 kernel (the same convention)."""

    def convert(self, codes: torch.Tensor) -> torch.Tensor:
        return tinygemm_tiles(codes, self.inner_k_tiles)

    def matmul(self, x: torch.Tensor, tiles: torch.Tensor, scale_zeros: torch.Tensor) -> torch.Tensor:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(tinygemm_codes(tiles), 2)  # [n, k/2] the CPU kernel's
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, scale_zeros)  # [M, n] bf16


class NibblesUnswapped(StandInTinygemm):
    """A layout mistake the load-time check must catch: codes handed over with the portable nibble order."""

    def convert(self, codes: torch.Tensor) -> torch.Tensor:
        return super().convert((codes >> 4) | (codes << 4))


def tiles_as_int4mm_writes_them(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """`matrix_to_m16n8k16_Bint4_layout` (torch's aten/src/ATen/native/cuda/int4mm.cu, NVIDIA path) one lane at a time."""
    n, half_k = codes.shape
    out = torch.zeros(n // 8, 2 * half_k // (16 * inner_k_tiles), 32, inner_k_tiles // 2, dtype=torch.int64)
    for n_tile, k_outer, lane, inner in itertools.product(*map(range, out.shape[:3]), range(0, inner_k_tiles, 2)):
        base = (k_outer * inner_k_tiles + inner) * 8 + lane % 4  # a k tile is 8 bytes
        v = [int(codes[n_tile * 8 + lane // 4, k]) for k in (base, base + 4, base + 8, base + 12)]
        out[n_tile, k_outer, lane, inner // 2] = sum(((b & 0xF) << (16 + 4 * i)) | ((b >> 4) << (4 * i)) for i, b in enumerate(v))
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_the_stand_in_writes_and_reads_tinygemm_tiles_and_multiplies_by_its_convention(inner_k_tiles: int):
    """The stand-in is the op torch documents: int4mm.cu's tiles in the meta registration's shape, read back to the
    codes, and x @ w.T with w = (q - 8) * scale + zero from (scale, zero) [k / g, n, 2]."""
    gen = torch.Generator().manual_seed(inner_k_tiles)
    n, k, group = 16, 256, 32
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)  # [n, k]
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # [n, k/2], even column high, as the op takes them
    tiles = tinygemm_tiles(packed, inner_k_tiles)
    assert tiles.shape == torch.ops.aten._convert_weight_to_int4pack(packed.to("meta"), inner_k_tiles).shape
    assert torch.equal(tiles, tiles_as_int4mm_writes_them(packed, inner_k_tiles))
    assert torch.equal(tinygemm_codes(tiles), codes)
    scale_zeros = torch.stack((torch.rand(k // group, n, generator=gen) + 0.5, torch.randn(k // group, n, generator=gen)), -1).to(torch.bfloat16)
    x = torch.randn(3, k, generator=gen).to(torch.bfloat16)
    scale, zero = scale_zeros.float().repeat_interleave(group, 0).unbind(-1)  # [k, n] each
    want = x.float() @ ((codes.t() - INT4_OFFSET) * scale + zero)  # [3, n]
    got = StandInTinygemm(Int4Format(group), CPU, inner_k_tiles).matmul(x, tiles, scale_zeros)
    assert got.dtype == torch.bfloat16 and got.shape == (3, n)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().mean()))


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
    return LLM(loaded, engine_config(progress=False, expert_cache=16), RunnerOptions(device_indexed=True))  # resident: slots indexed as on CUDA


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
    # through torch's CPU kernel 5e-6 here; codes with their nibbles swapped give 1.5e-3 (random experts add little)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    sampling = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    for llm in (reference, repacked):  # every expert resident, slots gathered by index as on CUDA
        llm.reset_cache(llm.loaded.store.total_experts)
        llm.cache.load_all()
    assert repacked.generate(ids, sampling).token_ids == reference.generate(ids, sampling).token_ids
