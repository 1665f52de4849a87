"""Packed expert formats (int8 per channel, int4 group-wise): exact packing, the dequantization formula,
quantized models against the same model run with dequantized float experts, `quantize`, bytes moved, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import ARCHITECTURES
from test_cli import assert_one_line_error, gen, run

from mobile_moe import LLM, engine_config
from mobile_moe.cli import main
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.engine.runner import RunnerOptions
from mobile_moe.errors import InvalidParameter
from mobile_moe.experts.formats import FloatFormat, Int4Format, Int8Format, make_format, pack_int4, unpack_int4
from mobile_moe.experts.store import ExpertLayout, ExpertShape, ExpertStore
from mobile_moe.loading.quantize import quantize_checkpoint

GROUP = 8  # divides every test model's hidden (32) and expert widths (16, 24)
GREEDY = SamplingParams(max_new_tokens=8, stop_at_eos=False)
PROMPT = [5, 6, 7, 8, 9]


def test_int4_codes_pack_two_per_byte_and_unpack_exactly():
    codes = torch.randint(0, 16, (5, 3, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.shape == (5, 3, 6) and packed.dtype == torch.uint8
    assert torch.equal(packed[..., 0], codes[..., 0] | (codes[..., 1] << 4))  # even column in the low nibble
    assert torch.equal(unpack_int4(packed), codes)


def test_int4_dequantizes_by_the_group_formula():
    fmt = Int4Format(group_size=4)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3, 8), dtype=torch.uint8, generator=gen)
    scale = torch.rand(3, 2, generator=gen).half()
    zero = (15 * torch.rand(3, 2, generator=gen)).half()
    got = fmt.dequantize([pack_int4(codes), scale, zero], torch.float32)
    for r in range(3):
        for c in range(8):
            want = (float(codes[r, c]) - float(zero[r, c // 4])) * float(scale[r, c // 4])
            assert got[r, c].item() == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_int4_quantization_error_is_within_half_a_step():
    fmt = Int4Format(group_size=8)
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    packed, scale, zero = fmt.quantize(w)
    err = (fmt.dequantize([packed, scale, zero], torch.float32) - w).abs().view(6, 4, 8)
    assert torch.all(err <= 0.5 * scale.float()[..., None] + 2e-3)  # + float16 rounding of scale and zero


def test_int8_is_symmetric_per_output_channel():
    fmt = Int8Format()
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))
    q, scale = fmt.quantize(w)
    assert q.dtype == torch.int8 and scale.shape == (4,)
    assert torch.equal(q.abs().amax(-1), torch.full((4,), 127, dtype=torch.int8))  # each row's largest weight maps to +-127
    torch.testing.assert_close(fmt.dequantize([q, scale], torch.float32), q.float() * scale[:, None], rtol=0, atol=0)
    assert torch.all((fmt.dequantize([q, scale], torch.float32) - w).abs() <= 0.5 * scale[:, None] + 1e-7)


def test_store_keeps_each_expert_as_one_packed_buffer_that_round_trips():
    shape = ExpertShape(hidden=16, intermediate=8)
    fmt = Int4Format(group_size=8)
    store = ExpertStore([0, 1], 3, shape, fmt, pin=False)
    gen = torch.Generator().manual_seed(4)
    weights = {(layer, e, p): torch.randn(*shape.part_shape(p), generator=gen) for layer in (0, 1) for e in range(3) for p in ("gate", "up", "down")}
    for (layer, e, p), w in weights.items():
        store.put(layer, e, p, w)
    assert store.missing() == []
    # packed bytes: per matrix, codes (out * in / 2) + float16 scale and zero per group, each field 16-byte aligned
    align = lambda n: (n + 15) // 16 * 16  # noqa: E731
    per_matrix = lambda out, inp: align(out * inp // 2) + 2 * align(out * (inp // 8) * 2)  # noqa: E731
    assert store.expert_bytes == per_matrix(16, 16) + per_matrix(16, 8)
    assert store.buffer(1, 2).shape == (store.expert_bytes,)
    for layer in (0, 1):
        for e in range(3):
            gate_up = fmt.dequantize([f[e] for f in store.fields[layer]["gate_up"]], torch.float32)
            down = fmt.dequantize([f[e] for f in store.fields[layer]["down"]], torch.float32)
            want_gate_up = torch.cat([fmt.dequantize(fmt.quantize(weights[layer, e, p]), torch.float32) for p in ("gate", "up")])
            assert torch.equal(gate_up, want_gate_up)
            assert torch.equal(down, fmt.dequantize(fmt.quantize(weights[layer, e, "down"]), torch.float32))


def test_int4_rejects_a_group_that_does_not_divide_the_input_dim():
    with pytest.raises(InvalidParameter, match="group size 12 does not divide the input dim 16 of the down projection"):
        ExpertLayout(ExpertShape(hidden=24, intermediate=16), Int4Format(group_size=12))
    with pytest.raises(InvalidParameter, match="even number"):
        Int4Format(group_size=5)
    with pytest.raises(InvalidParameter, match="int4 experts only"):
        make_format("int8", torch.float32, group_size=32)


def dequantized_reference(path: Path, fmt) -> LLM:
    """The float32 model with every routed expert replaced by its quantize-then-dequantize weights."""
    llm = LLM(path, engine_config(progress=False, expert_cache=6))
    store = llm.loaded.store
    for layer in store.layers:
        for matrix in ("gate_up", "down"):
            w = store.fields[layer][matrix][0]  # [E, out, in]
            w.copy_(fmt.dequantize(fmt.quantize(w), torch.float32))
    return llm


def bias_bytes(store: ExpertStore) -> int:
    """Bytes of an expert's packed bias fields (gpt-oss; float32 beside quantized weights)."""
    return sum(f.nbytes for placed in store.layout.fields.values() for f, _ in placed if f.name == "bias")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_model_matches_the_model_with_dequantized_experts(checkpoints, arch, name):
    group = GROUP if name == "int4" else None
    # the portable formats' own matmul (fused_kernels=False), exact to float32 rounding; the fused kernels round activations
    # to bf16 and are checked against this path in test_kernels.py
    quantized = LLM(checkpoints[arch], engine_config(progress=False, expert_cache=6, expert_dtype=name, group_size=group, fused_kernels=False))
    reference = dequantized_reference(checkpoints[arch], make_format(name, torch.float32, group))
    weight_bytes = lambda store: store.expert_bytes - bias_bytes(store)  # noqa: E731
    assert weight_bytes(quantized.loaded.store) <= weight_bytes(reference.loaded.store) / (3 if name == "int8" else 4)  # int4 g8: 1 byte per weight
    torch.testing.assert_close(quantized.logits(PROMPT), reference.logits(PROMPT), rtol=1e-4, atol=1e-4)
    assert quantized.generate(PROMPT, GREEDY).token_ids == reference.generate(PROMPT, GREEDY).token_ids


