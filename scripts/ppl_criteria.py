"""Teacher-forced: how close each importance criterion keeps mobile's perplexity to big's at a fixed fallback rate.

For each source, windows of its files are scored teacher-forced by big and by little (little's step signals at every
position); each criterion is fitted on the other sources (leave-one-source-out) and ranks the held-out positions;
the top share f falls back to big. Prints, per held-out source and f in 20/25/30%, mobile's perplexity excess over
big and the share of positions whose greedy token matches big's, then the fallback share each criterion needs for
<= 1% excess. "oracle KL" ranks by the true KL(big || little), which no little-only criterion can know: it bounds
what ranking positions can reach. Usage: python scripts/ppl_criteria.py stdlib SITE/numpy SITE/httpx SITE/sympy/solvers
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from compare_criteria import demo_llm, named_texts  # this directory's sibling script

from mobile_moe import LLM
from mobile_moe.eval.learned import StepData, fit
from mobile_moe.eval.quality import PPL_WINDOW, sample_windows
from mobile_moe.policy.importance import SIGNALS, differs_probability, step_signals

Positions = dict[str, torch.Tensor]  # sig [N, S], big / little log-prob of the true token [N], differs [N], kl [N]
Ranker = Callable[[Positions], Callable[[Positions], torch.Tensor]]  # fit on some positions -> score others (high: fall back)
EXCESS = 0.01


def score_source(llm: LLM, texts: list[str], tokens: int) -> Positions:
    """Teacher-forced big and little over `tokens` positions of windows drawn from the texts (seed 1: not eval's windows)."""
    eos, k = list(llm.eos_token_ids[:1]), llm.runner.default_little_k
    rows: dict[str, list[torch.Tensor]] = {"sig": [], "big": [], "little": [], "differs": [], "kl": []}
    for _, ids in sample_windows([llm.encode(t) + eos for t in texts], PPL_WINDOW, tokens, seed=1):
        target = torch.tensor(ids[1:])[:, None]
        big = llm.logits(ids[:-1], "big").float().log_softmax(-1)  # [T, V]
        little, gates = llm.routed_logits(ids[:-1], "little")
        little = little.float().log_softmax(-1)
        rows["sig"].append(torch.stack([step_signals(r, g, k) for r, g in zip(little, gates)]).double())
        rows["big"].append(big.gather(1, target)[:, 0].double())
        rows["little"].append(little.gather(1, target)[:, 0].double())
        rows["differs"].append(big.argmax(-1) != little.argmax(-1))
        rows["kl"].append((big.exp() * (big - little)).sum(-1).double())
    return {name: torch.cat(parts) for name, parts in rows.items()}


def logistic(label: Callable[[Positions], torch.Tensor]) -> Ranker:
    """The `learned` criterion's logistic fit on all signals, to the given label."""

    def train(p: Positions) -> Callable[[Positions], torch.Tensor]:
        learned = fit(StepData(p["sig"], label(p)), SIGNALS)
        return lambda q: differs_probability(q["sig"].float(), learned).double()

    return train


def ridge_kl(p: Positions) -> Callable[[Positions], torch.Tensor]:
    """Ridge regression of KL(big || little) on the standardised signals."""
    mean, scale = p["sig"].mean(0), p["sig"].std(0).clamp_min(1e-6)
    design = lambda q: torch.cat([(q["sig"] - mean) / scale, torch.ones(len(q["sig"]), 1, dtype=torch.float64)], 1)  # noqa: E731
    x = design(p)
    w = torch.linalg.solve(x.T @ x + 1e-2 * len(x) * torch.eye(x.shape[1], dtype=torch.float64), x.T @ p["kl"])
    return lambda q: design(q) @ w


RANKERS: dict[str, Ranker] = {
    "logistic(differs) (shipped)": logistic(lambda p: p["differs"]),
    "logistic(KL > 0.05)": logistic(lambda p: p["kl"] > 0.05),
    "ridge(KL)": ridge_kl,
    "oracle KL (not knowable)": lambda p: lambda q: q["kl"],
}


def row(score: torch.Tensor, held: Positions) -> str:
    """Excess / greedy match at 20, 25, 30% fallbacks, and the fallbacks needed for <= EXCESS, of one ranking."""
    order = score.argsort(descending=True)
    gap = held["big"] - held["little"]  # log-likelihood big gains at each position
    cells = []
    for f in (0.20, 0.25, 0.30):
        fell = torch.zeros(len(score), dtype=torch.bool)
        fell[order[: int(f * len(score))]] = True
        excess = math.exp(float(gap[~fell].sum()) / len(score)) - 1
        cells.append(f"{excess:+.2%}/{1 - float((held['differs'] & ~fell).double().mean()):.1%}")
    reach = (gap.sum() - torch.cumsum(gap[order], 0) <= math.log1p(EXCESS) * len(score)).nonzero()
    need = (int(reach[0]) + 1) / len(score) if len(reach) else 1.0
    return " ".join(cells) + f" | {need:.0%}"


def main() -> None:
    """Score each source, then print every ranker's held-out figures per source."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="'stdlib' (the demo corpus's validation split) or a file/directory of .py files")
    parser.add_argument("--tokens", type=int, default=4096, help="teacher-forced positions per source")
    args = parser.parse_args()
    llm = demo_llm()
    data = {}
    for source in args.sources:
        name, texts = named_texts(source)
        data[name] = p = score_source(llm, texts, args.tokens)
        print(
            f"{name}: {len(p['big'])} positions, little's greedy token differs at {float(p['differs'].double().mean()):.1%}, "
            f"ppl big {math.exp(-float(p['big'].mean())):.3f} little {math.exp(-float(p['little'].mean())):.3f}"
        )
    print(f"held out: ppl excess over big / greedy match at 20%, 25%, 30% fallbacks | fallbacks for <= {EXCESS:.0%} excess")
    for name, train in RANKERS.items():
        for held in data:
            rest = {key: torch.cat([data[s][key] for s in data if s != held]) for key in data[held]}
            print(f"{name:<30} {held:<10} {row(train(rest)(data[held]), data[held])}")


if __name__ == "__main__":
    main()
