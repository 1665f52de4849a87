"""Calibration across sources: per-source taus, the strictest of them, leave-one-source-out, pooled intervals."""

from __future__ import annotations

import json

from mobile_moe import LLM, engine_config
from mobile_moe.cli import main
from mobile_moe.config import PolicyConfig
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.eval.evaluate import EvalSettings, calibrate_sources
from mobile_moe.eval.quality import Run
from mobile_moe.eval.sources import calibrate_across, pool, split_source

TAUS = (0.1, 0.2, 0.3, 0.4)


def run(tau: float, matches: int, every: int, prompts: int = 40, fallback: float | None = None) -> Run:
    """A mobile run whose prompts each match `matches` tokens; every `every`-th prompt then diverges."""
    per_prompt = tuple((matches, int(i % every == 0)) for i in range(prompts))
    judged = sum(m + d for m, d in per_prompt)
    agreement = sum(m for m, _ in per_prompt) / judged
    return Run(
        "mobile",
        tau,
        "margin",
        agreement,
        agreement,
        0.0,
        0.0,
        tau if fallback is None else fallback,
        judged,
        agreement_ci=(agreement - 0.01, agreement + 0.01),
        judged_tokens=judged,
        decode_steps=prompts * (matches + 1),
        per_prompt=per_prompt,
    )


def source(needs: float) -> list[Run]:
    """A source at 99.5% agreement from tau `needs` on, 95% below it (judging fewer tokens: 800 against 3980)."""
    return [run(t, 99, 2) if t >= needs else run(t, 19, 1) for t in TAUS]


def test_the_final_tau_is_the_strictest_per_source_one_and_leave_one_out_uses_the_others():
    runs = {"a": source(0.1), "b": source(0.2), "c": source(0.3)}
    cal = calibrate_across(runs, None, {"a": 40, "b": 40, "c": 40}, target=0.99, rule="point")
    rows = {r.source: r for r in cal.rows}
    assert [rows[s].tau_alone for s in "abc"] == [0.1, 0.2, 0.3] and cal.final_tau == 0.3
    assert all(rows[s].at_final.tau == 0.3 for s in "abc")
    # held out: c alone needs 0.3, but a and b pooled choose 0.2, which c misses; a gets the tau b and c need
    assert rows["c"].tau_from_others == 0.2 and rows["c"].held_out.agreement < 0.99
    assert rows["a"].tau_from_others == 0.3 and rows["a"].held_out.agreement > 0.99
    lo, hi = cal.pooled.agreement_ci
    assert lo <= cal.pooled.agreement <= hi and lo < hi  # the bootstrap over every source's prompts brackets the estimate
    assert cal.pooled.judged_tokens == 3 * runs["a"][2].judged_tokens  # at tau 0.3 every source judged the same tokens


def test_no_final_tau_when_some_source_never_meets_the_target():
    runs = {"a": source(0.1), "b": [run(t, 19, 1) for t in TAUS]}
    cal = calibrate_across(runs, None, {"a": 40, "b": 40}, target=0.99, rule="point")
    assert cal.final_tau is None and cal.pooled is None and cal.rows[1].tau_alone is None


def test_pooling_weights_sources_by_their_judged_tokens_and_steps():
    a, b = run(0.2, 99, 2, prompts=10, fallback=0.1), run(0.2, 9, 1, prompts=30, fallback=0.5)
    both = pool([a, b])
    matches = sum(m for m, _ in a.per_prompt + b.per_prompt)
    judged = sum(m + d for m, d in a.per_prompt + b.per_prompt)
    assert both.agreement == matches / judged
    assert abs(both.fallback_rate - (0.1 * a.decode_steps + 0.5 * b.decode_steps) / (a.decode_steps + b.decode_steps)) < 1e-12


def test_calibrate_across_sources_end_to_end(tmp_path):
    sources = {}
    for name in ("one", "two", "three"):
        folder = tmp_path / name
        folder.mkdir()
        body = "\n".join(f"def {name}_{i}(x):\n    y = x + {i}\n    return y * {i + 1}\n" for i in range(6))
        (folder / "code.py").write_text(body)
        sources[name] = folder
    llm = LLM(DEMO_MODEL, engine_config(progress=False, dtype="float32"))  # has a tokenizer: prompts are cut from text
    settings = EvalSettings(taus=(0.0, 2.0), max_prompts=3, new_tokens=6, progress=False)
    texts = {name: [(folder / "code.py").read_text()] for name, folder in sources.items()}
    policies = [PolicyConfig("mobile", criterion="margin"), PolicyConfig("mobile", criterion="learned")]
    cals, chosen, _ = calibrate_sources(llm, texts, settings, policies, target=0.99, grid=False, rule="point")
    assert [c.criterion for c in cals] == ["margin", "learned"] and len(cals[1].rows) == 3
    margin = cals[0]
    assert all(r.tau_alone is not None for r in margin.rows)  # tau 2 (always big) agrees fully
    assert margin.final_tau == max(r.tau_alone for r in margin.rows) and all(r.held_out is not None for r in margin.rows)
    assert chosen is not None and chosen.pooled.fallback_rate <= margin.pooled.fallback_rate
    out = tmp_path / "cal.json"
    code = main(
        [
            "calibrate",
            "--quiet",
            "--source",
            str(sources["one"]),
            "--source",
            str(sources["two"]),
            "--criteria",
            "margin",
            "--taus",
            "0,1",
            "--max-prompts",
            "3",
            "--new-tokens",
            "4",
            "--target-agreement",
            "0.99",
            "--rule",
            "point",
            "--output",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    assert code == 0 and record["criterion"] == "margin" and [s["source"] for s in record["sources"][0]["sources"]] == ["one", "two"]
    assert main(["calibrate", "--source", str(sources["one"]), "--output", str(tmp_path / "x.json"), "--quiet"]) == 2  # one file: no split


def test_one_source_is_split_at_random_by_file_with_a_note(tmp_path, capsys):
    folder = tmp_path / "only"
    folder.mkdir()
    for i in range(7):
        (folder / f"m{i}.py").write_text(f"def f{i}(x):\n    y = x * {i}\n    return y + {i}\n")
    parts = split_source("only", [f"text {i}" for i in range(7)])
    assert list(parts) == ["only/1", "only/2", "only/3"] and sorted(t for p in parts.values() for t in p) == [f"text {i}" for i in range(7)]
    assert parts == split_source("only", [f"text {i}" for i in range(7)]) and [len(p) for p in parts.values()] == [3, 2, 2]  # seeded
    out = tmp_path / "cal.json"
    code = main(
        [
            "calibrate",
            "--quiet",
            "--source",
            str(folder),
            "--criteria",
            "margin",
            "--taus",
            "0,1",
            "--max-prompts",
            "2",
            "--new-tokens",
            "3",
            "--target-agreement",
            "0.99",
            "--rule",
            "point",
            "--output",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    assert code == 0 and "one source only (only)" in capsys.readouterr().err and "split at random" in record["data"]
    assert [s["source"] for s in record["sources"][0]["sources"]] == ["only/1", "only/2", "only/3"]