def test_h2d_bytes_are_the_packed_bytes_copied(checkpoints):
    llm = LLM(checkpoints["qwen3_moe"], engine_config(progress=False, expert_cache=6, expert_dtype="int4", group_size=GROUP))
    stats = llm.generate(PROMPT, GREEDY, PolicyConfig("mobile", tau=0.99)).stats
    cache = llm.cache
    assert stats.h2d_bytes == cache.transfer.bytes_copied == (cache.stats.misses + cache.stats.prefetched) * llm.loaded.store.expert_bytes
    assert llm.loaded.store.expert_bytes == cache.pool.shape[1] == cache.pool[0].numel()  # a slot holds exactly one packed expert


def test_quantize_writes_a_checkpoint_that_loads_packed(checkpoints, tmp_path, capsys):
    out = tmp_path / "olmoe-int4"
    code, printed, _ = run(capsys, "quantize", "--model", str(checkpoints["olmoe"]), "--to", "int4", "--group-size", str(GROUP), "--out", str(out), "--quiet")
    assert code == 0 and "written to" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mobile-moe", "expert_format": "int4", "modules": "routed_experts", "group_size": GROUP}
    loaded = LLM(out, engine_config(progress=False, expert_cache=6))
    on_the_fly = LLM(checkpoints["olmoe"], engine_config(progress=False, expert_cache=6, expert_dtype="int4", group_size=GROUP))
    assert str(loaded.loaded.store.format) == f"int4 (group {GROUP})"
    assert torch.equal(loaded.loaded.store.host.data, on_the_fly.loaded.store.host.data)  # the same packed bytes
    assert loaded.generate(PROMPT, GREEDY).token_ids == on_the_fly.generate(PROMPT, GREEDY).token_ids


RSS_SCRIPT = """
import sys, torch
from pathlib import Path
from mobile_moe.loading.checkpoint import read_config
from mobile_moe.loading.loader import load
from mobile_moe.models.registry import build_model
with torch.device("meta"):
    build_model(read_config(Path(sys.argv[1])))  # imports and config parsing happen before the baseline
status = lambda key: next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
rss = status("VmRSS")
loaded = load(sys.argv[1], torch.device("cpu"), progress=False)
print((status("VmHWM") - rss) * 1024, loaded.store.nbytes)  # high-water mark of this process's own memory (ru_maxrss inherits the parent's)
"""


