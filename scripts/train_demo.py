#!/usr/bin/env python
"""Train the demo Qwen3-MoE model that mobile-moe ships as package data.

The recipe is this script's defaults: a byte-level BPE tokenizer and a small Qwen3-MoE
(64 experts, top-8) trained on the train split of the Python standard library's own source
(see ``mobile_moe.eval.corpus``). Everything is written to a temporary directory next to
``--out`` and renamed into place at the end, so an interrupted run never leaves a half-written
model behind. ``training.json`` in the output records the settings, corpus hash and losses.

Usage:  python scripts/train_demo.py --threads 1   (CPU is enough; CUDA is used when present)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobile_moe.eval import corpus  # noqa: E402

EOS = "<|endoftext|>"
MAX_BYTES = 40 * 1024 * 1024


@dataclass(frozen=True)
class Recipe:
    """Every setting that determines the trained model (the defaults are the shipped recipe)."""

    out: str = "mobile_moe/demo_model"
    seed: int = 1234
    threads: int = 1
    vocab_size: int = 6144
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 32
    num_experts: int = 64
    experts_per_tok: int = 8
    moe_intermediate_size: int = 64
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.01
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1300  # ~2.5 s/step with one CPU thread: ~55-60 min in all
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 25
    eval_every: int = 250
    eval_windows: int = 64
    eval_batch_size: int = 32


def parse_args(argv: list[str] | None = None) -> Recipe:
    """Parse the command line into a Recipe; every field is a `--flag` with its default shown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in asdict(Recipe()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default, help=f"(default: {default})")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"(default: {default})")
    return Recipe(**vars(parser.parse_args(argv)))


def log(message: str) -> None:
    """Print one progress line, flushed, with a wall-clock timestamp."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (lossless on any text) with EOS as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def wrap_tokenizer(tokenizer):
    """Wrap a `tokenizers.Tokenizer` so `AutoTokenizer.from_pretrained` loads it back."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        model_max_length=Recipe.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def check_round_trip(hf_tokenizer, texts: list[str]) -> None:
    """Fail unless decode(encode(text)) reproduces each text exactly (whitespace included)."""
    for text in texts:
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        if hf_tokenizer.decode(ids) != text:
            raise RuntimeError("tokenizer does not round-trip the corpus text")


def encode_stream(tokenizer, texts: list[str], eos_id: int) -> torch.Tensor:
    """Token ids of all texts concatenated, with EOS between (and after) files."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def build_model(recipe: Recipe, eos_id: int):
    """A freshly initialised Qwen3-MoE built from transformers' own config and model classes."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=4 * recipe.hidden_size,  # unused: every layer is sparse
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=recipe.tie_word_embeddings,
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.experts_per_tok,
        moe_intermediate_size=recipe.moe_intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=recipe.router_aux_loss_coef,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return Qwen3MoeForCausalLM._from_config(config, attn_implementation="sdpa")


def check_router_is_softmax_top_k(model) -> None:
    """Fail unless the router's weights are the renormalised top-k of a softmax over its logits."""
    gate = model.model.layers[0].mlp.gate
    hidden = torch.randn(5, gate.hidden_dim, device=gate.weight.device)
    with torch.no_grad():
        logits, weights, indices = gate(hidden)
        probs = torch.softmax(logits.float(), dim=-1)
        top_values, top_indices = torch.topk(probs, gate.top_k, dim=-1)
    expected = top_values / top_values.sum(-1, keepdim=True)
    if not (torch.equal(indices, top_indices) and torch.allclose(weights.float(), expected, atol=1e-6)):
        raise RuntimeError("Qwen3-MoE router is not the normalised top-k of a softmax")


def set_top_k(model, k: int) -> None:
    """Route every MoE layer of `model` to its top-`k` experts (k < trained k is the 'little' model)."""
    for layer in model.model.layers:
        layer.mlp.gate.top_k = k


def make_optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and expert tensors, none on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.beta1, recipe.beta2))


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * (recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine)


