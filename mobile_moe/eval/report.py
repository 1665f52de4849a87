"""Terminal tables and the tau plot for evaluation results."""

from __future__ import annotations

from pathlib import Path

from mobile_moe.errors import InvalidParameter


def runs_table(runs: list[dict]) -> str:
    """Fixed-width table of policy runs."""
    w = max([5] + [len(r.get("variant", "")) for r in runs])
    head = (
        f"{'policy':<8} {'criterion':<9} {'knobs':<{w}} {'tau':>6} {'agree':>7} {'95% CI':>15} {'overall':>8} {'exact':>7} {'next-line':>10} {'fallback':>9} "
        f"{'loads/tok':>9} {'vs big':>7}"
    )
    rows = [head, "-" * len(head)]
    for r in runs:
        tau = "" if r["tau"] is None else f"{r['tau']:.4g}"
        lo, hi = r.get("agreement_ci") or (r["agreement"], r["agreement"])
        rows.append(
            f"{r['policy']:<8} {r.get('criterion') or '':<9} {r.get('variant', ''):<{w}} {tau:>6} {r['agreement']:>7.2%} "
            f"{f'{lo:.1%}-{hi:.1%}':>15} {r['agreement_overall']:>8.1%} {r['exact_match']:>7.1%} "
            f"{r['next_line_exact']:>10.1%} {r['fallback_rate']:>9.1%} {r.get('loads_per_token', 0.0):>9.2f} {r.get('loads_vs_big', 1.0):>6.2f}x"
        )
    return "\n".join(rows)


def learned_table(report: dict) -> str:
    """Which signals the learned criterion relies on: standardised weight and each signal's own AUC."""
    rows = [
        f"learned criterion fitted on {report['steps']} decode steps ({report['differs']} where little differs from big): AUC {report['auc']:.3f}",
        f"  {'signal':<14} {'weight':>8} {'AUC alone':>10}",
    ]
    ranked = sorted(report["features"].items(), key=lambda item: -abs(item[1]["weight"]))
    rows += [f"  {name:<14} {f['weight']:>+8.3f} {f['auc_alone']:>10.3f}" for name, f in ranked]
    return "\n".join(rows)