def test_loading_a_quantized_checkpoint_never_holds_the_float_experts(tmp_path):
    import transformers as T

    cfg = T.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=64,
        moe_intermediate_size=256,
        num_experts=64,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bf16_expert_bytes = 2 * 64 * 3 * 128 * 256 * 2  # 25 MiB
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "int4", "int4", progress=False)
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "int4")], capture_output=True, text=True, check=True)
    peak_growth, packed = map(int, done.stdout.split()[-2:])
    assert packed < 0.3 * bf16_expert_bytes
    assert peak_growth < bf16_expert_bytes, f"loading grew RSS by {peak_growth / 2**20:.1f} MiB"


def test_unknown_expert_dtype_is_a_usage_error(capsys, checkpoints):
    with pytest.raises(SystemExit) as exited:
        main(gen(checkpoints["olmoe"], "--expert-dtype", "int3"))
    assert_one_line_error(exited.value.code, capsys.readouterr().err, "invalid choice: 'int3'")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (("--expert-dtype", "int4", "--group-size", "12"), "--group-size must be a power of two >= 2 (e.g. 64), got 12"),
        (("--expert-dtype", "int4", "--group-size", "128"), "group size 128 does not divide"),
        (("--expert-dtype", "int8", "--group-size", "8"), "int4 experts only"),
    ],
)
def test_bad_expert_flags(capsys, checkpoints, flags, needle):
    assert_one_line_error(*run(capsys, *gen(checkpoints["olmoe"], *flags))[::2], needle)


def quantized_copy(checkpoints, tmp_path: Path) -> Path:
    out = tmp_path / "q"
    quantize_checkpoint(checkpoints["olmoe"], out, "int8", progress=False)
    return out


