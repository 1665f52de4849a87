"""Where int4 expert matmuls should switch from the fused kernel to dequantize-then-matmul, by rows.

For one expert matrix shape, times the fused kernel the engine would pick on this device (`compute_format`: tinygemm
on CUDA, torch's CPU kernel on a CPU) against the portable reference path (dequantize, then one dense matmul) at
1 to 512 rows, and checks both agree. Prints one JSON object; the crossover is the first row count where the
reference path is faster. Usage: python scripts/int4_rows.py [--device cuda] [--out 2048] [--in 2048] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mobile_moe.experts.formats import DEFAULT_GROUP_SIZE, Int4Format
from mobile_moe.experts.kernels import compute_format

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def timed(fn, device: torch.device, repeats: int = 20) -> float:
    """Median seconds of `fn()` over `repeats` calls after two warm-ups (synchronised on CUDA)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Time both paths at each row count and print the table as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=int, default=2048, help="output rows of the matrix (OLMoE gate_up: 2048)")
    parser.add_argument("--in", dest="inp", type=int, default=2048, help="input columns (OLMoE hidden size: 2048)")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (reported)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch.bfloat16
    portable = Int4Format(args.group_size)
    fused = compute_format(portable, dtype, device, [(args.out, args.inp)])
    parts = portable.quantize(torch.randn(args.out, args.inp, generator=torch.Generator().manual_seed(0)) * 0.02)
    reference = [p.to(device) for p in parts]
    report: dict = {
        "device": str(device),
        "threads": args.threads,
        "shape": [args.out, args.inp],
        "group_size": args.group_size,
        "kernel": None if fused is None else fused.kernel,
        "rows": [],
    }
    if fused is not None:
        kernel = [p.to(device) for p in fused.from_portable(parts, args.out, args.inp)]
        for rows in ROWS:
            x = torch.randn(rows, args.inp, device=device, dtype=dtype)
            want = portable.linear(x, reference, dtype)
            got = fused.fused(x, kernel)
            error = float((got.float() - want.float()).norm() / want.float().norm())
            report["rows"].append(
                {
                    "rows": rows,
                    "fused_ms": 1e3 * timed(lambda x=x: fused.fused(x, kernel), device),
                    "reference_ms": 1e3 * timed(lambda x=x: portable.linear(x, reference, dtype), device),
                    "rel_error": error,
                }
            )
        slower = [r["rows"] for r in report["rows"] if r["fused_ms"] > r["reference_ms"]]
        report["crossover_rows"] = slower[0] if slower else None
    text = json.dumps(report, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
