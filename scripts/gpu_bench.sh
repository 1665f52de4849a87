#!/usr/bin/env bash
# The H200 benchmark in one prepared run (under 6 minutes): OLMoE-1B-7B and Qwen1.5-MoE-A2.7B shapes (random
# weights made on the device) at budgets that leave each a real expert cache, int4 experts through tinygemm and the reference path, the three tiers once (disk ->
# pinned host tier of 1.7 GB -> 4 GiB of device; the store is built by that run, in $STORE_DIR), a batch sweep (1, 4, 16
# rows) once, mobile at fallback rate 0.2, resident decoding eager and replayed from CUDA graphs (bf16 and int4), and
# the transformers + accelerate offload baseline once (OLMoE, 4 GiB), after the int4 kernel timed against the reference by
# rows (scripts/int4_rows.py). JSON reports and logs go to $OUT.
# Every run's slot plan is printed first; one failed or overlong run does not stop the others.
# Usage, from the repository root:  bash scripts/gpu_bench.sh [--plan-only]   (--plan-only: plans on any machine, no GPU)
set -uo pipefail
OUT=${OUT:-out/gpu}
PLAN_ONLY=${1:-}
DEADLINE_S=${DEADLINE_S:-330}  # the whole script stays under 6 minutes: each run gets at most what is left
STORE_DIR=${STORE_DIR:-/var/tmp/mobile-moe-olmoe-int4}  # on a disk, not tmpfs: bench refuses to report a disk tier in memory
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RUNS=(  # name, seconds allowed, bench flags (runs late in the list are skipped when the deadline comes)
  "olmoe_4g       150 --synthetic olmoe-1b-7b --gpu-memory 4"
  "olmoe_4g_int4   60 --synthetic olmoe-1b-7b --gpu-memory 4 --skip-accelerate --expert-dtype int4 --cuda-graphs"
  "olmoe_4g_int4r  50 --synthetic olmoe-1b-7b --gpu-memory 4 --skip-accelerate --expert-dtype int4 --reference-kernels"
  "olmoe_disk      90 --synthetic olmoe-1b-7b --gpu-memory 4 --skip-accelerate --expert-dtype int4 --offload-dir $STORE_DIR --host-memory 1.7"
  "olmoe_4g_batch  50 --synthetic olmoe-1b-7b --gpu-memory 4 --skip-accelerate --expert-dtype int4 --batch 1,4,16 --new-tokens 16 --max-context 256"
  "olmoe_8g        60 --synthetic olmoe-1b-7b --gpu-memory 8 --skip-accelerate --cuda-graphs"
  "qwen15_6g       50 --synthetic qwen1.5-moe-a2.7b --gpu-memory 6 --skip-accelerate"
  "olmoe_4g_look   50 --synthetic olmoe-1b-7b --gpu-memory 4 --skip-accelerate --lookahead"
  "qwen15_10g      50 --synthetic qwen1.5-moe-a2.7b --gpu-memory 10 --skip-accelerate"
)
# one round, no whole-model transformers run: random-initialising a 7B transformers model costs more than the budget
bench() { python3 -m mobile_moe.cli bench --device cuda --quiet --prompts 3 --new-tokens 32 --fallback-rate 0.2 --rounds 1 --skip-transformers "$@"; }

failed=0
echo "== slot plans"
plans=$(mktemp -d)
for i in "${!RUNS[@]}"; do  # in parallel (each is a Python start-up), printed in order
  read -r name _ args <<<"${RUNS[$i]}"
  # shellcheck disable=SC2086
  (bench $args --plan-only >"$plans/$i" 2>&1; echo $? >"$plans/$i.rc") &
done
wait
for i in "${!RUNS[@]}"; do
  read -r name _ _ <<<"${RUNS[$i]}"
  sed "s/^/$name: /" "$plans/$i"
  [[ "$(cat "$plans/$i.rc")" == 0 ]] || failed=$((failed + 1))
done
rm -rf "$plans"
if [[ "$PLAN_ONLY" == "--plan-only" ]]; then
  exit $failed
fi

python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "gpu", torch.cuda.get_device_name(0))
PY
echo "== int4 kernel vs reference by rows (OLMoE gate_up 2048 x 2048, down 2048 x 1024)"  # sets CudaInt4.max_rows
timeout 60 python3 scripts/int4_rows.py --json "$OUT/int4_rows_gate_up.json" | tail -n 3
timeout 60 python3 scripts/int4_rows.py --in 1024 --json "$OUT/int4_rows_down.json" | tail -n 3
for run in "${RUNS[@]}"; do
  read -r name limit args <<<"$run"
  left=$((DEADLINE_S - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "== $name skipped: ${left}s left of ${DEADLINE_S}s"; failed=$((failed + 1)); continue
  fi
  echo "== $name (at most ${limit}s)"
  start=$SECONDS
  timeout "$limit" bash -c "$(declare -f bench); bench $args --json '$OUT/$name.json'" >"$OUT/$name.log" 2>&1
  status=$?
  if ((status != 0)); then
    echo "run $name failed (exit $status; 124 = over ${limit}s); see $OUT/$name.log"
    failed=$((failed + 1))
  fi
  tail -n 12 "$OUT/$name.log"
  echo "($name: $((SECONDS - start)) s)"
done
echo "$failed of ${#RUNS[@]} runs failed"
exit $failed
