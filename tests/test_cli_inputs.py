"""What a new user runs into: the default thread count, the timing line, interrupts, and inputs that must end in one line
and exit status 2 (text that is not UTF-8, configs the engine cannot run, outputs that cannot be written)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, run
from test_serve import free_port

from mobile_moe.cli.common import default_threads
from mobile_moe.engine.calibration import DEMO_MODEL
from mobile_moe.engine.llm import LLM
from mobile_moe.errors import CheckpointError
from mobile_moe.loading.checkpoint import read_config

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


def demo_copy(tmp_path: Path, edit=None) -> Path:
    """A copy of the demo model whose config.json `edit` changes in place."""
    dst = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL, dst)
    if edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda c: c.update(num_experts_per_tok=99), "routes each token to 99 experts of 64: num_experts_per_tok must be 1 to 64 (its num_local_experts)"),
        (lambda c: c.update(num_experts_per_tok=0), "routes each token to 0 experts of 64"),
        (lambda c: c.pop("hidden_size"), "lacks 'hidden_size'"),
        (lambda c: c.pop("model_type"), "lacks 'model_type'"),
    ],
)
def test_a_config_the_engine_cannot_run_is_refused_when_read(tmp_path, capsys, edit, needle):
    model = demo_copy(tmp_path, edit)
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        read_config(model)  # what every load (generate, chat, eval, bench, the server) reads first
    for command in (["generate", "--prompt", "x"], ["serve", "--port", str(free_port())]):  # a server never starts on it
        code, out, err = run(capsys, *command, "--model", str(model), "--quiet")
        assert_one_line_error(code, err, needle)
        assert out == ""


def test_a_calibration_file_that_is_not_json_is_named(tmp_path, capsys):
    model = demo_copy(tmp_path)
    (model / "mobile_moe.json").write_text("{not json")
    code, _, err = run(capsys, "generate", "--model", str(model), "--prompt", "x", "--policy", "mobile", "--quiet")
    assert_one_line_error(code, err, f"{model / 'mobile_moe.json'} is not valid JSON")


@pytest.mark.parametrize(
    "name, needle",
    [
        ("out.txt", "--plot out.txt: give a file name ending in an image format matplotlib writes"),
        ("out", "give a file name ending in an image format"),
        ("missing/out.png", "cannot write --plot {tmp}/missing/out.png: directory {tmp}/missing does not exist"),
    ],
)
@pytest.mark.parametrize("command", [["eval"], ["bench", "--batch", "1"]])
def test_a_plot_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys, monkeypatch, name, needle, command):
    monkeypatch.chdir(tmp_path)
    path = name if name == "out" or name == "out.txt" else str(tmp_path / name)
    code, out, err = run(capsys, *command, "--plot", path, "--quiet")
    assert_one_line_error(code, err, needle.format(tmp=tmp_path))
    assert out == "" and not (tmp_path / "missing").exists()


def test_a_store_built_for_int4_names_the_flag(tmp_path, capsys):
    store = str(tmp_path / "store")
    argv = ["generate", "--prompt", "x", "--max-new-tokens", "1", "--quiet", "--offload-dir", store]
    assert run(capsys, *argv, "--expert-dtype", "int4")[0] == 0
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "holds this checkpoint's experts stored for --expert-dtype int4: add --expert-dtype int4 to use it")


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "bench", "serve"])
def test_tau_outside_0_1_is_refused_by_every_command(capsys, command):
    code, out, err = run(capsys, command, "--policy", "mobile", "--tau", "1.5", "--quiet", *(["--prompt", "x"] if command == "generate" else []))
    assert_one_line_error(code, err, "--tau must be in [0, 1] (a confidence), got 1.5")
    assert out == ""


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--tau", "0.5"], "--tau applies to --policy mobile or exact only, not big"),
        (["--criterion", "margin"], "--criterion applies to --policy mobile or exact only, not big"),
        (["--little-k", "2"], "--little-k applies to --policy little, mobile or exact only, not big"),
        (["--kv-repair", "1"], "--kv-repair applies to --policy mobile only, not big"),
        (["--partial-fallback", "0.5"], "--partial-fallback applies to --policy mobile only, not big"),
        (["--policy", "little", "--kv-repair", "0"], "--kv-repair applies to --policy mobile only, not little"),
    ],
)
def test_a_knob_for_another_policy_is_refused_alike_by_generate_chat_and_serve(capsys, command, flags, needle):
    code, out, err = run(capsys, command, *flags, "--quiet", *(["--prompt", "x"] if command == "generate" else []))
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_rollback_with_sampling_is_refused(capsys, command):
    flags = ["--policy", "mobile", "--kv-repair", "2", "--rollback", "--temperature", "0.7", "--quiet"]
    code, _, err = run(capsys, command, *flags, *(["--prompt", "x"] if command == "generate" else []))
    assert_one_line_error(code, err, "--rollback checks little's tokens against big's greedy choice: it needs --temperature 0, got 0.7")


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_taus_outside_0_1_are_refused(capsys, command):
    with pytest.raises(SystemExit) as exited:
        run(capsys, command, "--taus", "0.5,1.5", "--quiet")
    assert_one_line_error(exited.value.code, capsys.readouterr().err, "taus must be in [0, 1] (confidences), got '0.5,1.5'")


@pytest.mark.parametrize("size", ["0", "-8", "12", "1"])
@pytest.mark.parametrize("command", [["quantize", "--to", "int4", "--out", "unused"], ["generate", "--prompt", "x", "--expert-dtype", "int4"]])
def test_group_size_must_be_a_power_of_two(tmp_path, capsys, monkeypatch, size, command):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *command, "--group-size", size, "--quiet")
    assert_one_line_error(code, err, f"--group-size must be a power of two >= 2 (e.g. 64), got {size}")
    assert not (tmp_path / "unused").exists()


def test_the_server_refuses_a_request_by_the_same_rules():
    import httpx
    from test_serve import serving

    with serving(LLM()) as (url, _):
        for body, needle in (
            ({"policy": "big", "tau": 0.5}, "tau applies to policy mobile or exact only, not big"),
            ({"criterion": "margin"}, "criterion applies to policy mobile or exact only, not big"),  # the server's default policy is big
            ({"policy": "mobile", "tau": 1.5}, "tau must be in [0, 1] (a confidence), got 1.5"),
        ):
            reply = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, **body}, timeout=60)
            assert reply.status_code == 400 and reply.json()["error"]["message"] == needle


def test_version_answers_without_importing_torch():
    code = "import sys; from mobile_moe.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.splitlines() == [f"mobile-moe 0.1.0 (torch {torch.__version__})", "0 False"], proc.stdout + proc.stderr


def test_the_package_loads_llm_when_first_asked_for():
    import mobile_moe

    assert mobile_moe.LLM is LLM and mobile_moe.engine_config.__module__ == "mobile_moe.engine.llm"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mobile_moe.nope  # noqa: B018
