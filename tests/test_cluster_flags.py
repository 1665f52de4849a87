"""`mobile-moe serve --replicas`: flags that cannot run are one line and exit status 2, before Ray starts (ray installed or not)."""

from __future__ import annotations

import sys

import pytest

from mobile_moe.cli import main


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--replicas", "0"], "--replicas must be >= 1, got 0"),
        (["--ray-address", "auto"], "--ray-address and --max-replicas need --replicas"),
        (["--max-replicas", "3"], "--ray-address and --max-replicas need --replicas"),
        (["--replicas", "2", "--max-replicas", "1"], "--max-replicas 1 is below --replicas 2"),
        (["--replicas", "2", "--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_bad_replica_flags_are_one_line(flags, message, capsys):
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"mobile-moe: error: {message}\n"


def test_replicas_without_ray_name_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it raises ImportError
    for name in [m for m in sys.modules if m == "mobile_moe.cluster" or m.startswith("mobile_moe.cluster.")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["serve", "--replicas", "2"]) == 2
    assert capsys.readouterr().err == "mobile-moe: error: --replicas needs the [cluster] extra: pip install 'mobile-moe[cluster]' (ray is missing)\n"
