"""Fused weight-only expert kernels against the dequantize-then-matmul reference, the store's one-time repack, and the
all-resident decode step (no host read per MoE layer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import open_llm

from mobile_moe import LLM, engine_config
from mobile_moe.bench.synthetic import build_synthetic
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.experts.formats import Int4Format, Int8Format, Mxfp4Format
from mobile_moe.experts.kernels import INT4_OFFSET, FusedInt4, FusedInt8, compute_format, int4_block_rows, layout_format, unpack_kernel_int4

CPU = torch.device("cpu")
# bf16 rounds every (scale, zero) and activation once: 1e-2 of the output's norm; fp16 keeps 10 mantissa bits
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
SHAPES = [(96, 64), (32, 128), (160, 64), (128, 256)]  # row tails under, at and over the kernel's 32- or 64-row blocks
GREEDY = SamplingParams(max_new_tokens=6, stop_at_eos=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fused(fmt_name: str, dtype: torch.dtype, group: int):
    return FusedInt8(dtype) if fmt_name == "int8" else FusedInt4(Int4Format(group), dtype, int4_block_rows(64, 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt_name,group", [("int8", 0), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("out,inp", SHAPES)
def test_fused_kernel_matches_the_portable_reference(fmt_name: str, group: int, dtype: torch.dtype, out: int, inp: int):
    fused = _fused(fmt_name, dtype, group)
    w = 0.02 * torch.randn(out, inp, generator=torch.Generator().manual_seed(out + inp))
    portable = fused.portable.quantize(w)
    want_w = fused.portable.dequantize(portable, torch.float32)  # [out, in], what the reference path multiplies by
    kernel = fused.from_portable(portable, out, inp)
    assert _rel(fused.dequantize(kernel, torch.float32), want_w) < TOLERANCE[dtype]  # the kernel layout's own reference path
    for rows in (1, fused.max_rows, fused.max_rows + 1):  # the kernel, and the dequantized matmul above its crossover
        x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows)).to(dtype)
        got = fused.linear(x, kernel, dtype)
        assert got.shape == (rows, out) and got.dtype == dtype
        assert _rel(got, x.float() @ want_w.T) < TOLERANCE[dtype]


def test_int4_kernel_layout_unpacks_exactly():
    block = int4_block_rows(64, 64)
    assert block in (32, 64)  # the running torch packs in one of the known layouts (a new one would leave int4 unfused)
    for out in (64, 96, 128, 32, 80):
        codes = torch.randint(0, 16, (out, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(out))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        assert torch.equal(unpack_kernel_int4(packed, out, 64, block).int(), codes)
        assert int4_block_rows(out, 64) == block


ODD_SHAPES = [(80, 384), (48, 256), (208, 128), (16, 512)]  # row tails off the 32- and 64-row blocks, and a matrix of no full block
DEQUANT_EXACT = 1e-6  # the prompt path's dequantization against the row-major unpacking, both in float32: rounding only


def prompt_path_errors() -> list[tuple[str, float, float]]:
    """(case, weight error, output error) of the int4 kernel layout's prompt path (dequantize, then one matmul) on odd
    shapes and groups 32 / 64 / 128, in this process's CPU feature set: the weights against the same layout unpacked row
    by row (`unpack_kernel_int4`, then (q - 8) * scale + zero), relative to their largest; the output of `linear` above
    `max_rows` against x @ that matrix.T."""
    found = []
    for group in (32, 64, 128):
        for out, inp in ODD_SHAPES:
            if inp % group:
                continue
            gen = torch.Generator().manual_seed(out * inp + group)
            fused = FusedInt4(Int4Format(group), torch.bfloat16, int4_block_rows(out, inp))
            kernel = fused.quantize(torch.randn(out, inp, generator=gen))
            packed, sz = kernel
            codes = unpack_kernel_int4(packed, out, inp, fused.block).float().view(out, -1, group)  # [out, G, g]
            scale, zero = sz.float().transpose(0, 1).unbind(-1)  # [out, G]
            want = ((codes - INT4_OFFSET) * scale[..., None] + zero[..., None]).view(out, inp)
            got = fused.dequantize(kernel, torch.float32)
            x = torch.randn(fused.max_rows + 3, inp, generator=gen).bfloat16()
            y = fused.linear(x, kernel, torch.bfloat16).float()
            y_want = x.float() @ want.t()
            found.append((f"int4 g{group} {out}x{inp} block {fused.block}", float((got - want).abs().max() / want.abs().max()), _rel(y, y_want)))
    return found


def test_int4_prompt_path_equals_the_layout_unpacked_row_by_row():
    for case, weights, output in prompt_path_errors():
        assert weights < DEQUANT_EXACT and output < TOLERANCE[torch.bfloat16], (case, weights, output)


def test_int4_prompt_path_under_avx2():
    """The same under torch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, set before torch starts: a subprocess), whose
    int4 packing interleaves rows in blocks of 32 where AVX512's does in 64."""
    script = (
        "import sys; sys.path[:0] = sys.argv[1:]\nfrom test_kernels import prompt_path_errors\nfor c, w, y in prompt_path_errors(): print(c, w, y, sep='|')"
    )
    tests = str(Path(__file__).parent)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", script, tests, str(Path(tests).parent)], env=env, capture_output=True, text=True, check=True, timeout=300)
    rows = [line.split("|") for line in done.stdout.splitlines()]
    assert len(rows) == len(prompt_path_errors()) and all("block 32" in case for case, _, _ in rows)
    for case, weights, output in rows:
        assert float(weights) < DEQUANT_EXACT and float(output) < TOLERANCE[torch.bfloat16], (case, weights, output)


