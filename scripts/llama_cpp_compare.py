"""Decode and prefill speed of mobile-moe against llama.cpp's llama-bench on the same weights, rounds interleaved.

llama.cpp is a measuring tool here, not a dependency: build it yourself and pass its bin directory (the one holding
llama-bench). Each `--ours NAME=key:value,...` is one mobile-moe engine on `--model` (keys are `engine_config`'s:
expert_dtype, dense_dtype, dtype, compile, expert_cache, ...; expert_cache:all keeps every expert resident, as llama.cpp
holds the whole model); each `--llama NAME=FILE.gguf` is llama-bench on that GGUF. Every round runs each system once,
starting one system later each round: ours decodes `--new-tokens` after an 8-token prompt and prefills a
`--prompt-tokens` prompt (fresh random ids every time, so no prefix is reused); llama-bench runs `-p P -n N -r 1`.
Bytes per token: ours from the loaded model (dense as packed, one embedding row, top-k experts per MoE layer);
llama.cpp's from the GGUF's tensor sizes the same way (needs the `gguf` package: `pip install gguf`, or llama.cpp's
gguf-py on PYTHONPATH). Prints a table of medians and every round, llama.cpp's speed over ours (the median of each round's ratio: the
machine's load moves both alike within a round), and writes `--json`.
Usage: python scripts/llama_cpp_compare.py LLAMA_BIN --model DIR --ours int4=expert_dtype:int4,dense_dtype:int4,expert_cache:all
       --llama q4_0=DIR/q4_0.gguf --threads 2 --rounds 3 --prompt-tokens 512 --new-tokens 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

DECODE_PROMPT = 8  # tokens before ours decodes (llama-bench's tg starts from an empty context)


def refuse(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit status 2."""
    print(f"llama_cpp_compare: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_value(text: str) -> object:
    """An engine_config value from its spelling: ints, true/false, or the string."""
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def parse_ours(spec: str) -> tuple[str, dict]:
    """`NAME=key:value,...` -> (NAME, engine_config keywords); `NAME=` alone is the default engine."""
    name, _, rest = spec.partition("=")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition(":")
        if not sep:
            refuse(f"--ours {spec!r}: options are key:value")
        options[key] = parse_value(value)
    return name, options


def gguf_bytes_per_token(path: Path) -> dict:
    """Dense and expert bytes one decode step reads from a GGUF: every non-expert tensor (one row of an untied embedding),
    and top-k of n experts' share of the stacked expert tensors."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    n_expert = reader.fields[f"{arch}.expert_count"].contents()
    top_k = reader.fields[f"{arch}.expert_used_count"].contents()
    tensors = {t.name: t for t in reader.tensors}
    experts = sum(int(t.n_bytes) for name, t in tensors.items() if "_exps." in name) * top_k / n_expert
    dense = sum(int(t.n_bytes) for name, t in tensors.items() if "_exps." not in name)
    emb = tensors["token_embd.weight"]
    if "output.weight" in tensors:  # untied: decoding reads one embedding row
        dense -= int(emb.n_bytes) - int(emb.n_bytes) // int(emb.shape[-1])
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {"dense_bytes_per_token": dense, "expert_bytes_per_token": experts, "tensor_types": types}


def llama_bench(binary: Path, gguf_file: Path, threads: int, prompt: int, new: int) -> dict:
    """One llama-bench run (`-r 1`): prefill and decode tok/s, and what it says about the build."""
    cmd = [str(binary), "-m", str(gguf_file), "-t", str(threads), "-p", str(prompt), "-n", str(new), "-r", "1", "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        refuse(f"llama-bench failed on {gguf_file}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    rows = json.loads(done.stdout)
    prefill = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    decode = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    info = {k: prefill.get(k) for k in ("cpu_info", "backends", "build_commit", "model_type", "model_size", "n_threads")}
    return {"prefill_tok_s": prefill["avg_ts"], "decode_tok_s": decode["avg_ts"], "info": info}


class Ours:
    """One mobile-moe engine on the checkpoint, timed through `LLM.generate` with the big policy (the exact model)."""

    def __init__(self, model: str, options: dict, seed: int) -> None:
        from mobile_moe import LLM, engine_config

        opts = dict(options)
        if opts.get("expert_cache") == "all":
            opts["expert_cache"] = total_experts(model)
        started = time.perf_counter()
        self.llm = LLM(model, engine_config(progress=False, **opts))
        if opts.get("expert_cache") == self.llm.loaded.store.total_experts:
            self.llm.cache.load_all()
        self.load_s = time.perf_counter() - started
        self.options, self.seed, self.calls = opts, seed, 0

    def _ids(self, n: int) -> list[int]:
        """n fresh random token ids (a new draw each call: no prompt repeats, so no prefix is reused)."""
        import torch

        self.calls += 1
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.calls)
        return torch.randint(2, self.llm.loaded.model.vocab_size, (n,), generator=gen).tolist()

    def _run(self, prompt: int, new: int):
        """Stats of one greedy request of `prompt` random ids and `new` tokens, EOS ignored."""
        from mobile_moe import PolicyConfig, SamplingParams

        out = self.llm.generate(self._ids(prompt), SamplingParams(max_new_tokens=new, stop_at_eos=False), PolicyConfig("big"))
        if out.stats.reused_tokens:
            refuse("a prompt reused a held prefix; the timing would not be a prefill")
        return out.stats

    def round(self, prompt: int, new: int) -> dict:
        """Decode tok/s of `new` tokens after a short prompt, then prefill tok/s of a `prompt`-token prompt."""
        decode = self._run(DECODE_PROMPT, new)
        prefill = self._run(prompt, 1)
        return {"prefill_tok_s": prefill.prompt_tok_s, "decode_tok_s": decode.decode_tok_s, "threads": decode.threads}

    def warm_up(self) -> None:
        """One short request: first-call costs (kernel selection, compiling) stay out of the rounds."""
        self._run(64, 4)

    def describe(self) -> dict:
        """Paths and bytes per decoded token."""
        from mobile_moe.bench.roofline import dense_read_bytes

        loaded = self.llm.loaded
        info = loaded.model.info
        return {
            "options": self.options,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "expert_format": str(loaded.store.format),
            "dense_path": loaded.dense_path,
            "dense_bytes_per_token": dense_read_bytes(loaded.model),
            "expert_bytes_per_token": info.top_k * len(info.moe_layers) * loaded.store.expert_bytes,
            "load_s": self.load_s,
        }


def total_experts(model: str) -> int:
    """Routed experts in the checkpoint (every MoE layer's), for expert_cache:all."""
    import torch

    from mobile_moe.loading.checkpoint import read_config
    from mobile_moe.models.registry import build_model

    with torch.device("meta"):
        info = build_model(read_config(Path(model))).info
    return info.num_experts * len(info.moe_layers)


def cpu_features() -> dict:
    """What the CPU and torch's kernels offer, as the docs report them."""
    import torch

    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split() if Path("/proc/cpuinfo").exists() else []
    return {
        "avx512_bf16": "avx512_bf16" in flags,
        "avx2": "avx2" in flags,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "processor": platform.processor() or platform.machine(),
    }


def run_rounds(systems: dict, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every system once per round, starting one later each round."""
    names = list(systems)
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            system = systems[name]
            if isinstance(system, Ours):
                result = system.round(args.prompt_tokens, args.new_tokens)
            else:
                result = llama_bench(args.llama_bin / "llama-bench", system, args.threads, args.prompt_tokens, args.new_tokens)
            rounds[name].append(result)
            print(f"round {r + 1} {name}: decode {result['decode_tok_s']:.2f} tok/s, prefill {result['prefill_tok_s']:.2f} tok/s", flush=True)
    return rounds


def summarize(rounds: dict[str, list[dict]], described: dict[str, dict]) -> dict[str, dict]:
    """Per system: medians, every round, and bytes per token."""
    out = {}
    for name, results in rounds.items():
        decode, prefill = [r["decode_tok_s"] for r in results], [r["prefill_tok_s"] for r in results]
        out[name] = {
            **described[name],
            "decode_tok_s": statistics.median(decode),
            "prefill_tok_s": statistics.median(prefill),
            "decode_rounds": decode,
            "prefill_rounds": prefill,
        }
    return out


def print_table(summary: dict[str, dict], ours: list[str], llama: list[str]) -> None:
    """Medians, rounds and bytes per token per system, then llama.cpp's speed over ours for every pair."""
    print(f"\n{'system':<22} {'decode tok/s':>12} {'prefill tok/s':>13} {'dense MB/tok':>12} {'experts MB/tok':>14}  rounds (decode | prefill)")
    for name, s in summary.items():
        rounds = " ".join(f"{v:.2f}" for v in s["decode_rounds"]) + " | " + " ".join(f"{v:.1f}" for v in s["prefill_rounds"])
        print(
            f"{name:<22} {s['decode_tok_s']:>12.2f} {s['prefill_tok_s']:>13.1f} {s['dense_bytes_per_token'] / 1e6:>12.1f} "
            f"{s['expert_bytes_per_token'] / 1e6:>14.1f}  {rounds}"
        )
    for theirs in llama:
        for mine in ours:
            r = ratios(summary[theirs], summary[mine])
            each = " ".join(f"{d:.2f}/{q:.2f}" for d, q in zip(r["decode_rounds"], r["prefill_rounds"]))
            print(f"{theirs} / {mine}: decode {r['decode']:.2f}x, prefill {r['prefill']:.2f}x (medians of each round's ratio; rounds decode/prefill: {each})")


def ratios(theirs: dict, mine: dict) -> dict:
    """llama.cpp's speed over ours, round by round (the two ran minutes apart, under the same load), and the medians."""
    decode = [a / b for a, b in zip(theirs["decode_rounds"], mine["decode_rounds"])]
    prefill = [a / b for a, b in zip(theirs["prefill_rounds"], mine["prefill_rounds"])]
    return {"decode": statistics.median(decode), "prefill": statistics.median(prefill), "decode_rounds": decode, "prefill_rounds": prefill}


def main() -> None:
    """Check the inputs, load every system, run the rounds, report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("llama_bin", type=Path, help="llama.cpp's bin directory (with llama-bench)")
    p.add_argument("--model", required=True, help="checkpoint directory the GGUFs were converted from")
    p.add_argument("--ours", action="append", default=[], help="NAME=key:value,... (engine_config keywords)")
    p.add_argument("--llama", action="append", default=[], help="NAME=FILE.gguf")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (args.llama_bin / "llama-bench").is_file():
        refuse(f"no llama-bench in {args.llama_bin} (build llama.cpp and pass its bin directory)")
    llama = dict(spec.partition("=")[::2] for spec in args.llama)
    for name, file in llama.items():
        if not Path(file).is_file():
            refuse(f"--llama {name}: no file {file}")
    try:
        import gguf  # noqa: F401 - checked before the long loads
    except ImportError:
        refuse("no `gguf` package (pip install gguf, or put llama.cpp's gguf-py on PYTHONPATH)")
    import torch

    torch.set_num_threads(args.threads)
    systems: dict = {}
    described: dict[str, dict] = {}
    for spec in args.ours:
        name, options = parse_ours(spec)
        systems[name] = Ours(args.model, options, args.seed)
        systems[name].warm_up()
        described[name] = systems[name].describe()
        print(f"{name}: loaded in {described[name]['load_s']:.0f} s, {described[name]['dense_path']}", flush=True)
    for name, file in llama.items():
        systems[name] = Path(file)
        described[name] = {"gguf": file, **gguf_bytes_per_token(Path(file))}
    rounds = run_rounds(systems, args)
    for name in llama:
        described[name]["llama_bench"] = rounds[name][0].pop("info")
        for r in rounds[name][1:]:
            r.pop("info")
    summary = summarize(rounds, described)
    report = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "cpu": cpu_features(), "args": vars(args) | {"llama_bin": str(args.llama_bin)}}
    report["args"]["json"] = str(args.json)
    report["systems"] = summary
    report["ratios"] = {f"{t}/{m}": ratios(summary[t], summary[m]) for t in llama for m in (parse_ours(s)[0] for s in args.ours)}
    print(f"{args.threads} threads, {report['cpu']}")
    print_table(summary, [parse_ours(s)[0] for s in args.ours], list(llama))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