def plot_quality(report: dict, path: Path) -> None:
    """PNG of mobile's agreement and fallback rate against tau, the agreement-vs-expert-loads frontier of every
    criterion and knob, and perplexity against tau, with big and little for reference."""
    plt = _pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.3))
    _plot_tau_panel(ax1, report)
    _plot_frontier(ax2, report)
    _plot_perplexity(ax3, report)
    fig.suptitle(f"{Path(report['model']).name} on {report['data']} ({report['prompts']} prompts x {report['new_tokens']} tokens)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sources(reports: list[dict], path: Path) -> None:
    """PNG with one panel per source: agreement (95% CI bars) against expert loads per token relative to big for big,
    little and mobile at each tau, the calibrated tau's point ringed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(5.2 * len(reports), 4.3), squeeze=False)
    for ax, report in zip(axes[0], reports):
        _plot_frontier(ax, report)
        ax.set_title(f"{report['data']}: {report['prompts']} prompts x {report['new_tokens']} tokens", fontsize=8)
    fig.suptitle(f"{Path(reports[0]['model']).name}: agreement with big against expert loads, per source", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    """matplotlib's pyplot on a file backend, or a one-line error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidParameter("--plot needs matplotlib: pip install 'mobile-moe[plot]'") from None
    return plt


def _series(report: dict) -> dict[tuple[str, str], list[dict]]:
    """Mobile runs grouped by (criterion, variant), each sorted by tau."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in report["runs"]:
        if r["policy"] == "mobile":
            groups.setdefault((r["criterion"], r.get("variant", "")), []).append(r)
    return {key: sorted(runs, key=lambda r: r["tau"]) for key, runs in groups.items()}


def _plot_tau_panel(ax, report: dict) -> None:
    """Agreement and fallback rate of the report's criterion (no knobs) against tau."""
    mobile = _series(report).get((report["criterion"], ""), [])
    little = next(r for r in report["runs"] if r["policy"] == "little")
    taus = [r["tau"] for r in mobile]
    ax.plot(taus, [r["agreement"] for r in mobile], "o-", label="mobile: agreement with big")
    ax.plot(taus, [r["fallback_rate"] for r in mobile], "s-", label="mobile: fallback rate")
    ax.axhline(little["agreement"], color="gray", ls="--", label="little: agreement with big")
    if report.get("calibrated_tau") is not None:
        ax.axvline(report["calibrated_tau"], color="green", ls=":", label="calibrated tau")
    ax.set_xlabel(f"tau ({report['criterion']})"), ax.set_ylim(0, 1.02), ax.legend(fontsize=7), ax.set_title("greedy agreement and fallback", fontsize=9)


def _plot_frontier(ax, report: dict) -> None:
    """Agreement against expert loads per token relative to big, one line per criterion and knob setting."""
    slots, total = report.get("cache_slots"), report.get("total_experts")
    calibrated = report.get("calibrated_tau")
    for (criterion, variant), runs in _series(report).items():
        x, y = [r["loads_vs_big"] for r in runs], [r["agreement"] for r in runs]
        errors = [[r["agreement"] - r["agreement_ci"][0] for r in runs], [r["agreement_ci"][1] - r["agreement"] for r in runs]]
        ax.errorbar(x, y, yerr=errors, fmt="o-", ms=3, capsize=2, label=f"mobile {criterion} {variant}".strip())
        for r in runs:
            ax.annotate(f"{r['tau']:g}", (r["loads_vs_big"], r["agreement"]), fontsize=6, xytext=(3, -8), textcoords="offset points")
            if criterion == report["criterion"] and calibrated is not None and r["tau"] == calibrated:
                ax.plot(r["loads_vs_big"], r["agreement"], "o", ms=11, mfc="none", mec="green", mew=1.5, label=f"calibrated tau {calibrated:g}")
    for r in report["runs"]:
        if r["policy"] == "little":
            ax.plot(r["loads_vs_big"], r["agreement"], "v", ms=7, label=f"little {r.get('variant', '')}".strip())
    ax.plot(1.0, 1.0, "k*", ms=9, label="big")
    ax.set_xlabel(f"expert loads per token relative to big (cache {slots} of {total} experts)")
    ax.set_ylabel("greedy agreement with big"), ax.legend(fontsize=7), ax.set_title("frontier: agreement vs bytes moved", fontsize=9)
    if slots is not None and slots >= (total or 0):
        ax.text(0.5, 0.5, "every expert is cached: no loads to compare\n(run eval with --expert-cache N)", transform=ax.transAxes, ha="center", fontsize=8)


def _plot_perplexity(ax, report: dict) -> None:
    """Teacher-forced perplexity of mobile against tau with big and little as lines, or big and little as bars when
    the criterion has no teacher-forced estimate (it needs the router's signals)."""
    ppl = report["perplexity"]
    mob = sorted((float(t), v) for t, v in ppl.get("mobile", {}).items())
    title = f"held-out perplexity ({ppl['tokens']} tokens from {ppl.get('files', '?')} files)"
    if not mob:
        ax.bar(["big", "little"], [ppl["big"], ppl["little"]], color=["black", "gray"])
        ax.set_ylim(min(ppl["big"], ppl["little"]) * 0.98, max(ppl["big"], ppl["little"]) * 1.01)
        ax.set_ylabel("perplexity"), ax.set_title(title, fontsize=9)
        return
    ax.plot([t for t, _ in mob], [v for _, v in mob], "o-", label="mobile (teacher-forced estimate)")
    ax.axhline(ppl["big"], color="black", ls="--", label="big")
    ax.axhline(ppl["little"], color="gray", ls="--", label="little")
    ax.set_xlabel("tau"), ax.set_ylabel("perplexity"), ax.legend(fontsize=7), ax.set_title(title, fontsize=9)