def test_kernel_layouts_only_where_a_kernel_runs():
    shapes = [(64, 64), (64, 32)]
    assert isinstance(compute_format(Int8Format(), torch.bfloat16, CPU, shapes), FusedInt8)
    assert isinstance(compute_format(Int4Format(32), torch.bfloat16, CPU, shapes), FusedInt4)
    assert compute_format(Int8Format(), torch.float32, CPU, shapes).dtype == torch.bfloat16  # float32 compute: bf16 activations
    assert compute_format(Int4Format(16), torch.bfloat16, CPU, shapes) is None  # the kernel takes groups of 32..256
    assert compute_format(Int4Format(64), torch.bfloat16, CPU, shapes) is None  # 64 does not divide down's input 32
    assert compute_format(Mxfp4Format(), torch.bfloat16, CPU, shapes) is None
    assert compute_format(Int8Format(), torch.bfloat16, torch.device("cuda"), shapes) is None  # pending a GPU run


def test_layout_ids_rebuild_their_formats():
    for fmt in (
        FusedInt8(torch.bfloat16),
        FusedInt4(Int4Format(64), torch.bfloat16),
        FusedInt4(Int4Format(32), torch.bfloat16, 32),
        Int4Format(32),
        Int8Format(),
        Mxfp4Format(),
    ):
        again = layout_format(fmt.layout_id, getattr(fmt, "group_size", 0), torch.bfloat16)
        assert type(again) is type(fmt) and getattr(again, "group_size", None) == getattr(fmt, "group_size", None)
        assert getattr(again, "block", None) == getattr(fmt, "block", None) and again.layout_id == fmt.layout_id
    assert FusedInt4(Int4Format(64), torch.bfloat16, 32).layout_id != FusedInt4(Int4Format(64), torch.bfloat16, 64).layout_id


def _synthetic(fused: bool, expert_dtype: str, dtype: str = "bfloat16") -> LLM:
    """A small OLMoE-shaped model (widths / 16: hidden 128, experts 64 wide); every width suits both kernels."""
    loaded = build_synthetic(
        "olmoe-1b-7b", CPU, dtype, shrink=16, expert_dtype=expert_dtype, group_size=32 if expert_dtype == "int4" else None, fused_kernels=fused
    )
    return LLM(loaded, engine_config(progress=False, expert_cache=16))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # float32 compute: the kernels on bf16 activations
@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
def test_repacked_store_runs_the_fused_kernels_and_matches_the_reference_model(expert_dtype: str, dtype: str):
    fused, reference = _synthetic(True, expert_dtype, dtype), _synthetic(False, expert_dtype, dtype)
    assert "fused" in repr(fused.loaded.store.format) and "fused" not in repr(reference.loaded.store.format)
    assert fused.loaded.store.expert_bytes == reference.loaded.store.expert_bytes  # the same bytes cross the link
    ids = list(range(3, 40))
    for rows in (ids, ids[:1]):  # a prompt (dequantized above the crossover) and a decode row (the kernel)
        want, got = reference.logits(rows), fused.logits(rows)
        assert _rel(got, want) < 2e-2


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
@pytest.mark.parametrize("policy", ["big", "mobile"])
def test_all_resident_decode_reads_the_host_at_most_twice_per_token(checkpoints, arch: str, policy: str):
    resident = open_llm(checkpoints[arch])  # on the CPU every expert, in the store's own memory
    small = open_llm(checkpoints[arch], expert_cache=resident.loaded.store.total_experts - 1)  # one short: offloaded
    resident.cache.load_all()
    config = PolicyConfig(policy, tau=0.9 if policy == "mobile" else None, criterion="max_prob" if policy == "mobile" else None)
    got, want = resident.generate([5, 6, 7, 8], GREEDY, config), small.generate([5, 6, 7, 8], GREEDY, config)
    assert got.token_ids == want.token_ids  # float32: the resident op computes exactly what the per-layer path does
    decode_steps = len(got.token_ids) - 1
    assert got.stats.decode_host_syncs <= 2 * decode_steps
    assert want.stats.decode_host_syncs > 2 * decode_steps  # the offloaded path reads each MoE layer's choice
    if policy == "mobile":
        assert got.stats.fallback_tokens == want.stats.fallback_tokens > 0


def test_int8_experts_use_the_kernel_only_for_input_widths_it_computes_right(checkpoints):
    """torch's CPU int8 kernel reads its input in steps of 16: at width 24 it returns inf/NaN (or crashes on a view).
    Mixtral's test experts have down matrices of input width 24: int8 then takes the reference path, and stays close to
    the float model."""
    assert compute_format(Int8Format(), torch.bfloat16, CPU, [(48, 32), (32, 24)]) is None
    assert isinstance(compute_format(Int8Format(), torch.bfloat16, CPU, [(48, 32), (32, 16)]), FusedInt8)
    ids = [5, 6, 7, 8]
    want = LLM(checkpoints["mixtral"], engine_config(progress=False, dtype="bfloat16")).logits(ids).float()
    llm = LLM(checkpoints["mixtral"], engine_config(progress=False, dtype="bfloat16", expert_dtype="int8"))
    got = llm.logits(ids).float()
    assert llm.loaded.store.format.layout_id == "int8"  # unfused
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.1 * want.abs().max()
