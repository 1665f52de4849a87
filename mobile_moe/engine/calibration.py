"""The calibrated MoBiLE threshold stored next to a model (mobile_moe.json)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

CALIBRATION_FILE = "mobile_moe.json"
DEFAULT_TAU = 0.9


def calibrated_tau(model_dir: Path) -> float | None:
    """The tau written by `mobile-moe calibrate`, if any."""
    file = model_dir / CALIBRATION_FILE
    if not file.is_file():
        return None
    try:
        tau = json.loads(file.read_text()).get("tau")
    except (json.JSONDecodeError, AttributeError):
        return None
    return float(tau) if isinstance(tau, (int, float)) else None


def write_calibration(model_dir: Path, record: dict) -> Path:
    """Atomically write the calibration record next to the model."""
    file = model_dir / CALIBRATION_FILE
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".mobile_moe.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, file)
    return file
