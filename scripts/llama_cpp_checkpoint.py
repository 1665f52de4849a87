"""Write a random-weight OLMoE checkpoint (bf16 safetensors, hub layout) that both mobile-moe and llama.cpp's converter read.

The weights follow `mobile-moe bench --synthetic olmoe-1b-7b` (norms 1, embeddings N(0, 1), the rest N(0, 0.02)), one
shard per decoder layer, made one tensor at a time so that memory stays at one shard. The tokenizer is GPT-NeoX-20B's,
rebuilt from the vocab-only GGUF that llama.cpp ships for its tokenizer tests (models/ggml-vocab-gpt-neox.gguf): its
pre-tokenizer hash is the one llama.cpp's converter knows as OLMo's, so `convert_hf_to_gguf.py` takes it as it is.
Needs llama.cpp's source tree (its gguf-py package and that file); llama.cpp is a measuring tool, not a dependency.
Usage: python scripts/llama_cpp_checkpoint.py OUT_DIR --llama-src /path/to/llama.cpp [--layers 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

import torch
from safetensors.torch import save_file

from mobile_moe.bench.synthetic import INIT_STD, synthetic_config

VOCAB_GGUF = "models/ggml-vocab-gpt-neox.gguf"
EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")


def refuse(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit status 2."""
    print(f"llama_cpp_checkpoint: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def write_tokenizer(llama_src: Path, out: Path) -> int:
    """Save GPT-NeoX-20B's tokenizer, rebuilt from llama.cpp's vocab GGUF, into `out`; returns its real vocabulary size."""
    sys.path.insert(0, str(llama_src / "gguf-py"))
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(llama_src / VOCAB_GGUF)
    fields = reader.fields
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    merges = [tuple(bytes(fields["tokenizer.ggml.merges"].parts[i]).decode().split(" ")) for i in fields["tokenizer.ggml.merges"].data]
    real = next(i for i, t in enumerate(tokens) if t.startswith("[PAD"))  # the GGUF pads the vocabulary with [PADn] fillers
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens[:real])}, merges=merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    control, user = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == control, normalized=types[i] != control) for i in range(real) if types[i] != user])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=tokens[0], eos_token=tokens[0], unk_token=tokens[0], pad_token=tokens[1])
    fast.save_pretrained(out)
    return real


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """One bf16 weight as the synthetic models make it: norms 1, embeddings N(0, 1), the rest N(0, INIT_STD)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 1.0 if name == "model.embed_tokens.weight" else INIT_STD
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=gen)


def layer_shapes(cfg, layer: int) -> dict[str, tuple[int, ...]]:
    """Hub names and shapes of one OLMoE decoder layer's weights (per-expert layout, as allenai/OLMoE-1B-7B-0924 ships)."""
    h, inter, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    kv = cfg.num_key_value_heads * (h // heads)
    p = f"model.layers.{layer}."
    shapes = {f"{p}self_attn.{m}.weight": (h if m == "q_proj" else kv, h) for m in ("q_proj", "k_proj", "v_proj")}
    shapes |= {f"{p}self_attn.o_proj.weight": (h, h), f"{p}self_attn.q_norm.weight": (h,), f"{p}self_attn.k_norm.weight": (kv,)}
    shapes |= {f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,), f"{p}mlp.gate.weight": (cfg.num_experts, h)}
    for e in range(cfg.num_experts):
        for part in EXPERT_PARTS:
            shapes[f"{p}mlp.experts.{e}.{part}.weight"] = (h, inter) if part == "down_proj" else (inter, h)
    return shapes


def write_checkpoint(out: Path, layers: int, seed: int) -> None:
    """config.json, one safetensors shard per layer plus one for the embeddings, final norm and LM head, and their index."""
    cfg = synthetic_config("olmoe-1b-7b", layers=layers)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = None, 0, 1  # GPT-NeoX's <|endoftext|> and <|padding|>
    cfg.architectures = ["OlmoeForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    h, vocab = cfg.hidden_size, cfg.vocab_size
    shards = {"model-outer.safetensors": {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}}
    shards |= {f"model-layer{i:02d}.safetensors": layer_shapes(cfg, i) for i in range(layers)}
    weight_map, total = {}, 0
    for file, shapes in shards.items():
        tensors = {name: random_tensor(name, shape, gen) for name, shape in shapes.items()}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(tensors, file)
        print(f"wrote {file} ({sum(t.numel() for t in tensors.values()) / 1e6:.0f}M weights)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def main() -> None:
    """Check the llama.cpp tree, then write the tokenizer and the checkpoint."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--llama-src", type=Path, required=True, help="llama.cpp's source tree (gguf-py and its vocab GGUFs)")
    p.add_argument("--layers", type=int, default=16, help="decoder layers kept at full width (OLMoE-1B-7B has 16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not (args.llama_src / VOCAB_GGUF).is_file():
        refuse(f"no {VOCAB_GGUF} under {args.llama_src} (give llama.cpp's source tree)")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"tokenizer: {write_tokenizer(args.llama_src, args.out)} tokens")
    write_checkpoint(args.out, args.layers, args.seed)


if __name__ == "__main__":
    main()