def test_unknown_quantization_format_is_one_line(capsys, checkpoints, tmp_path):
    out = quantized_copy(checkpoints, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["expert_format"] = "int3"
    (out / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run(capsys, *gen(out))[::2], "unknown expert format 'int3'")


def test_missing_scale_tensor_is_one_line(capsys, checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    out = quantized_copy(checkpoints, tmp_path)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.experts.down_proj.scales"
    shard = out / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard)
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(*run(capsys, *gen(out))[::2], "lacks", "layer 1 expert 0 down scales")


def test_requantizing_or_overwriting_is_refused(capsys, checkpoints, tmp_path):
    out = quantized_copy(checkpoints, tmp_path)
    assert_one_line_error(*run(capsys, *gen(out, "--expert-dtype", "int4"))[::2], "stores", "cannot re-quantize")
    assert_one_line_error(*run(capsys, "quantize", "--model", str(checkpoints["olmoe"]), "--to", "int8", "--out", str(out))[::2], "already exists")
    assert_one_line_error(*run(capsys, "quantize", "--model", str(out), "--to", "int4", "--out", str(tmp_path / "again"))[::2], "already quantized")
    assert not (tmp_path / "again").exists()
    shutil.rmtree(out)


def test_float_formats_read_in_place_only_in_the_compute_dtype():
    assert FloatFormat(torch.float32).reads_in_place(torch.float32)
    assert not FloatFormat(torch.bfloat16).reads_in_place(torch.float32)
    assert make_format("auto", torch.float16).reads_in_place(torch.float16)


def test_bf16_experts_under_float32_compute_are_cast_on_the_device(checkpoints):
    bf16 = LLM(checkpoints["mixtral"], engine_config(progress=False, expert_cache=6, expert_dtype="bf16"))
    reference = dequantized_reference(checkpoints["mixtral"], FloatFormat(torch.bfloat16))
    assert bf16.loaded.store.expert_bytes * 2 == reference.loaded.store.expert_bytes and not bf16.runner.executor.in_place
    torch.testing.assert_close(bf16.logits(PROMPT), reference.logits(PROMPT), rtol=0, atol=0)
    assert bf16.generate(PROMPT, GREEDY).token_ids == reference.generate(PROMPT, GREEDY).token_ids


def test_mxfp4_rounds_to_the_nearest_e2m1_value_ties_to_even():
    from mobile_moe.experts.formats import Mxfp4Format

    row = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -0.75, -5.0, 6.0, 0.1, 0.3, -1.6, 2.9] + [0.0] * 16)
    blocks, scales = Mxfp4Format().quantize(row[None])
    assert blocks.shape == (1, 1, 16) and scales.tolist() == [[127]]  # amax 7 -> exponent floor(log2 7) - 2 = 0
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.0, -1.0, -4.0, 6.0, 0.0, 0.5, -1.5, 3.0] + [0.0] * 16
    assert Mxfp4Format().dequantize([blocks, scales], torch.float32)[0].tolist() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_packed_by_us_dequantizes_like_transformers_bit_for_bit(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from mobile_moe.experts.formats import Mxfp4Format

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(4, 48, 96, generator=gen) * torch.exp2(torch.randint(-12, 6, (4, 48, 3, 1), generator=gen)).repeat_interleave(32, 1).view(4, 48, 96)
    w[0, 0, :32] = 0.0  # an all-zero block
    blocks, scales = Mxfp4Format().quantize(w)  # [E, out, in / 32, 16], [E, out, in / 32]: the hub's layout
    assert blocks.shape == (4, 48, 3, 16) and scales.shape == (4, 48, 3) and blocks.dtype == scales.dtype == torch.uint8
    ours = Mxfp4Format().dequantize([blocks, scales], dtype)  # [E, out, in]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out], as gpt-oss multiplies
    assert torch.equal(ours, theirs.transpose(1, 2))
    assert (ours.float() - w).abs().max() <= w.abs().max()  # sanity: a coarse approximation, not garbage


def mxfp4_checkpoints(src: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(gpt-oss checkpoint with MXFP4 experts packed by us, as the hub stores them; the same with those experts
    dequantized by transformers into float32 `gate_up_proj` / `down_proj`)."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from mobile_moe.experts.formats import Mxfp4Format

    mx, deq = tmp_path / "mxfp4", tmp_path / "dequantized"
    for d in (mx, deq):
        shutil.copytree(src, d)
        for f in d.glob("*.safetensors"):
            f.unlink()
    packed, floats = {}, {}
    for key, t in load_file(src / "model.safetensors").items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> blocks/scales of [E, out, in]
            blocks, scales = Mxfp4Format().quantize(t.transpose(1, 2))
            packed[f"{key}_blocks"], packed[f"{key}_scales"] = blocks, scales
            floats[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        else:
            packed[key] = floats[key] = t
    save_file(packed, mx / "model.safetensors", metadata={"format": "pt"})
    save_file(floats, deq / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((mx / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (mx / "config.json").write_text(json.dumps(config))
    return mx, deq


def test_mxfp4_gpt_oss_checkpoint_runs_packed_like_its_dequantized_model(checkpoints, tmp_path):
    from checkpoints import reference_model

    mx, deq = mxfp4_checkpoints(checkpoints["gpt_oss"], tmp_path)
    packed = LLM(mx, engine_config(progress=False, expert_cache=6))
    store = packed.loaded.store
    assert str(store.format) == "mxfp4"
    hidden, inter = store.shape.hidden, store.shape.intermediate
    assert store.expert_bytes == 3 * hidden * inter // 32 * 17 + (2 * inter + hidden) * 4  # 17 bytes per 32 weights (4.25 bits) + float32 biases
    floats = LLM(deq, engine_config(progress=False, expert_cache=6))
    torch.testing.assert_close(packed.logits(PROMPT), floats.logits(PROMPT), rtol=0, atol=1e-5)
    with torch.no_grad():
        ref = reference_model(deq)
        expected = ref(torch.tensor([PROMPT])).logits[0]
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(packed.logits(PROMPT), expected, rtol=0, atol=1e-4)
    assert packed.generate(PROMPT, GREEDY).token_ids == floats.generate(PROMPT, GREEDY).token_ids == out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize("to", ["int4", "mxfp4"])
def test_quantize_packs_gpt_oss_experts_and_biases_like_loading_does(checkpoints, tmp_path, to):
    group = GROUP if to == "int4" else None
    out = tmp_path / f"gpt-oss-{to}"
    quantize_checkpoint(checkpoints["gpt_oss"], out, to, group, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["expert_format"] == to  # ours, not the hub's mxfp4 layout
    loaded = LLM(out, engine_config(progress=False, expert_cache=6))
    on_the_fly = LLM(checkpoints["gpt_oss"], engine_config(progress=False, expert_cache=6, expert_dtype=to, group_size=group))
    assert torch.equal(loaded.loaded.store.host.data, on_the_fly.loaded.store.host.data)  # de-interleaved once, biases included
    assert loaded.generate(PROMPT, GREEDY).token_ids == on_the_fly.generate(PROMPT, GREEDY).token_ids


def test_generation_stats_name_the_expert_path_the_engine_chose(checkpoints):
    """`GenerationStats.expert_path` (and so `generate --json`) says how the routed experts were computed."""
    floats = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32"))
    assert floats.generate(PROMPT, GREEDY).stats.expert_path == "in-place"  # float experts read where they lie
    int4 = LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32", expert_dtype="int4", group_size=16, fused_kernels=False))
    assert int4.generate(PROMPT, GREEDY).stats.expert_path == "reference"  # dequantized, then a matmul


def test_a_path_the_experts_cannot_take_is_refused_when_the_engine_is_built(checkpoints):
    """Grouped matmuls read float experts in place: asked of int4 experts, the engine says so at build, in one line."""
    with pytest.raises(InvalidParameter, match="grouped matmuls read float experts in place; int4") as refused:
        LLM(checkpoints["olmoe"], engine_config(progress=False, dtype="float32", expert_dtype="int4", group_size=16), RunnerOptions(grouped=True))
    assert len(str(refused.value).splitlines()) == 1
