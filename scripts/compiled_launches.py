"""Kernel calls per decode token of the compiled all-resident step, read off inductor's generated code.

Builds a synthetic model (widths shrunk: the op structure, hence the kernel count, does not depend on them), loads every
expert, and captures the code torch.compile generates for one decode step's whole-layer calls (`pooled_layer`). Each
generated `call` runs fused kernels (`cpp_fused_*` on CPU, triton kernels on CUDA) and extern ones (matmuls, attention,
topk); their count per layer, times the layers, plus the eager launches outside the layers (embedding, final norm, LM
head, sampling: `bench`'s launch counter), is the step's kernel launches. CUDA fuses differently from the CPU, so this
is a prediction for CUDA, measured here. Usage: python scripts/compiled_launches.py [qwen3-30b-a3b] [--shrink 16]
"""

from __future__ import annotations

import argparse
import re

import torch
from torch._inductor.utils import run_and_get_code

from mobile_moe import LLM, engine_config
from mobile_moe.bench.costinputs import count_decode_ops
from mobile_moe.bench.synthetic import build_synthetic
from mobile_moe.engine.passes import BIG

KERNEL_CALL = re.compile(r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+|extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)[.(]", re.M)


def kernel_calls(code: str) -> list[str]:
    """The kernels one run of a generated module's `call` launches, in order."""
    start = code.find("def call(")
    return KERNEL_CALL.findall(code[start:]) if start >= 0 else []


def main() -> None:
    """Print the compiled step's kernel calls per MoE layer and the predicted launches per token."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="qwen3-30b-a3b", help="a synthetic shape (bench --synthetic)")
    parser.add_argument("--shrink", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = build_synthetic(args.model, torch.device("cpu"), "float32", shrink=args.shrink)
    llm = LLM(loaded, engine_config(progress=False, dtype="float32", compile=True, max_context=256))
    llm.reset_cache(llm.loaded.store.total_experts)
    llm.cache.load_all()
    runner, info = llm.runner, loaded.model.info
    kv = runner.new_kv(64)
    runner.forward(runner.ids([3, 4, 5]), kv, BIG)
    for token in (6, 7):  # the first two decode steps compile (static, then a dynamic length)
        runner.forward(runner.ids([token]), kv, BIG)
    torch._dynamo.reset()  # compile once more, capturing the code of the dynamic-length graphs a long decode runs
    runner.forward(runner.ids([8]), kv, BIG)
    _, codes = run_and_get_code(lambda: runner.forward(runner.ids([9]), kv, BIG))
    per_layer = max((kernel_calls(code) for code in codes), key=len)
    outside = count_decode_ops(llm).per_pass
    layers = len(loaded.model.model.layers)
    print(f"{args.model}: {len(per_layer)} kernel calls per compiled MoE layer: {', '.join(per_layer)}")
    print(
        f"{layers} layers ({len(info.moe_layers)} MoE) x {len(per_layer)} + {outside:.0f} eager outside the layers "
        f"= {layers * len(per_layer) + outside:.0f} launches per token (dense layers counted as MoE ones)"
    )


if __name__ == "__main__":
    main()
