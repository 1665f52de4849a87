"""The project's tiled int4 / int8 CPU kernels (experts/native/tiled.cpp): built once into the compiled-code cache, equal
to dequantize-then-matmul on odd shapes and every group size, a token's experts in one call equal to the per-expert loop,
and torch's kernels wherever they cannot run (AVX2, switched off, no compiler)."""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import shared_dir

from mobile_moe import LLM, engine_config
from mobile_moe.bench.synthetic import build_synthetic
from mobile_moe.config import SamplingParams
from mobile_moe.engine.aot import AotLayers
from mobile_moe.experts import native
from mobile_moe.experts.dispatch import tiled_pool_linear
from mobile_moe.experts.formats import Int4Format, Int8Format, unpack_int4
from mobile_moe.experts.kernels import (
    INT8_OFFSET,
    FusedInt4,
    FusedInt8,
    TiledInt4,
    TiledInt8,
    compute_format,
    int4_block_rows,
    layout_format,
    tile_int4,
    tile_int8,
    untile_int4_columns,
    untile_int8_columns,
)
from mobile_moe.experts.store import ExpertLayout, ExpertShape

CPU = torch.device("cpu")
needs_tiled = pytest.mark.skipif(not native.tiled_supported(), reason="the tiled kernels need torch's AVX2 or AVX512 CPU kernels")


@pytest.fixture
def kernel_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The compiled-code cache, shared by this run's workers (the kernel is built once per run)."""
    root = shared_dir(tmp_path_factory, "compiled")
    monkeypatch.setenv(native.CACHE_ENV, str(root))
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    return root


