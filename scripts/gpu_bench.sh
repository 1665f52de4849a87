#!/usr/bin/env bash
# The H200 benchmark in one prepared run (about 5 minutes): OLMoE-1B-7B and Qwen1.5-MoE-A2.7B shapes
# (random weights made on the device) at 4 and 8 GiB budgets, mobile at fallback rate 0.2, and the
# transformers + accelerate offload baseline once (OLMoE, 4 GiB). JSON reports and the log go to $OUT.
# Usage on the device machine, from the repository root:  bash scripts/gpu_bench.sh
set -euo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "gpu", torch.cuda.get_device_name(0))
PY
bench() { python3 -m mobile_moe.cli bench --device cuda --quiet --prompts 3 --new-tokens 32 --fallback-rate 0.2 "$@"; }
{
  bench --synthetic olmoe-1b-7b --gpu-memory 4 --json "$OUT/olmoe_4g.json"
  bench --synthetic olmoe-1b-7b --gpu-memory 8 --skip-accelerate --json "$OUT/olmoe_8g.json"
  bench --synthetic olmoe-1b-7b --gpu-memory 4 --skip-accelerate --lookahead --json "$OUT/olmoe_4g_lookahead.json"
  bench --synthetic qwen1.5-moe-a2.7b --gpu-memory 4 --skip-accelerate --json "$OUT/qwen15_4g.json"
  bench --synthetic qwen1.5-moe-a2.7b --gpu-memory 8 --skip-accelerate --json "$OUT/qwen15_8g.json"
} 2>&1 | tee "$OUT/bench.log"
