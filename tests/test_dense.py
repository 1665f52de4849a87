"""Dense weights in int8 / int4 (`--dense-dtype`): the kernels per matrix, the models on every architecture, the
checkpoint `quantize --dense-dtype` writes and the memory plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import ARCHITECTURES
from test_cli import assert_one_line_error, run
from torch import nn

from mobile_moe import LLM, engine_config
from mobile_moe.bench.synthetic import synthetic_config
from mobile_moe.config import SamplingParams
from mobile_moe.errors import InvalidParameter
from mobile_moe.layers.qlinear import QuantLinear
from mobile_moe.loading.budget import plan_for_config
from mobile_moe.loading.checkpoint import read_config
from mobile_moe.loading.dense import DenseChoice, dense_formats, pack_dense, quantized_modules, replace_linears
from mobile_moe.loading.loader import dense_bytes

PROMPT = [3, 17, 29, 41, 8, 5, 60, 12]
GROUP = 32  # the tiny checkpoints are 32 wide: int4 groups of 32
# Shapes around the kernels' limits: int4 needs rows % 16 (80, 48: not a multiple of its 64-row packing block) and the
# input a multiple of the group; int8 takes any rows (37, 1) and inputs in steps of 16.
KERNEL_CASES = [("int4", 80, 384, 32), ("int4", 48, 384, 64), ("int4", 208, 384, 128), ("int8", 37, 384, 0), ("int8", 1, 96, 0), ("int8", 80, 384, 0)]
KERNEL_TOLERANCE = 1e-2  # of the output's largest magnitude: the kernels take bf16 activations and round their output to bf16


def kernel_errors() -> list[tuple[str, str, float]]:
    """(case, dense path, max error / max |reference|) of each kernel case: x [5, in] through a packed QuantLinear against
    x @ dequantize(w).T in float32 (the reference path's matrix)."""
    gen = torch.Generator().manual_seed(0)
    found = []
    for name, out, inp, group in KERNEL_CASES:
        model = nn.Sequential(nn.Linear(inp, out, bias=True))
        with torch.no_grad():
            model[0].weight.normal_(generator=gen)
            model[0].bias.normal_(generator=gen)
        formats = dense_formats(model, DenseChoice(name, group or 64))
        replace_linears(model, formats, quantize=True)
        q = model[0]
        reference = q.fmt.dequantize(q.parts, torch.float32)  # [out, in], the portable fields before repacking
        path = pack_dense(model, torch.bfloat16, torch.device("cpu"))
        x = torch.randn(5, inp, generator=gen).bfloat16()
        want = x.float() @ reference.t() + q.bias.float()  # [5, out]
        got = model(x).float()
        found.append((f"{name} {out}x{inp} g{group}", path, float((got - want).abs().max() / want.abs().max())))
    return found


def test_each_dense_kernel_equals_dequantize_then_matmul():
    """On this CPU's features: each case runs through its fused kernel (the path names it) within the tolerance."""
    for case, path, error in kernel_errors():
        kernel = "_weight_int4pack_mm_for_cpu" if case.startswith("int4") else "_weight_int8pack_mm"
        assert path.removesuffix(":b32") == f"1 {case[:4]}:{kernel}", (case, path)  # b32: torch's int4 blocks under AVX2
        assert error < KERNEL_TOLERANCE, (case, error)


def test_each_dense_kernel_equals_dequantize_then_matmul_under_avx2():
    """The same cases with torch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, set before torch starts: a subprocess)."""
    script = "import sys; sys.path[:0] = sys.argv[1:]\nfrom test_dense import kernel_errors\nfor c, p, e in kernel_errors(): print(c, p, e, sep='|')"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    tests = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", script, tests, str(Path(tests).parent)], env=env, capture_output=True, text=True, check=True, timeout=300)
    rows = [line.split("|") for line in done.stdout.splitlines()]
    assert len(rows) == len(KERNEL_CASES)
    for case, path, error in rows:
        assert ":_weight_int" in path and float(error) < KERNEL_TOLERANCE, (case, path, error)


def dequantized_dense(path: Path, name: str) -> LLM:
    """The float32 model with every linear `name` quantizes replaced by its quantize-then-dequantize weights."""
    llm = LLM(path, engine_config(progress=False, dtype="float32", expert_cache=6))
    model = llm.loaded.model
    with torch.no_grad():
        for module, fmt in dense_formats(model, DenseChoice(name, GROUP)).items():
            w = model.get_submodule(module).weight
            w.copy_(fmt.dequantize(fmt.quantize(w), torch.float32))
    return llm


LOGIT_BOUND = 1e-4  # the reference path (dequantize, then matmul in float32) against the dequantized float32 model
WRONG_SCALE_GAP = 0.1  # every scale 10% off moves some logit at least this much on every architecture


def dense_llm(path: Path, name: str, fused: bool) -> LLM:
    """The model with dense weights in `name` (int4: groups of GROUP), through the kernels or the reference path."""
    group = GROUP if name == "int4" else None
    return LLM(path, engine_config(progress=False, dtype="float32", expert_cache=6, dense_dtype=name, group_size=group, fused_kernels=fused))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_dense_quantized_models_match_their_dequantized_float_model(checkpoints, arch, name):
    """Every architecture: dense int8 / int4 computes what the float model computes with its dense weights quantized and
    dequantized (same experts): logits within LOGIT_BOUND and the same greedy tokens; every scale 10% off is caught."""
    quantized, reference = dense_llm(checkpoints[arch], name, fused=False), dequantized_dense(checkpoints[arch], name)
    assert quantized.loaded.dense_path.startswith(f"{len(quantized_modules(quantized.loaded.model))} {name}:reference") or "int8:reference" in (
        quantized.loaded.dense_path
    )
    want = reference.logits(PROMPT)
    torch.testing.assert_close(quantized.logits(PROMPT), want, rtol=0, atol=LOGIT_BOUND)
    assert quantized.generate(PROMPT, greedy()).token_ids == reference.generate(PROMPT, greedy()).token_ids
    for m in quantized_modules(quantized.loaded.model):
        m.parts[1].mul_(1.1)  # int8: scales [out]; int4: scales [out, G]
    assert (quantized.logits(PROMPT) - want).abs().max() > WRONG_SCALE_GAP


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_every_dense_matrix_of_every_architecture_through_its_kernel_equals_the_reference(checkpoints, arch, name):
    """Every quantized linear of the loaded model (fused q/k/v and gate/up, heads, shared gates) through its kernel against
    dequantize-then-matmul, within KERNEL_TOLERANCE. (Whole-model logits through the kernels are not compared with a bound:
    on these tiny random models a bf16-rounded activation flips a top-k choice now and then, a jump of any size.)"""
    llm = dense_llm(checkpoints[arch], name, fused=True)
    gen = torch.Generator().manual_seed(0)
    for m in quantized_modules(llm.loaded.model):
        assert ":_weight_int" in m.fmt.layout_id, m
        x = torch.randn(3, m.in_features, generator=gen)
        want = x.bfloat16().float() @ m.fmt.dequantize(m.parts, torch.float32).t() + (0 if m.bias is None else m.bias)  # [3, out]
        assert (m(x) - want).abs().max() <= KERNEL_TOLERANCE * want.abs().max(), m


def test_dense_int4_falls_back_per_matrix_and_leaves_routers_norms_and_embeddings_alone(checkpoints):
    llm = LLM(checkpoints["qwen2_moe"], engine_config(progress=False, dtype="bfloat16", expert_cache=6, dense_dtype="int4", group_size=GROUP))
    model = llm.loaded.model
    gate = model.model.layers[0].mlp.shared_expert_gate  # one row: int4 needs rows % 16, so int8
    assert isinstance(gate, QuantLinear) and gate.fmt.name == "int8"
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt.name == "int4"
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    floats = {n: m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert floats == {"model.layers.1.mlp.down_proj": 40, "model.layers.0.mlp.shared_expert.down_proj": 24, "model.layers.2.mlp.shared_expert.down_proj": 24}
    # inputs 40 and 24 wide fit neither kernel (int8 reads steps of 16): those stay bf16
    attn = model.model.layers[0].self_attn
    assert attn.qkv is not None and attn.qkv.quantized is not None and attn.q_proj.rows is not None  # q/k/v fused after quantizing
    assert torch.allclose(attn.q_proj(torch.ones(1, 32, dtype=torch.bfloat16)), attn.qkv(torch.ones(1, 32, dtype=torch.bfloat16))[0])
    assert llm.generate(PROMPT, greedy()).stats.dense_path == llm.loaded.dense_path


def greedy() -> SamplingParams:
    """Greedy sampling, a few tokens."""
    return SamplingParams(max_new_tokens=4, temperature=0.0)


def test_quantize_dense_writes_packed_linears_that_load_like_quantizing_at_load(checkpoints, tmp_path, capsys):
    out = tmp_path / "olmoe-dense-int4"
    args = ("quantize", "--model", str(checkpoints["olmoe"]), "--to", "int8", "--dense-dtype", "int4", "--group-size", str(GROUP), "--out", str(out), "--quiet")
    code, printed, _ = run(capsys, *args)
    assert code == 0 and "dense linears (int4)" in printed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dense_format"] == "int4" and qc["dense_group_size"] == GROUP and qc["expert_format"] == "int8"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.qweight" in index and "model.layers.0.self_attn.q_proj.zeros" in index and "model.layers.0.self_attn.q_proj.weight" not in index
    loaded = LLM(out, engine_config(progress=False, dtype="bfloat16", expert_cache=6))
    on_the_fly = LLM(
        checkpoints["olmoe"], engine_config(progress=False, dtype="bfloat16", expert_cache=6, expert_dtype="int8", dense_dtype="int4", group_size=GROUP)
    )
    assert loaded.loaded.dense == DenseChoice("int4", GROUP, "int4: as the checkpoint stores it")
    assert torch.equal(loaded.logits(PROMPT), on_the_fly.logits(PROMPT))
    with pytest.raises(InvalidParameter, match="stores int4 dense weights"):
        LLM(out, engine_config(progress=False, dtype="bfloat16", expert_cache=6, dense_dtype="int8"))


def test_the_memory_plan_counts_the_smaller_dense_part_and_gives_it_to_expert_slots(checkpoints):
    """OLMoE-1B-7B's shapes on meta, bf16 experts, an 8 GB budget: the dense part int8 / int4 frees room for more experts,
    less a prompt chunk's dequantized copy of the largest quantized matrix."""
    cfg = synthetic_config("olmoe-1b-7b", 1, None)
    plans = {
        d: plan_for_config(cfg, engine_config(device="cuda", dtype="bfloat16", gpu_memory=8, expert_dtype="bf16", dense_dtype=d))
        for d in ("bf16", "int8", "int4")
    }
    assert plans["bf16"].dense_bytes > plans["int8"].dense_bytes > plans["int4"].dense_bytes
    assert plans["bf16"].slots < plans["int8"].slots < plans["int4"].slots
    for d in ("int8", "int4"):
        freed = plans["bf16"].dense_bytes - plans[d].dense_bytes - (plans[d].scratch_bytes - plans["bf16"].scratch_bytes)
        assert plans[d].slots - plans["bf16"].slots in (freed // plans[d].expert_bytes, freed // plans[d].expert_bytes + 1)
    tiny = plan_for_config(read_config(checkpoints["olmoe"]), engine_config(dtype="bfloat16", gpu_memory=1, dense_dtype="int4", group_size=GROUP))
    loaded = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="bfloat16", expert_cache=6, dense_dtype="int4", group_size=GROUP))
    assert dense_bytes(loaded.loaded.model) == tiny.dense_bytes  # the plan on meta counts the packed part that loads


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--dense-dtype", "int3"], "invalid choice: 'int3'"), (["--dtype", "float32", "--dense-dtype", "bf16"], "--dense-dtype bf16 keeps dense weights")],
)
def test_bad_dense_flags_are_one_line_and_status_2(capsys, checkpoints, flags, needle):
    argv = ("generate", "--model", str(checkpoints["olmoe"]), "--prompt-ids", "3,4", "--max-new-tokens", "1", "--quiet", *flags)
    try:
        code, _, err = run(capsys, *argv)
    except SystemExit as exited:  # argparse's own refusal
        code, err = exited.code, capsys.readouterr().err
    assert_one_line_error(code, err, needle)
