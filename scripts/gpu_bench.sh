#!/usr/bin/env bash
# The GPU benchmark in one prepared window: OLMoE-1B-7B and Qwen1.5-MoE-A2.7B shapes (random weights made on the device), run
# budgets summing to at most 360 s, runs ordered by what they teach: int4 + CUDA graphs, bf16 + graphs at 8 GiB, the disk tier
# (disk -> pinned host tier of 1.7 GB -> 4 GiB of device; the store is built in $STORE_DIR), 4 GiB eager, a batch sweep (1, 4,
# 16 rows), int4 through the reference kernels, Qwen; then the transformers + accelerate baseline in its own budget, only where
# accelerate imports. First, in seconds: Python, torch, CUDA, the device and an import check of every module the runs need
# (nothing is installed here). Each run's bench JSON is rewritten as each system finishes, so a run stopped by its budget keeps
# what it measured; after every run $OUT holds three files: summary.json (every run: status, per-system figures beside the cost
# model's predictions, graphs checked against eager decoding), gpu_bench.log (this output, with the table) and runs.tar.gz
# (each run's JSON and log, the environment).
# Usage, from anywhere:  bash scripts/gpu_bench.sh [--plan-only] [--only RUN] [--device cuda|cuda:N|cpu]
#   --plan-only: every run's slot plan and budget (no GPU needed); --only RUN: that run alone;
#   --device cpu: a rehearsal on shrunken shapes (widths / 16, 2 layers, short prompts, few tokens, one thread), every run
#   through the table and the summary.
# Environment: OUT (default out/gpu), STORE_DIR (on a disk, not tmpfs), DEADLINE_S (runs stop being started after it).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEVICE=cuda PLAN_ONLY=0 ONLY=""
while (($#)); do
  case $1 in
    --plan-only) PLAN_ONLY=1 ;;
    --only) ONLY=${2:?--only needs a run name}; shift ;;
    --device) DEVICE=${2:?--device needs a device}; shift ;;
    *) echo "gpu_bench.sh: unknown argument $1 (usage: see the script's header)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-out/gpu}
STORE_DIR=${STORE_DIR:-/var/tmp/mobile-moe-olmoe-int4}  # on a disk, not tmpfs: bench refuses to report a disk tier in memory
DEADLINE_S=${DEADLINE_S:-390}  # counted from the first run: budgets (360 s) plus each run's exit and summary
BUDGET_LIMIT_S=360
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RUNS=(  # name, seconds allowed, bench flags; in the order of what they teach
  "olmoe_int4_graphs 55 --synthetic olmoe-1b-7b --gpu-memory 4 --expert-dtype int4 --cuda-graphs"
  "olmoe_8g_graphs   55 --synthetic olmoe-1b-7b --gpu-memory 8 --cuda-graphs"
  "olmoe_disk        75 --synthetic olmoe-1b-7b --gpu-memory 4 --expert-dtype int4 --offload-dir $STORE_DIR --host-memory 1.7"
  "olmoe_4g          35 --synthetic olmoe-1b-7b --gpu-memory 4"
  "olmoe_batch       30 --synthetic olmoe-1b-7b --gpu-memory 4 --expert-dtype int4 --batch 1,4,16 --new-tokens 16 --max-context 256"
  "olmoe_int4_ref    25 --synthetic olmoe-1b-7b --gpu-memory 4 --expert-dtype int4 --reference-kernels"
  "qwen15_6g         30 --synthetic qwen1.5-moe-a2.7b --gpu-memory 6"
  "accelerate        55 --synthetic olmoe-1b-7b --gpu-memory 4 --accelerate-only --prompts 2 --new-tokens 4 --expert-dtype int4 --reference-kernels"
)
# the accelerate run builds the engine only for its prompts: int4 experts without the kernel repack keep that short.
# One round, no whole-model transformers run (random-initialising a 7B transformers model costs more than a budget).
COMMON="--device $DEVICE --quiet --prompts 3 --new-tokens 32 --fallback-rate 0.2 --rounds 1 --skip-transformers --skip-accelerate"
SMALL=""  # appended last, so it wins over a run's own sizes
[[ $DEVICE == cpu ]] && SMALL="--shrink 16 --layers 2 --prompt-tokens 8 --prompts 2 --new-tokens 4 --threads 1"

bench() { python3 -m mobile_moe.cli bench $COMMON "$@" $SMALL; }  # word splitting of the flag strings is intended
summary() { python3 "$ROOT/mobile_moe/bench/gpu_summary.py" summary --work "$WORK" --out "$OUT" "$@"; }  # no torch import: fast
have_accelerate() { python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("accelerate") is None)'; }

