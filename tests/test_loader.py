"""Loader: sharded checkpoints with an index, fused (3-D) expert tensors, and experts kept off the device."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from checkpoints import reference_model
from conftest import open_llm
from safetensors.torch import load_file, save_file

from mobile_moe import LLM, engine_config
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.loading.checkpoint import classify
from mobile_moe.loading.loader import dense_bytes

PROMPT = [4, 9, 16, 25, 36, 49]


def fuse_experts(src: Path, dst: Path) -> Path:
    """Rewrite a per-expert checkpoint with each layer's experts as gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    out, experts = {}, {}
    for key, t in weights.items():
        kind = classify(key)
        if kind is None:
            out[key] = t
        else:
            experts.setdefault(kind.layer, {}).setdefault(kind.expert, {})[kind.part] = t
    for layer, per_expert in experts.items():
        order = sorted(per_expert)
        prefix = f"model.layers.{layer}.mlp.experts"
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([per_expert[e]["gate"], per_expert[e]["up"]]) for e in order])
        out[f"{prefix}.down_proj"] = torch.stack([per_expert[e]["down"] for e in order])
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_fused_expert_layout_gives_the_same_logits(checkpoints, tmp_path):
    fused = fuse_experts(checkpoints["qwen3_moe"], tmp_path / "fused")
    per_expert = open_llm(checkpoints["qwen3_moe"], expert_cache=4).logits(PROMPT)
    torch.testing.assert_close(open_llm(fused, expert_cache=4).logits(PROMPT), per_expert, atol=0, rtol=0)


def test_sharded_checkpoint_with_index_loads(checkpoints, tmp_path):
    ref = reference_model(checkpoints["deepseek_v2"])
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(open_llm(tmp_path / "sharded", expert_cache=4).logits(PROMPT), expected, atol=1e-4, rtol=0)


def test_experts_live_in_host_store_not_in_model_parameters(checkpoints):
    llm = open_llm(checkpoints["olmoe"], expert_cache=4)
    names = [n for n, _ in llm.loaded.model.named_parameters()]
    assert not any(".experts." in n for n in names)
    store = llm.loaded.store
    assert len(store.layers) == 3 and all(t.shape == (16, store.expert_bytes) for t in store.layers.values())
    assert llm.cache.pool.shape[0] == 4


def test_tied_embeddings_without_lm_head_tensor(checkpoints, tmp_path):
    dst = tmp_path / "tied"
    shutil.copytree(checkpoints["mixtral"], dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    ref_weights = dict(weights)
    del weights["lm_head.weight"]
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    llm = open_llm(dst, expert_cache=3)
    assert torch.equal(llm.loaded.model.lm_head.weight, ref_weights["model.embed_tokens.weight"])


def test_fused_projections_view_the_loaded_weights(checkpoints):
    llm = open_llm(checkpoints["qwen2_moe"], expert_cache=4)  # qkv bias, a shared expert and a dense layer
    layer = llm.loaded.model.model.layers[0]
    attn, shared = layer.self_attn, layer.mlp.shared_expert
    assert attn.qkv is not None and shared.gate_up is not None
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert storage(attn.q_proj.weight) == storage(attn.v_proj.weight) == storage(attn.qkv.weight)  # views: no second copy
    assert storage(attn.k_proj.bias) == storage(attn.qkv.bias)
    x = torch.randn(3, attn.q_proj.in_features)
    for fused, separate in zip(attn.qkv(x), (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))):
        torch.testing.assert_close(fused, separate)


def test_float32_cpu_weights_are_stored_column_major_with_the_checkpoints_values(checkpoints):
    path = checkpoints["qwen3_5_moe"]  # GQA layers and Gated DeltaNet layers
    llm = open_llm(path, expert_cache=4)
    model, want = llm.loaded.model, load_file(str(path / "model.safetensors"))
    assert model.lm_head.weight.stride() == (1, model.lm_head.weight.shape[0])  # single-row matmuls read it faster
    attn = next(layer.self_attn for layer in model.model.layers if hasattr(layer.self_attn, "qkv"))
    assert attn.qkv.weight.stride()[0] == 1 and attn.q_proj.weight.stride()[0] == 1  # the fused weight and its views
    deltanet = next(layer.self_attn for layer in model.model.layers if getattr(layer.self_attn, "row_major_weights", False))
    assert deltanet.in_proj_qkv.weight.is_contiguous()  # kept row-major: its l2 norms amplify rounding
    named = dict(model.named_parameters())
    for key in ("lm_head.weight", "model.layers.1.self_attn.q_proj.weight"):
        hub = key if key in want else "model.language_model." + key.removeprefix("model.")
        assert torch.equal(named[key], want[hub].float())
    bf16 = LLM(path, engine_config(progress=False, expert_cache=4, dtype="bfloat16"))
    assert bf16.loaded.model.lm_head.weight.is_contiguous()  # half-precision gemv is far slower column-major


def test_multi_token_prediction_weights_are_skipped(checkpoints, tmp_path):
    """ERNIE-4.5 ships MTP modules beside the decoder (model.mtp_*); decoding never uses them."""
    dst = tmp_path / "mtp"
    shutil.copytree(checkpoints["ernie4_5_moe"], dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights["model.mtp_emb_norm.0.weight"] = torch.ones(32)
    weights["model.mtp_linear_proj.0.weight"] = torch.zeros(32, 64)
    weights["model.mtp_block.0.mlp.up_proj.weight"] = torch.zeros(48, 32)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    expected = open_llm(checkpoints["ernie4_5_moe"], expert_cache=4).logits(PROMPT)
    torch.testing.assert_close(open_llm(dst, expert_cache=4).logits(PROMPT), expected, atol=0, rtol=0)


def test_a_model_too_big_for_the_ram_is_refused_in_one_line_before_allocating(monkeypatch, capsys):
    from mobile_moe.cli import main
    from mobile_moe.loading import loader

    llm = LLM(DEMO_MODEL, engine_config(progress=False, dtype="float32"))
    need = llm.loaded.store.nbytes + dense_bytes(llm.loaded.model)
    monkeypatch.setattr(loader, "available_memory_bytes", lambda: int(need / 0.9) + 1)  # just enough: loads
    LLM(DEMO_MODEL, engine_config(progress=False, dtype="float32"))
    monkeypatch.setattr(loader, "available_memory_bytes", lambda: need // 2)
    capsys.readouterr()
    assert main(["generate", "--prompt-ids", "1,2", "--dtype", "float32", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "MiB of RAM" in err and "fp32 experts" in err and "--expert-dtype int4" in err and "--offload-dir" in err
    monkeypatch.setattr(loader, "available_memory_bytes", lambda: None)  # /proc/meminfo unreadable: no check
    LLM(DEMO_MODEL, engine_config(progress=False, dtype="float32"))
