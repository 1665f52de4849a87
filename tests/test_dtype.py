"""`--dtype auto`: bf16 on CPUs with native bf16 for models bound by memory, float32 elsewhere, said in one line; a
calibration fitted in another dtype is named when used."""

from __future__ import annotations

import json
import logging
import shutil

import torch
from conftest import open_llm
from test_datapath import Records

from mobile_moe.loading.loader import AUTO_BF16_MIN_PARAMS, auto_cpu_dtype, load


def test_a_cpu_without_native_bf16_falls_back_to_float32_with_a_note():
    dtype, why = auto_cpu_dtype(7_000_000_000, native_bf16=False)
    assert dtype == torch.float32 and "no native bf16" in why and "--dtype bfloat16" in why  # large: the measured alternative named
    assert "--dtype" not in auto_cpu_dtype(AUTO_BF16_MIN_PARAMS - 1, native_bf16=False)[1]


def test_a_large_model_on_a_bf16_cpu_computes_in_bf16():
    assert auto_cpu_dtype(AUTO_BF16_MIN_PARAMS, native_bf16=True)[0] == torch.bfloat16
    dtype, why = auto_cpu_dtype(AUTO_BF16_MIN_PARAMS - 1, native_bf16=True)
    assert dtype == torch.float32 and "parameters" in why


def test_auto_on_a_tiny_checkpoint_stays_float32_and_says_why(checkpoints):
    loaded = load(checkpoints["olmoe"], torch.device("cpu"), "auto", progress=False)
    assert loaded.dtype == torch.float32 and loaded.dtype_reason.startswith("float32")
    assert load(checkpoints["olmoe"], torch.device("cpu"), "bfloat16", progress=False).dtype == torch.bfloat16


def test_a_calibration_fitted_in_another_dtype_is_named(checkpoints, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(checkpoints["olmoe"], model)
    (model / "mobile_moe.json").write_text(json.dumps({"version": 2, "dtype": "bfloat16", "tau": 0.9, "criterion": "max_prob"}))
    log, seen = logging.getLogger("mobile_moe"), Records()  # the CLI stops this logger propagating: listen on it directly
    log.addHandler(seen)
    try:
        open_llm(model)
    finally:
        log.removeHandler(seen)
    assert [r.getMessage() for r in seen.records if "fitted in bfloat16" in r.getMessage() and "running in float32" in r.getMessage()]
