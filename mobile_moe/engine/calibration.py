"""The calibrated MoBiLE threshold stored with a model (mobile_moe.json), policy defaults resolved from it, and the bundled demo model.

A user's own model keeps its calibration beside it. The bundled demo model ships one inside the package;
recalibrating it writes to the user's config directory (`$MOBILE_MOE_CONFIG_DIR`, else
`$XDG_CONFIG_HOME/mobile-moe`, else `~/.config/mobile-moe`), which is then read first: the installed package is never written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from mobile_moe.config import CRITERIA, LearnedImportance, PolicyConfig
from mobile_moe.errors import InvalidParameter
from mobile_moe.jsonio import write_json_atomic
from mobile_moe.policy.importance import SIGNALS

CALIBRATION_FILE = "mobile_moe.json"
DEFAULT_TAU = 0.9
DEFAULT_CRITERION = "max_prob"
DEFAULT_FALLBACK_RATE = 0.2
PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEMO_MODEL = PACKAGE_DIR / "demo_model"


def user_config_dir() -> Path:
    """Where the user's own settings for bundled models live."""
    if os.environ.get("MOBILE_MOE_CONFIG_DIR"):
        return Path(os.environ["MOBILE_MOE_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mobile-moe"


def calibration_path(model_dir: Path) -> Path:
    """Where `calibrate` writes for this model: beside it, or in the user's config directory for a model inside the package."""
    model_dir = Path(model_dir).resolve()
    if model_dir.is_relative_to(PACKAGE_DIR):
        return user_config_dir() / model_dir.name / CALIBRATION_FILE
    return model_dir / CALIBRATION_FILE


def read_calibration(model_dir: Path) -> dict:
    """The record written by `mobile-moe calibrate` (the user's own first), or {} when there is none; one that is not a JSON
    object is an InvalidParameter naming the file.

    Any version's record loads (version 1 held tau and criterion only); one naming an unknown criterion or
    holding a malformed predictor is an InvalidParameter naming the file.
    """
    for path in dict.fromkeys((calibration_path(model_dir), Path(model_dir) / CALIBRATION_FILE)):
        try:
            text = path.read_text()
        except OSError:  # none there
            continue
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidParameter(f"{path} is not valid JSON ({e}); run mobile-moe calibrate again or remove it") from None
        if not isinstance(record, dict):
            raise InvalidParameter(f"{path} must hold a JSON object; run mobile-moe calibrate again or remove it")
        return check_record(record, path)
    return {}


def check_record(record: dict, path: Path) -> dict:
    """The record, after checking its criterion and learned predictor."""
    criterion = record.get("criterion")
    if criterion is not None and criterion not in CRITERIA:
        raise InvalidParameter(f"{path}: unknown criterion {criterion!r} (expected one of {', '.join(CRITERIA)}); run mobile-moe calibrate again")
    repair = record.get("kv_repair", 0)
    if isinstance(repair, bool) or not isinstance(repair, int) or repair < 0:
        raise InvalidParameter(f"{path}: kv_repair must be an integer >= 0, got {repair!r}; run mobile-moe calibrate again")
    little_k = record.get("little_k")
    if little_k is not None and (isinstance(little_k, bool) or not isinstance(little_k, int) or little_k < 1):
        raise InvalidParameter(f"{path}: little_k must be an integer >= 1, got {little_k!r}; run mobile-moe calibrate again")
    if not isinstance(record.get("rollback", False), bool):
        raise InvalidParameter(f"{path}: rollback must be true or false, got {record['rollback']!r}; run mobile-moe calibrate again")
    if "learned" in record or criterion == "learned":
        try:
            learned_from(record)
        except InvalidParameter as e:
            raise InvalidParameter(f"{path}: {e}") from None
    return record


def learned_from(record: dict) -> LearnedImportance:
    """The fitted predictor stored in a calibration record."""
    if "learned" not in record:
        raise InvalidParameter("criterion learned needs a fitted predictor: run mobile-moe calibrate (its default criteria include learned)")
    learned = LearnedImportance.from_dict(record["learned"])
    unknown = [f for f in learned.features if f not in SIGNALS]
    if unknown:
        raise InvalidParameter(f"learned importance uses unknown signals {', '.join(unknown)}")
    return learned


def resolve_policy(policy: PolicyConfig, record: dict) -> PolicyConfig:
    """The policy with an unset criterion, tau, KV repair and little_k taken from a calibration record, else the defaults
    (one rule for CLI, API and server).

    Criterion `learned` also takes the record's fitted predictor unless the policy brings its own; an unset KV repair
    is the one the record's tau was calibrated with (a tau chosen with repair is only right with it), and so are
    rollback and the little model's expert count (None when the record has none: the engine's half of top-k).
    """
    criterion = policy.criterion or _criterion(record) or DEFAULT_CRITERION
    tau = policy.tau if policy.tau is not None else _tau(record, criterion)
    learned = policy.learned
    if criterion == "learned" and learned is None:
        learned = learned_from(record)
    repair = policy.kv_repair if policy.kv_repair is not None else _kv_repair(record)
    rollback = policy.rollback if policy.rollback is not None else bool(record.get("rollback", False)) and repair > 0  # --kv-repair 0: none
    if policy.name == "exact":  # big checks every drafted position: the whole draft is repaired and rolled back
        repair, rollback = policy.draft_window, True
    little_k = policy.little_k if policy.little_k is not None else record.get("little_k")
    return dataclasses.replace(
        policy, criterion=criterion, tau=DEFAULT_TAU if tau is None else tau, learned=learned, kv_repair=repair, rollback=rollback, little_k=little_k
    )


def _kv_repair(record: dict) -> int:
    """The KV repair a record was calibrated with (0 for records before it was stored; checked by `check_record`)."""
    return int(record.get("kv_repair", 0))


def calibrated_tau(record: dict, criterion: str) -> float | None:
    """The tau `mobile-moe calibrate` wrote into a calibration record for this criterion, if any."""
    return _tau(record, criterion)


def _tau(record: dict, criterion: str) -> float | None:
    """The chosen tau when the record chose this criterion, else the criterion's own best tau (records since version 2)."""
    tau = record.get("tau") if record.get("criterion", "max_prob") == criterion else None
    if tau is None and isinstance(record.get("taus"), dict):
        tau = record["taus"].get(criterion)
    return float(tau) if isinstance(tau, (int, float)) else None


def _criterion(record: dict) -> str | None:
    criterion = record.get("criterion")
    return criterion if isinstance(criterion, str) else None


def demo_fallback_rate() -> float:
    """The fallback rate measured on the demo model at its calibrated tau (benchmarks on random weights replay it)."""
    rate = read_calibration(DEMO_MODEL).get("fallback_rate")
    return float(rate) if isinstance(rate, (int, float)) else DEFAULT_FALLBACK_RATE


def write_calibration(model_dir: Path, record: dict, output: Path | None = None) -> Path:
    """Atomically write the calibration record to `output`, else where `calibration_path` says."""
    return write_json_atomic(output or calibration_path(model_dir), record)
