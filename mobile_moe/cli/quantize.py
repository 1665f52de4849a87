"""`mobile-moe quantize`: a packed copy of a checkpoint, or an on-disk expert store."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mobile_moe.cli.common import model_dir
from mobile_moe.experts.formats import DEFAULT_GROUP_SIZE
from mobile_moe.loading.loader import load
from mobile_moe.loading.quantize import quantize_checkpoint


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    """`quantize`."""
    q = sub.add_parser("quantize", help="write a copy of a checkpoint with its routed experts packed as int8 or int4")
    q.add_argument("--model", help="source checkpoint directory, or ORG/NAME[@REVISION] on the Hugging Face hub (default: the bundled demo model)")
    q.add_argument("--to", required=True, choices=["int8", "int4", "mxfp4"], help="expert format")
    q.add_argument(
        "--dense-dtype",
        choices=["int8", "int4"],
        help="also pack the dense linears (attention, shared experts, dense MLPs, LM head) as int8 / int4, per matrix where the kernels take it",
    )
    q.add_argument("--group-size", type=int, metavar="G", help=f"int4: weights per scale/zero group along the input dim (default {DEFAULT_GROUP_SIZE})")
    dest = q.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, help="new checkpoint directory to write (must not exist)")
    dest.add_argument(
        "--offload-dir",
        type=Path,
        metavar="DIR",
        help="build the on-disk expert store that `--offload-dir DIR` reads, in this format (records in the layout --dtype computes with)",
    )
    q.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="with --offload-dir: the compute dtype the store is laid out for (default auto, as generate picks it)",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(handler=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    """`mobile-moe quantize`."""
    if args.offload_dir is not None:
        loaded = load(
            model_dir(args.model, args.quiet), torch.device("cpu"), args.dtype, not args.quiet, args.to, args.group_size, offload_dir=args.offload_dir
        )
        store = loaded.store
        print(f"expert store for {loaded.path}: {store.total_experts} experts ({store.format}, {loaded.dtype_reason}) in {args.offload_dir}")
        return 0
    r = quantize_checkpoint(model_dir(args.model, args.quiet), args.out, args.to, args.group_size, progress=not args.quiet, dense_dtype=args.dense_dtype)
    detail = ", ".join(f"{k} {v}" for k, v in r.expert_format.items() if k not in ("quant_method", "modules"))
    dense = f" and {r.packed_dense} dense linears ({r.dense.name})" if r.dense.name else ""
    print(
        f"packed {r.experts} experts ({detail}): {r.source_expert_bytes / 2**20:.1f} MiB -> {r.packed_expert_bytes / 2**20:.1f} MiB{dense}; written to {r.out}"
    )
    return 0