def q8_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [M, in] quantized as the AVX2 path multiplies it (tiled.cpp `activations`): int8 per block of `block` columns,
    d = max|x| / 127, q = round(x * (1 / d)) to nearest even, x^ = q d, in float32."""
    xb = x.float().view(x.shape[0], -1, block)  # [M, blocks, block]
    d = xb.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inverse) * d).view(x.shape)


def multiplied(x: torch.Tensor, block: int) -> torch.Tensor:
    """The activations the kernels multiply here: x itself on AVX512-BF16, else x quantized to int8 (q8_activations)."""
    return x.float() if native.avx512_path() else q8_activations(x, block)


def _tiled(group: int, shapes: list[tuple[int, int]], dtype: torch.dtype = torch.bfloat16) -> TiledInt4:
    fmt = compute_format(Int4Format(group), dtype, CPU, shapes)
    assert isinstance(fmt, TiledInt4), fmt
    return fmt


@needs_tiled
@pytest.mark.usefixtures("kernel_cache")
@pytest.mark.parametrize(("out", "inp", "group"), [(48, 96, 32), (80, 256, 64), (32, 384, 128), (16, 8 * 33, 8)])
def test_the_kernel_equals_dequantize_then_matmul(out: int, inp: int, group: int):
    kernel = _tiled(group, [(out, inp)])
    gen = torch.Generator().manual_seed(out + inp)
    portable = kernel.portable.quantize(torch.randn(out, inp, generator=gen))
    parts = kernel.from_portable(portable, out, inp)
    w = kernel.dequantize(parts, torch.float32).double()  # [out, in]: the kernel's own (scale, zero) pairs, exact in float32
    for rows in (1, 2, 3, 4, 5, 9):  # every register block of rows (4, 3, 2, 1) and their mixes
        x = torch.randn(rows, inp, generator=gen).to(torch.bfloat16)
        want = multiplied(x, 32 if group % 32 == 0 else 8).double() @ w.t()  # [rows, out]
        got = kernel.fused(x, parts)  # float32
        assert got.dtype == torch.float32 and got.shape == (rows, out)
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()  # float32 sums in another order, nothing more


@needs_tiled
@pytest.mark.usefixtures("kernel_cache")
@pytest.mark.parametrize(("out", "inp"), [(48, 96), (32, 260), (16, 4)])
def test_the_int8_kernel_equals_dequantize_then_matmul(out: int, inp: int):
    kernel = compute_format(Int8Format(), torch.bfloat16, CPU, [(out, inp)])
    assert isinstance(kernel, TiledInt8)
    gen = torch.Generator().manual_seed(out + inp)
    portable = kernel.portable.quantize(torch.randn(out, inp, generator=gen))
    parts = kernel.from_portable(portable, out, inp)
    assert torch.equal(untile_int8_columns(tile_int8(portable[0])), (portable[0].view(torch.uint8) ^ INT8_OFFSET).t())
    w = kernel.dequantize(parts, torch.float32)
    torchs = FusedInt8(torch.bfloat16)
    assert torch.equal(w, torchs.dequantize(torchs.from_portable(portable, out, inp), torch.float32))  # the same bf16 scales
    for rows in (1, 2, 3, 4, 5, 9):
        x = torch.randn(rows, inp, generator=gen).to(torch.bfloat16)
        want = multiplied(x, 32 if inp % 32 == 0 else 4).double() @ w.double().t()
        got = kernel.fused(x, parts)
        assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()  # float32 sums of offset codes over a whole row


@needs_tiled
@pytest.mark.usefixtures("kernel_cache")
def test_the_tiled_layout_holds_the_same_codes_and_dequantizes_like_torchs():
    out, inp, group = 64, 128, 32
    portable = Int4Format(group).quantize(torch.randn(out, inp, generator=torch.Generator().manual_seed(1)))
    codes = unpack_int4(portable[0])  # [out, in]
    tiled = tile_int4(codes)
    assert tiled.shape == (out, inp // 2) and tiled.dtype == torch.uint8  # the portable layout's bytes, reordered
    assert torch.equal(untile_int4_columns(tiled), codes.t())
    ours, torchs = _tiled(group, [(out, inp)]), FusedInt4(Int4Format(group), torch.bfloat16, int4_block_rows(out, inp) or 64)
    want = torchs.dequantize(torchs.from_portable(portable, out, inp), torch.float32)
    assert torch.equal(ours.dequantize(ours.from_portable(portable, out, inp), torch.float32), want)
    assert ours.dequant_bytes(out, inp, torch.bfloat16) == 0  # prompts run on the codes too: no float copy to plan for


@needs_tiled
@pytest.mark.usefixtures("kernel_cache")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_tokens_experts_in_one_call_equal_the_per_expert_calls(dtype: torch.dtype, bits: int):
    shape = ExpertShape(hidden=128, intermediate=64)
    portable = Int4Format(32) if bits == 4 else Int8Format()
    kernel = compute_format(portable, dtype, CPU, [shape.matrix_shape("gate_up"), shape.matrix_shape("down")])
    assert isinstance(kernel, TiledInt4 | TiledInt8)
    layout = ExpertLayout(shape, kernel)
    gen = torch.Generator().manual_seed(2)
    slots = 6
    block = torch.empty(slots, layout.nbytes, dtype=torch.uint8)  # the cache's pool: one buffer per slot, fields are strided views
    views = layout.views(block)
    for s in range(slots):
        for matrix, fields in views.items():
            out, inp = shape.matrix_shape(matrix)
            for field, part in zip(fields, kernel.from_portable(kernel.portable.quantize(torch.randn(out, inp, generator=gen)), out, inp), strict=True):
                field[s].copy_(part)
    chosen = torch.tensor([4, 0, 5])
    x = torch.randn(1, 128, generator=gen).to(dtype)
    got = tiled_pool_linear(x, *views["gate_up"], chosen).to(dtype)  # [3, 128]: one row shared by every expert
    want = torch.cat([kernel.linear(x, [f[s] for f in views["gate_up"]], dtype) for s in chosen.tolist()])
    assert torch.equal(got, want)
    rows = torch.randn(3, 64, generator=gen).to(dtype)
    got = tiled_pool_linear(rows, *views["down"], chosen).to(dtype)  # row i for expert i
    want = torch.cat([kernel.linear(rows[i : i + 1], [f[s] for f in views["down"]], dtype) for i, s in enumerate(chosen.tolist())])
    assert torch.equal(got, want)


def _synthetic(native_on: bool, dtype: str, bits: int, monkeypatch: pytest.MonkeyPatch, compile: bool | None = None) -> LLM:
    """A small OLMoE-shaped model (widths / 16), int4 or int8 experts and dense weights, every expert resident."""
    monkeypatch.setenv(native.NATIVE_ENV, "on" if native_on else "off")
    name, group = f"int{bits}", 32 if bits == 4 else None
    loaded = build_synthetic("olmoe-1b-7b", CPU, dtype, shrink=16, expert_dtype=name, group_size=group, dense_dtype=name, layers=3)
    llm = LLM(loaded, engine_config(progress=False, expert_cache=loaded.store.total_experts, compile=compile))
    llm.cache.load_all()
    return llm


@needs_tiled
@pytest.mark.usefixtures("kernel_cache")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_model_on_the_tiled_kernels_matches_torchs_kernels(dtype: str, bits: int, monkeypatch: pytest.MonkeyPatch):
    ours, torchs = _synthetic(True, dtype, bits, monkeypatch), _synthetic(False, dtype, bits, monkeypatch)
    tiled = f"int{bits}:int{bits}_tiles_mm"
    assert ours.loaded.store.format.layout_id == tiled and tiled in ours.loaded.dense_path
    assert torchs.loaded.store.format.layout_id.startswith(f"int{bits}:_weight_int{bits}pack_mm")
    assert ours.runner.executor.path(resident=True) == f"tiled-int{bits}-experts"
    assert ours.runner.executor.path(resident=False) == f"tiled-int{bits}" and torchs.runner.executor.path(resident=False) == f"cpu-int{bits}"
    ids = list(range(3, 40))
    for rows in (ids, ids[:1]):  # a prompt (a GEMM on the codes) and a decode row
        want, got = torchs.logits(rows).float(), ours.logits(rows).float()
        assert (got - want).abs().max() < 2e-2 * want.abs().max()


@needs_tiled
@pytest.mark.usefixtures("kernel_cache")
def test_a_tiled_model_decodes_through_the_compiled_layer_as_eagerly(monkeypatch: pytest.MonkeyPatch):
    compiled, eager = _synthetic(True, "float32", 4, monkeypatch), _synthetic(True, "float32", 4, monkeypatch, compile=False)
    assert isinstance(compiled.runner.resident_layer, AotLayers) and eager.runner.resident_layer is None  # by default: compiled
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    got, want = compiled.generate([3, 4, 5], sampling), eager.generate([3, 4, 5], sampling)
    loaders = list(compiled.runner.resident_layer.loaders.values())
    assert loaders and None not in loaders  # the tiled experts call and the fused quantized q/k/v were compiled, not skipped
    assert got.token_ids == want.token_ids


@pytest.mark.usefixtures("kernel_cache")
def test_torchs_kernels_run_where_the_tiled_ones_cannot(monkeypatch: pytest.MonkeyPatch):
    shapes = [(64, 128)]
    monkeypatch.setenv(native.NATIVE_ENV, "off")
    assert isinstance(compute_format(Int4Format(32), torch.bfloat16, CPU, shapes), FusedInt4)
    monkeypatch.delenv(native.NATIVE_ENV)
    assert isinstance(compute_format(Int4Format(32), torch.float16, CPU, shapes), FusedInt4)  # fp16 activations: torch's
    assert not isinstance(compute_format(Int4Format(32), torch.bfloat16, CPU, [(40, 128)]), TiledInt4)  # rows not in tiles of 16
    script = (
        "import torch; from mobile_moe.experts.formats import Int4Format; from mobile_moe.experts.kernels import compute_format;"
        "print(type(compute_format(Int4Format(32), torch.bfloat16, torch.device('cpu'), [(64, 128)])).__name__)"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert run.stdout.strip() != "TiledInt4"  # torch's kernels without AVX2 (or the reference path): the tiled ones are not chosen


AVX2_CHECK = """
import torch
from mobile_moe.experts.formats import Int4Format, Int8Format
from mobile_moe.experts.kernels import TiledInt4, TiledInt8, compute_format
gen = torch.Generator().manual_seed(3)
cases = ((Int4Format(32), 48, 96, 32), (Int4Format(64), 32, 384, 32), (Int4Format(8), 16, 8 * 33, 8), (Int8Format(), 48, 100, 4), (Int8Format(), 32, 256, 32))
for fmt, out, inp, block in cases:
    kernel = compute_format(fmt, torch.bfloat16, torch.device("cpu"), [(out, inp)])
    assert isinstance(kernel, TiledInt4 | TiledInt8), kernel
    parts = kernel.from_portable(fmt.quantize(torch.randn(out, inp, generator=gen)), out, inp)
    w = kernel.dequantize(parts, torch.float32).double()
    for rows in (1, 2, 3, 70):  # 70: a prompt chunk runs on the codes too
        x = torch.randn(rows, inp, generator=gen).to(torch.bfloat16)
        xq = q8_activations(x, block)
        want, got = xq.double() @ w.t(), kernel.fused(x, parts).double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # exactly w times the quantized activations
        bound = (x.double() - xq.double()).abs() @ w.abs().t()  # what quantizing the activations may cost, at most
        assert ((got - x.double() @ w.t()).abs() <= bound + 1e-5 * want.abs().max()).all()
    assert kernel.dequant_bytes(out, inp, torch.float32) == 0
