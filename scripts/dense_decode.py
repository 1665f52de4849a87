"""Decode speed and bytes per token of dense bf16 / int8 / int4 on one synthetic model, rounds interleaved.

One synthetic model is built (bf16 dense weights, random packed experts, every expert resident); the int8 and int4
variants quantize its dense weights as `--dense-dtype` does and share its expert store, so the three differ only in
their dense part. Each round decodes the same prompt once per variant. Prints per variant the median decode tok/s,
dense and expert bytes per token, and the roofline fraction (tok/s x bytes/token / the memory probe).
Usage: python scripts/dense_decode.py olmoe-1b-7b --expert-dtype int4 --threads 2 --rounds 3 --new-tokens 16
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from mobile_moe import LLM, engine_config
from mobile_moe.bench.roofline import dense_read_bytes, memory_probe_gb_s
from mobile_moe.bench.synthetic import build_synthetic
from mobile_moe.config import PolicyConfig, SamplingParams
from mobile_moe.loading.budget import kv_bytes_per_token
from mobile_moe.loading.dense import dense_formats, pack_dense, quantized_fields, replace_linears, resolve_dense
from mobile_moe.models.registry import build_model


def requantized(loaded, name: str, group: int | None):
    """The loaded model with its dense weights re-made as `name` from its bf16 ones (experts shared)."""
    src = loaded.model.state_dict()  # fused members' weights are views of their rows
    choice = resolve_dense(loaded.config, name, group, torch.device("cpu"), loaded.dtype)
    with torch.device("meta"):
        model = build_model(loaded.config)
    packed = dense_formats(model, choice)
    replace_linears(model, packed, quantize=False)
    state = {}
    for key in model.state_dict():
        prefix = key.rpartition(".")[0]
        if prefix in packed and not key.endswith(".bias"):
            state.update(quantized_fields(prefix, packed[prefix], src[f"{prefix}.weight"], torch.device("cpu")))
        else:
            state[key] = src[key]
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary.inv_freq = loaded.model.rotary.inv_freq
    model.prepare_weights()
    path = pack_dense(model, loaded.dtype, torch.device("cpu"))
    return dataclasses.replace(loaded, model=model.eval(), dense_path=path, dense=choice)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("synthetic")
    p.add_argument("--expert-dtype", default="int4")
    p.add_argument("--group-size", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--variants", default="bf16,int8,int4")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = build_synthetic(args.synthetic, torch.device("cpu"), "bfloat16", expert_dtype=args.expert_dtype, dense_dtype="bf16")
    variants = {v: base if v == "bf16" else requantized(base, v, args.group_size) for v in args.variants.split(",")}
    llms = {v: LLM(loaded, engine_config(dtype="bfloat16", expert_cache=loaded.store.total_experts, progress=False)) for v, loaded in variants.items()}
    for llm in llms.values():
        llm.cache.load_all()
    prompt = torch.randint(2, base.model.vocab_size, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0, stop_at_eos=False)
    speeds: dict[str, list[float]] = {v: [] for v in llms}
    for llm in llms.values():
        llm.generate(prompt[:2], SamplingParams(max_new_tokens=2, temperature=1.0, seed=0), PolicyConfig("big"))  # warm-up
    for _ in range(args.rounds):
        for v, llm in llms.items():
            speeds[v].append(llm.generate(prompt, sampling, PolicyConfig("big")).stats.decode_tok_s)
    probe = memory_probe_gb_s()
    cpu = "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else "no AVX512-BF16"
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{args.synthetic}, experts {base.store.format}, {args.threads} threads, {cpu}, kernels {capability}, probe {probe:.1f} GB/s")
    for v, llm in llms.items():
        model = llm.loaded.model
        per_token = model.info.top_k * len(model.info.moe_layers)
        dense, experts = dense_read_bytes(model), per_token * llm.loaded.store.expert_bytes
        kv = (len(prompt) + args.new_tokens / 2) * kv_bytes_per_token(model, model.dtype)
        tok_s = statistics.median(speeds[v])
        roof = tok_s * (dense + experts + kv) / 1e9 / probe
        rounds = " ".join(f"{s:.2f}" for s in speeds[v])
        print(
            f"dense {v:<5} {tok_s:6.2f} tok/s (rounds {rounds})  dense {dense / 1e6:7.1f} MB/token  experts {experts / 1e6:7.1f} MB/token  "
            f"roofline {roof:.0%}  [{llm.loaded.dense_path}]"
        )


if __name__ == "__main__":
    main()
