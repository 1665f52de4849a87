"""Tiny random checkpoints in the real hub format, built with transformers' own classes and save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=0.15,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


QWEN3_5_TEXT = dict(
    **{k: v for k, v in COMMON.items() if k != "tie_word_embeddings"},
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    num_experts=16,
    num_experts_per_tok=4,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)


def configs() -> dict[str, T.PretrainedConfig]:
    """One small config per supported architecture, each exercising its routing quirks."""
    return {
        "mixtral": T.MixtralConfig(**COMMON, num_key_value_heads=2, intermediate_size=24, num_local_experts=8, num_experts_per_tok=3),
        "qwen2_moe": T.Qwen2MoeConfig(
            **COMMON,
            num_key_value_heads=2,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
        "qwen3_moe": T.Qwen3MoeConfig(
            **COMMON,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
        ),
        "olmoe": T.OlmoeConfig(**COMMON, num_key_value_heads=4, intermediate_size=16, num_experts=16, num_experts_per_tok=4, clip_qkv=4.0),
        "deepseek_v2": T.DeepseekV2Config(
            **COMMON,
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        "deepseek_v3": T.DeepseekV3Config(
            **COMMON,
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        "glm4_moe": T.Glm4MoeConfig(
            **COMMON,
            num_key_value_heads=2,
            head_dim=16,
            partial_rotary_factor=0.5,
            use_qk_norm=True,
            attention_bias=True,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=2,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        "ernie4_5_moe": T.Ernie4_5_MoeConfig(
            **{**COMMON, "tie_word_embeddings": True},
            num_key_value_heads=2,
            use_bias=True,
            intermediate_size=48,
            moe_intermediate_size=16,
            moe_num_experts=16,
            moe_k=4,
            moe_num_shared_experts=2,
            moe_layer_start_index=0,
            moe_layer_end_index=1,
            moe_layer_interval=1,
        ),
        "gpt_oss": T.GptOssConfig(  # sliding window 4 < the parity prompts; YaRN that changes frequencies; a clamp that bites
            **COMMON,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=32,
            num_local_experts=16,
            num_experts_per_tok=4,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            swiglu_limit=1.0,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=64
            ),
        ),
        "qwen3_5_moe": T.Qwen3_5MoeConfig(  # the full vision-language checkpoint; its text_config is the model we run
            text_config=QWEN3_5_TEXT,
            tie_word_embeddings=False,
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
        ),
        "qwen3_5_moe_text": T.Qwen3_5MoeTextConfig(**QWEN3_5_TEXT, tie_word_embeddings=False),  # what Qwen3_5MoeForCausalLM saves
    }


ARCHITECTURES = tuple(configs())


def build_checkpoint(arch: str, path: Path, seed: int = 0) -> Path:
    """Save a random model of `arch` to `path`; norms, correction biases and linear biases are randomised too."""
    torch.manual_seed(seed)
    cfg = configs()[arch]
    auto = T.AutoModelForImageTextToText if getattr(cfg, "vision_config", None) is not None else T.AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        named = list(model.named_parameters()) + list(model.named_buffers())
        for name, tensor in named:
            if "norm" in name and tensor.dim() == 1:
                tensor.copy_(1.0 + 0.2 * torch.randn_like(tensor))
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.05 * torch.randn_like(tensor))
        for name, tensor in named:  # a second pass keeps the draws above (and older checkpoints' values) unchanged
            if (name.endswith(".bias") and "norm" not in name) or name.endswith("_proj_bias"):  # gpt-oss expert biases
                tensor.copy_(0.1 * torch.randn_like(tensor))
    model.save_pretrained(path)
    return path


def reference_model(path: Path, **overrides) -> T.PreTrainedModel:
    """transformers' own model loaded from the checkpoint, float32, eval mode (overrides apply to a composite config's text part)."""
    cfg = T.AutoConfig.from_pretrained(path)
    if overrides and cfg.get_text_config() is not cfg:
        text = cfg.get_text_config()
        for name, value in overrides.items():
            setattr(text, name, value)
        return T.AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32).eval()
    return T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides).eval()


def build_text_checkpoint(path: Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny random Qwen3-MoE with a small byte-level BPE tokenizer trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = T.Qwen3MoeConfig(
        **{**COMMON, "vocab_size": len(fast), "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "max_position_embeddings": 512},
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=40,
        moe_intermediate_size=16,
        num_experts=16,
        num_experts_per_tok=4,
    )
    T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    fast.save_pretrained(path)
    return path
