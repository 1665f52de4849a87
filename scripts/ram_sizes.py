"""What a machine with R GiB of RAM can expect from a model whose experts live on disk: the cost model replays one disk-tier
bench run's traces with the host tier such a machine leaves (R - reserve - dense weights - KV cache), on this machine's
disk and on NVMe / SATA profiles. These are predictions, not measurements.

Usage: mobile-moe bench --synthetic NAME ... --offload-dir DIR --json run.json --trace-dir TRACES, then
python scripts/ram_sizes.py --synthetic NAME --expert-dtype int4 --report run.json --trace-dir TRACES [--ram 16,24,32] [--reserve 3.5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mobile_moe.bench.costmodel import predict
from mobile_moe.bench.profiles import disk_profiles
from mobile_moe.bench.synthetic import full_size_cost
from mobile_moe.experts.disk import record_bytes
from mobile_moe.experts.formats import make_format
from mobile_moe.experts.trace import load_trace

GIB = 2**30
SYSTEMS = ("big", "mobile", "little")


def host_slots(ram_gib: float, reserve_gib: float, dense_bytes: int, kv_bytes: int, record: int, total: int) -> int:
    """Expert records the host tier of a machine with `ram_gib` holds once the OS and the process (`reserve_gib`), the dense
    weights and the KV cache have their share."""
    free = ram_gib * GIB - reserve_gib * GIB - dense_bytes - kv_bytes
    return max(0, min(total, int(free // record)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", required=True, help="the shape the bench ran (full size: --shrink 1)")
    parser.add_argument("--expert-dtype", default="int4")
    parser.add_argument("--report", type=Path, required=True, help="the bench run's --json")
    parser.add_argument("--trace-dir", type=Path, required=True, help="the bench run's --trace-dir")
    parser.add_argument("--ram", default="16,24,32", help="RAM sizes in GiB (default: 16,24,32)")
    parser.add_argument("--reserve", type=float, default=3.5, help="GiB the OS and the process itself keep (default 3.5)")
    parser.add_argument("--kv-gib", type=float, default=0.5, help="GiB of KV cache (default 0.5: 4096 tokens of Mixtral in bf16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = json.loads(args.report.read_text())
    cost = full_size_cost(args.synthetic, make_format(args.expert_dtype, torch.bfloat16, None))
    record, total = record_bytes(cost.expert_bytes), report["total_experts"]
    traces = {name: load_trace(args.trace_dir / f"{name}.jsonl") for name in SYSTEMS}
    profiles = disk_profiles(report["disk"]["disk_probe_gb_s"], report["memory_probe_gb_s"])
    rows = []
    for ram in (float(r) for r in args.ram.split(",")):
        slots = host_slots(ram, args.reserve, cost.dense_bytes, int(args.kv_gib * GIB), record, total)
        predicted = {hw: {name: round(predict(traces[name], cost, profile, slots).tok_s, 2) for name in SYSTEMS} for hw, profile in profiles.items()}
        rows.append({"ram_gib": ram, "host_slots": slots, "host_gib": round(slots * record / GIB, 2), "predicted_tok_s": predicted})
    print(json.dumps({"model": args.synthetic, "expert_dtype": args.expert_dtype, "record_mib": record / 2**20, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