print("ok", torch.backends.cpu.get_cpu_capability())
"""


@needs_tiled
def test_the_avx2_kernels_equal_dequantize_then_matmul_on_int8_activations(kernel_cache: Path):
    """Under ATEN_CPU_CAPABILITY=avx2 the library takes its AVX2 path: activations quantized to int8 per 32 columns."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", native.CACHE_ENV: str(kernel_cache)}
    script = "import torch\n" + textwrap.dedent(inspect.getsource(q8_activations)) + AVX2_CHECK
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False)
    assert run.stdout.split() == ["ok", "AVX2"], run.stderr[-2000:]


def test_a_kernel_that_cannot_be_built_leaves_torchs_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    broken = tmp_path / "tiled.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    project_log = logging.getLogger("mobile_moe")  # on the project's logger itself: it does not propagate once the CLI has set it up
    project_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="mobile_moe"):
            assert native.build_and_load() is False
    finally:
        project_log.removeHandler(caplog.handler)
    assert len({id(r) for r in caplog.records if "could not be built" in r.getMessage()}) == 1  # one record, seen twice where it propagates
    monkeypatch.setenv(native.CACHE_ENV, "off")
    assert native.build_and_load() is False  # nothing is compiled when the cache is off


@needs_tiled
def test_a_store_packed_for_the_tiled_kernel_is_refused_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(native.NATIVE_ENV, "off")
    with pytest.raises(Exception, match="tiled CPU kernels"):
        layout_format("int4:int4_tiles_mm", 32, torch.bfloat16)
