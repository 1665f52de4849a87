"""The calibrated MoBiLE threshold stored next to a model (mobile_moe.json), and the bundled demo model."""

from __future__ import annotations

import json
from pathlib import Path

from mobile_moe.jsonio import write_json_atomic

CALIBRATION_FILE = "mobile_moe.json"
DEFAULT_TAU = 0.9
DEFAULT_FALLBACK_RATE = 0.2
DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo_model"


def read_calibration(model_dir: Path) -> dict:
    """The record written by `mobile-moe calibrate`, or {} when there is none (or it is unreadable)."""
    try:
        record = json.loads((model_dir / CALIBRATION_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def calibrated_tau(model_dir: Path, criterion: str) -> float | None:
    """The tau written by `mobile-moe calibrate`, if it was calibrated for this criterion."""
    record = read_calibration(model_dir)
    tau = record.get("tau")
    if record.get("criterion", "max_prob") != criterion or not isinstance(tau, (int, float)):
        return None
    return float(tau)


def calibrated_criterion(model_dir: Path) -> str | None:
    """The importance criterion `mobile-moe calibrate` chose, if any."""
    criterion = read_calibration(model_dir).get("criterion")
    return criterion if isinstance(criterion, str) else None


def demo_fallback_rate() -> float:
    """The fallback rate measured on the demo model at its calibrated tau (benchmarks on random weights replay it)."""
    rate = read_calibration(DEMO_MODEL).get("fallback_rate")
    return float(rate) if isinstance(rate, (int, float)) else DEFAULT_FALLBACK_RATE


def write_calibration(model_dir: Path, record: dict) -> Path:
    """Atomically write the calibration record next to the model."""
    return write_json_atomic(model_dir / CALIBRATION_FILE, record)