selected=()
for run in "${RUNS[@]}"; do
  read -r name _ <<<"$run"
  [[ -z $ONLY || $name == "$ONLY" ]] && selected+=("$run")
done
if ((${#selected[@]} == 0)); then
  echo "gpu_bench.sh: no run named $ONLY (runs: $(for r in "${RUNS[@]}"; do read -r n _ <<<"$r"; printf '%s ' "$n"; done))" >&2
  exit 2
fi
total=0
for run in "${RUNS[@]}"; do read -r _ budget _ <<<"$run"; total=$((total + budget)); done

plan_only() {  # every selected run's slot plan, in parallel (each is a Python start-up), printed in order
  local plans failed=0 i name budget args
  plans=$(mktemp -d)
  for i in "${!selected[@]}"; do
    read -r name budget args <<<"${selected[$i]}"
    # shellcheck disable=SC2086
    (bench $args --plan-only >"$plans/$i" 2>&1; echo $? >"$plans/$i.rc") &
  done
  wait
  for i in "${!selected[@]}"; do
    read -r name budget _ <<<"${selected[$i]}"
    sed "s/^/$name (${budget} s): /" "$plans/$i"
    [[ "$(cat "$plans/$i.rc")" == 0 ]] || failed=$((failed + 1))
  done
  rm -rf "$plans"
  have_accelerate && echo "accelerate imports: the baseline runs" || echo "accelerate does not import: the baseline run is skipped"
  echo "budgets: ${total} s in all (at most ${BUDGET_LIMIT_S} s)"
  ((total <= BUDGET_LIMIT_S)) || failed=$((failed + 1))
  return $failed
}

status() {  # name rc seconds budget: the run's status file, which the summary reads
  printf '{"rc": %d, "seconds": %d, "budget_s": %d}\n' "$2" "$3" "$4" >"$WORK/$1.status"
}

run_one() {  # name budget args...: one bench run under its budget, its JSON and log in $WORK
  local name=$1 budget=$2 limit left start rc
  shift 2
  left=$((DEADLINE_S - SECONDS))
  limit=$((budget < left ? budget : left))
  if [[ $name == accelerate ]] && ! have_accelerate; then
    echo "== $name skipped: accelerate does not import"
    printf '{"skipped": "accelerate does not import"}\n' >"$WORK/$name.status"
    return 0
  fi
  if ((limit < 10)); then
    echo "== $name skipped: ${left} s left of ${DEADLINE_S} s"
    printf '{"skipped": "deadline: %d s left"}\n' "$left" >"$WORK/$name.status"
    return 1
  fi
  echo "== $name (at most ${limit} s)"
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout -k 5 "$limit" python3 -m mobile_moe.cli bench $COMMON "$@" $SMALL --json "$WORK/$name.json" >"$WORK/$name.log" 2>&1
  rc=$?
  status "$name" "$rc" $((SECONDS - start)) "$budget"
  tail -n 8 "$WORK/$name.log"
  ((rc == 0)) || echo "run $name failed (exit $rc; 124 = over ${limit} s): its log is in runs.tar.gz and the summary"
  echo "($name: $((SECONDS - start)) s)"
  return $((rc != 0))
}

main() {
  local failed=0 run name budget args
  echo "== environment (device $DEVICE)"
  printf '%s\n' "${selected[@]}" | while read -r name budget args; do printf '%s\t%s\t%s\n' "$name" "$budget" "$args"; done >"$WORK/runs.tsv"
  if ! timeout 120 python3 -m mobile_moe.bench.gpu_summary env --device "$DEVICE" --json "$WORK/env.json"; then
    echo "environment check failed: no run can work here"
    summary --print
    return 1
  fi
  echo "budgets: ${total} s in all (at most ${BUDGET_LIMIT_S} s); runs: ${#selected[@]}"
  SECONDS=0  # the deadline counts from the first run, not from the set-up
  for run in "${selected[@]}"; do
    read -r name budget args <<<"$run"
    # shellcheck disable=SC2086
    run_one "$name" "$budget" $args || failed=$((failed + 1))
    summary  # after every run: a window cut short keeps the summary and the bundle of what ran
  done
  echo "== summary (tok/s and H2D beside the cost model's predictions, in brackets)"
  summary --print
  echo "$failed of ${#selected[@]} runs failed or were skipped"
  return $failed
}

if ((PLAN_ONLY)); then
  plan_only
  exit $?
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
main 2>&1 | tee "$OUT/gpu_bench.log"
exit "${PIPESTATUS[0]}"
