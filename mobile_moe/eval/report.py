"""Terminal tables and the tau plot for evaluation results."""

from __future__ import annotations

from pathlib import Path

from mobile_moe.errors import InvalidParameter


def runs_table(runs: list[dict]) -> str:
    """Fixed-width table of policy runs."""
    head = (f"{'policy':<8} {'criterion':<9} {'tau':>6} {'agree':>7} {'95% CI':>15} {'overall':>8} {'exact':>7} {'next-line':>10} {'fallback':>9} "
            f"{'loads/tok':>9} {'vs big':>7}")
    rows = [head, "-" * len(head)]
    for r in runs:
        tau = "" if r["tau"] is None else f"{r['tau']:.4g}"
        lo, hi = r.get("agreement_ci") or (r["agreement"], r["agreement"])
        rows.append(
            f"{r['policy']:<8} {r.get('criterion') or '':<9} {tau:>6} {r['agreement']:>7.2%} {f'{lo:.1%}-{hi:.1%}':>15} {r['agreement_overall']:>8.1%} {r['exact_match']:>7.1%} "
            f"{r['next_line_exact']:>10.1%} {r['fallback_rate']:>9.1%} {r.get('loads_per_token', 0.0):>9.2f} {r.get('loads_vs_big', 1.0):>6.2f}x"
        )
    return "\n".join(rows)


def learned_table(report: dict) -> str:
    """Which signals the learned criterion relies on: standardised weight and each signal's own AUC."""
    rows = [f"learned criterion fitted on {report['steps']} decode steps ({report['differs']} where little differs from big): AUC {report['auc']:.3f}",
            f"  {'signal':<14} {'weight':>8} {'AUC alone':>10}"]
    ranked = sorted(report["features"].items(), key=lambda item: -abs(item[1]["weight"]))
    rows += [f"  {name:<14} {f['weight']:>+8.3f} {f['auc_alone']:>10.3f}" for name, f in ranked]
    return "\n".join(rows)


def plot_taus(report: dict, path: Path) -> None:
    """PNG of mobile's agreement, fallback rate and perplexity against tau, with big and little for reference."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidParameter("--plot needs matplotlib: pip install 'mobile-moe[plot]'") from None
    mobile = sorted((r for r in report["runs"] if r["policy"] == "mobile"), key=lambda r: r["tau"])
    little = next(r for r in report["runs"] if r["policy"] == "little")
    taus = [r["tau"] for r in mobile]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(taus, [r["agreement"] for r in mobile], "o-", label="mobile: agreement with big")
    ax1.plot(taus, [r["fallback_rate"] for r in mobile], "s-", label="mobile: fallback rate")
    ax1.axhline(little["agreement"], color="gray", ls="--", label="little: agreement with big")
    if report.get("calibrated_tau") is not None:
        ax1.axvline(report["calibrated_tau"], color="green", ls=":", label="calibrated tau")
    ax1.set_xlabel("tau"), ax1.set_ylim(0, 1.02), ax1.legend(fontsize=8), ax1.set_title("greedy agreement and fallback")
    ppl = report["perplexity"]
    mob = sorted((float(t), v) for t, v in ppl.get("mobile", {}).items())
    ax2.plot([t for t, _ in mob], [v for _, v in mob], "o-", label="mobile (teacher-forced estimate)")
    ax2.axhline(ppl["big"], color="black", ls="--", label="big")
    ax2.axhline(ppl["little"], color="gray", ls="--", label="little")
    ax2.set_xlabel("tau"), ax2.set_ylabel("perplexity"), ax2.legend(fontsize=8), ax2.set_title("held-out perplexity")
    fig.suptitle(f"{Path(report['model']).name} on {report['data']} ({report['prompts']} prompts)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