def random_batch(tokens: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of `seq_len + 1` tokens (inputs plus next-token targets)."""
    starts = torch.randint(0, len(tokens) - recipe.seq_len - 1, (recipe.batch_size,), generator=generator)
    return torch.stack([tokens[s : s + recipe.seq_len + 1] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seq_len: int, limit: int | None) -> torch.Tensor:
    """Non-overlapping windows of `seq_len + 1` tokens; `limit` of them evenly spaced, or all."""
    count = (len(tokens) - 1) // seq_len
    windows = torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)])
    if limit is None or limit >= count:
        return windows
    return windows[torch.linspace(0, count - 1, limit).long()]


def next_token_loss(model, batch: torch.Tensor, router_logits: bool):
    """Mean next-token cross-entropy of `batch` and the router aux loss (None when not requested)."""
    out = model(input_ids=batch[:, :-1], use_cache=False, output_router_logits=router_logits)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
    return ce, out.aux_loss


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Token-weighted mean cross-entropy over the given windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        ce, _ = next_token_loss(model, batch, router_logits=False)
        total += ce.item() * len(batch)
    model.train(was_training)
    return total / len(windows)


def train(model, train_tokens: torch.Tensor, val_windows: torch.Tensor, recipe: Recipe, device: torch.device) -> dict:
    """Run the training loop; return the loss history and the final smoothed train loss."""
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = make_optimizer(model, recipe)
    history: dict = {"train": [], "validation": []}
    window_ce: list[float] = []
    start = time.time()
    model.train()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        batch = random_batch(train_tokens, recipe, generator).to(device)
        ce, aux = next_token_loss(model, batch, router_logits=True)
        loss = ce + recipe.router_aux_loss_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        window_ce.append(ce.item())
        done = step + 1
        if done % recipe.log_every == 0 or done == recipe.steps:
            elapsed = time.time() - start
            mean_ce = sum(window_ce) / len(window_ce)
            history["train"].append({"step": done, "loss": mean_ce, "aux": aux.item()})
            log(
                f"step {done}/{recipe.steps} train_loss {mean_ce:.4f} aux {aux.item():.3f} "
                f"lr {lr_at(step, recipe):.2e} {elapsed / done:.2f}s/step "
                f"eta {(recipe.steps - done) * elapsed / done / 60:.1f}min"
            )
            history["final_train_loss"] = mean_ce
            window_ce = []
        if done % recipe.eval_every == 0 and done < recipe.steps:
            val = evaluate(model, val_windows, recipe.eval_batch_size, device)
            history["validation"].append({"step": done, "loss": val})
            log(f"step {done} validation_loss(subset) {val:.4f}")
    history["seconds_per_step"] = (time.time() - start) / recipe.steps
    return history


@torch.no_grad()
def sample(model, hf_tokenizer, prompt: str, device: torch.device, new_tokens: int = 64) -> str:
    """Greedy continuation of `prompt`, for a glance at what the model writes."""
    ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=hf_tokenizer.pad_token_id, output_router_logits=False)
    return hf_tokenizer.decode(out[0])


def directory_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def publish(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` directory to `out`, replacing any previous model there."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def versions() -> dict:
    """Versions of the libraries that produced the model."""
    import tokenizers
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def run(recipe: Recipe, tmp: Path) -> dict:
    """Train tokenizer and model, write both and training.json into `tmp`; return the record."""
    t0 = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(recipe.seed)
    splits = {name: corpus.load_split(name) for name in corpus.SPLITS}
    log("corpus: " + ", ".join(f"{k} {len(v)} files" for k, v in splits.items()))

    tokenizer = train_tokenizer(splits["train"], recipe.vocab_size)
    hf_tokenizer = wrap_tokenizer(tokenizer)
    check_round_trip(hf_tokenizer, splits["validation"])
    hf_tokenizer.save_pretrained(tmp)
    eos_id = tokenizer.token_to_id(EOS)
    streams = {name: encode_stream(tokenizer, texts, eos_id) for name, texts in splits.items()}
    log(f"tokenizer: vocab {tokenizer.get_vocab_size()}, tokens " + ", ".join(f"{k} {len(v)}" for k, v in streams.items()) + f" ({time.time() - t0:.0f}s)")

    model = build_model(recipe, eos_id).to(device)
    check_router_is_softmax_top_k(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters on {device}")

    subset = eval_windows(streams["validation"], recipe.seq_len, recipe.eval_windows)
    history = train(model, streams["train"], subset, recipe, device)

    all_val = eval_windows(streams["validation"], recipe.seq_len, None)
    val_loss = evaluate(model, all_val, recipe.eval_batch_size, device)
    set_top_k(model, math.ceil(recipe.experts_per_tok / 2))
    val_loss_little = evaluate(model, all_val, recipe.eval_batch_size, device)
    set_top_k(model, recipe.experts_per_tok)
    log(f"validation_loss top-{recipe.experts_per_tok} {val_loss:.4f}, top-{math.ceil(recipe.experts_per_tok / 2)} {val_loss_little:.4f}")

    model = model.to(torch.bfloat16).cpu()
    model.config.dtype = torch.bfloat16
    model.config.use_cache = True
    model.config.output_router_logits = False  # aux loss is for training; inference skips it
    model.eval()
    text = sample(model, hf_tokenizer, "def fibonacci(n):\n", torch.device("cpu"))
    log("sample:\n" + text)
    model.save_pretrained(tmp)  # transformers 5 always writes safetensors (model.safetensors)

    record = {
        "recipe": asdict(recipe),
        "command": sys.argv,
        "seed": recipe.seed,
        "device": str(device),
        "corpus": {
            "source": "python stdlib (mobile_moe.eval.corpus)",
            "hash": corpus.corpus_hash(),
            "files": {k: len(v) for k, v in splits.items()},
            "tokens": {k: len(v) for k, v in streams.items()},
        },
        "parameters": n_params,
        "final_train_loss": history["final_train_loss"],
        "final_validation_loss": val_loss,
        "final_validation_loss_little": val_loss_little,
        "validation_windows": len(all_val),
        "seconds_per_step": history["seconds_per_step"],
        "history": {"train": history["train"], "validation": history["validation"]},
        "sample": text,
        "versions": versions(),
        "wall_seconds": time.time() - t0,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    """Entry point: train into a temporary directory, check its size, then rename it to --out."""
    recipe = parse_args(argv)
    torch.set_num_threads(recipe.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(recipe.threads))  # tokenizers' worker pool
    out = Path(recipe.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        record = run(recipe, tmp)
        size = directory_bytes(tmp)
        if size > MAX_BYTES:
            raise RuntimeError(f"model directory is {size / 2**20:.1f} MiB, over the 40 MiB limit")
        publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"wrote {out} ({size / 2**20:.1f} MiB) in {record['wall_seconds'] / 60:.1f} min; validation loss {record['final_validation_loss']:.4f}")


if __name__ == "__main__":
    main()
