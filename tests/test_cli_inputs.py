"""What a new user runs into: the default thread count, the timing line, interrupts, and inputs that must end in one line
and exit status 2 (text that is not UTF-8, configs the engine cannot run, outputs that cannot be written)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, run

from mobile_moe.cli.common import default_threads
from mobile_moe.engine.llm import LLM

REPO = Path(__file__).resolve().parents[1]


def cli(*argv: str, stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line in a fresh interpreter (bytes in, text out), with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mobile_moe", *argv], input=stdin, capture_output=True, env=env, timeout=300)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_threads_leave_a_core_and_defer_to_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() is None


def test_generate_json_reports_threads_and_timings(capsys, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code, out, _ = run(capsys, "generate", "--prompt", "def f(x):", "--max-new-tokens", "4", "--quiet", "--json")
    stats = json.loads(out)["stats"]
    assert code == 0 and stats["threads"] == default_threads() == torch.get_num_threads()
    assert stats["load_s"] > 0 and stats["total_s"] >= stats["prefill_s"] + stats["decode_s"] > 0
    assert stats["prompt_tok_s"] == pytest.approx(stats["prompt_tokens"] / stats["prefill_s"])


def test_the_stats_line_names_threads_load_prompt_and_decode_speed(capsys, restore_threads):
    code, _, err = run(capsys, "generate", "--prompt", "def f(x):", "--max-new-tokens", "4", "--quiet", "--threads", "1")
    line = err.strip().splitlines()[-1]
    assert code == 0 and line.startswith("[big] threads 1, load ")
    for part in ("prompt 5 tokens in", "tok/s)", "4 tokens", "tok/s decode", "total "):
        assert part in line, line


def interrupt_after(monkeypatch, tokens: int) -> None:
    """Deliver SIGINT to this process while generate hands out its `tokens`-th token."""
    real = LLM.generate

    def generate(self, prompt, sampling=None, policy=None, on_token=None):
        seen = []

        def token(t: int) -> bool:
            seen.append(t)
            if len(seen) == tokens:
                signal.raise_signal(signal.SIGINT)
            return on_token(t)

        return real(self, prompt, sampling, policy, token)

    monkeypatch.setattr(LLM, "generate", generate)


def test_an_interrupted_generate_json_prints_what_was_made(capsys, monkeypatch):
    interrupt_after(monkeypatch, 3)
    code, out, err = run(capsys, "generate", "--prompt", "def f(x):", "--max-new-tokens", "20", "--quiet", "--json")
    data = json.loads(out)
    assert code == 130 and "Traceback" not in err
    assert data["finish_reason"] == "cancelled" and len(data["token_ids"]) == 3 and data["stats"]["tokens"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_an_interrupted_generate_ends_its_line_and_prints_the_stats(capsys, monkeypatch):
    interrupt_after(monkeypatch, 3)
    code, out, err = run(capsys, "generate", "--prompt", "def f(x):", "--max-new-tokens", "20", "--quiet")
    assert code == 130 and out.endswith("\n") and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("[big] threads ") and " 3 tokens, " in err


def test_a_prompt_that_is_not_utf8_is_one_line():
    proc = cli("generate", "--prompt", os.fsdecode(b"def f\xff(x):"), "--max-new-tokens", "2", "--quiet")
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode().splitlines() == ["mobile-moe: error: the prompt is not valid UTF-8 text: byte 0xff at character 5"]


def test_chat_refuses_a_line_that_is_not_utf8_and_answers_the_others():
    proc = cli("chat", "--max-new-tokens", "3", "--quiet", stdin=b"def f(x):\nbad \xff line\nx = 1\n")
    errors = [line for line in proc.stderr.decode().splitlines() if line.startswith("mobile-moe")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr.decode()
    assert errors == ["mobile-moe: error: the message is not valid UTF-8 text: byte 0xff at character 4; nothing was sent to the model"]
    assert proc.stdout.decode().count("> ") == 4  # three prompts and the one at the end of input: both text lines were answered


def test_generate_refuses_a_lone_surrogate_from_the_api():
    with pytest.raises(Exception, match="lone surrogate U\\+D800 at character 1"):
        LLM().encode("a\ud800b")
