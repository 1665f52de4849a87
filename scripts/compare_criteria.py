"""Leave-one-source-out comparison of importance criteria on step signals.

For each source, decode its prompts with a fallback at every step (little's signals, big's label, as `calibrate`
collects them), then for each held-out source fit each criterion on the others and report its AUC at flagging a
step where little's token differs from big's, and the fallback rate it needs so that at most 2% of steps are
missed differing ones. Usage: python scripts/compare_criteria.py stdlib SITE/numpy SITE/httpx SITE/sympy/solvers
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

import mobile_moe
from mobile_moe import LLM, PolicyConfig, engine_config
from mobile_moe.eval.data import read_texts
from mobile_moe.eval.learned import StepData, auc, collect, fit, merge
from mobile_moe.eval.prompts import cut_prompts
from mobile_moe.policy.importance import SIGNALS, differs_probability

Scorer = Callable[[torch.Tensor], torch.Tensor]  # signals [N, S] -> P(differs)-like score [N]
MISSED = 0.02  # the share of all steps allowed to be missed differing ones (~98% agreement)


def needed_fallbacks(score: torch.Tensor, differs: torch.Tensor) -> float:
    """The share of steps sent to big (highest scores first) so that missed differing steps are <= MISSED of all."""
    missed = (differs.sum() - differs[score.argsort(descending=True)].double().cumsum(0)) / len(differs)  # [N]
    return (int((missed <= MISSED).nonzero()[0]) + 1) / len(differs)


def logistic(features: tuple[str, ...]) -> Callable[[StepData], Scorer]:
    """The `learned` criterion's fit on the given signals."""

    def train(data: StepData) -> Scorer:
        learned = fit(data, features)
        return lambda x: differs_probability(x.float(), learned).double()

    return train


def mlp(hidden: int) -> Callable[[StepData], Scorer]:
    """A one-hidden-layer tanh network on all standardised signals (ridge-penalised, L-BFGS, seeded)."""

    def train(data: StepData) -> Scorer:
        mean, scale = data.signals.mean(0), data.signals.std(0).clamp_min(1e-6)
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(len(SIGNALS), hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)).double()
        opt = torch.optim.LBFGS(net.parameters(), max_iter=300, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            opt.zero_grad()
            z = (data.signals - mean) / scale
            value = torch.nn.functional.binary_cross_entropy_with_logits(net(z)[:, 0], data.differs.double())
            value = value + 1e-2 * ((net[0].weight ** 2).sum() + (net[2].weight ** 2).sum())
            value.backward()
            return value

        opt.step(loss)
        return lambda x: net((x - mean) / scale)[:, 0].detach()

    return train


CRITERIA: dict[str, Callable[[StepData], Scorer]] = {
    "margin": lambda data: lambda x: -x[:, SIGNALS.index("margin")],
    "logistic, first 8 signals": logistic(SIGNALS[:8]),
    f"logistic, all {len(SIGNALS)} signals": logistic(SIGNALS),
    "mlp (8 tanh units)": mlp(8),
}


def demo_llm() -> LLM:
    """The bundled demo model in float32 on one thread, as both criterion scripts measure it."""
    torch.set_num_threads(1)
    return LLM(Path(mobile_moe.__file__).parent / "demo_model", engine_config(progress=False, dtype="float32"))


def named_texts(source: str) -> tuple[str, list[str]]:
    """(short name, texts) of a source argument: 'stdlib' (the demo corpus's validation split) or a file/directory."""
    return Path(source).name, read_texts(None if source == "stdlib" else [Path(source)], "validation")[0]


def main() -> None:
    """Collect each source's steps, then print each criterion's held-out AUC and needed fallbacks per source."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="'stdlib' (the demo corpus's validation split) or a file/directory of .py files")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    llm = demo_llm()
    data = {}
    for source in args.sources:
        name, texts = named_texts(source)
        prompts = [llm.encode(p.text) for p in cut_prompts(texts, args.prompts)]
        data[name] = collect(llm, [p for p in prompts if len(p) < llm.max_context - args.new_tokens], args.new_tokens, PolicyConfig("mobile"), progress=False)
        print(f"{name}: {len(data[name].differs)} steps, {float(data[name].differs.double().mean()):.1%} differ")
    print(f"held out: AUC / fallbacks needed for <= {MISSED:.0%} missed steps")
    for name, train in CRITERIA.items():
        cells = []
        for held in data:
            score = train(merge([d for s, d in data.items() if s != held]))(data[held].signals)
            cells.append((auc(score, data[held].differs), needed_fallbacks(score, data[held].differs)))
        row = "  ".join(f"{s} {a:.3f} / {f:.1%}" for s, (a, f) in zip(data, cells))
        print(f"{name:<28} {row}  | mean {sum(a for a, _ in cells) / len(cells):.3f} / {sum(f for _, f in cells) / len(cells):.1%}")


if __name__ == "__main__":
    main()
