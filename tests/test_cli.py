"""The command line: JSON output, and one-line errors with exit status 2 for every kind of bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mobile_moe.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop output of test setup
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def gen(model: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--quiet", *extra]


def test_generate_json_has_ids_and_stats(checkpoints, capsys):
    code, out, _ = run(capsys, *gen(checkpoints["deepseek_v3"], "--json", "--expert-cache", "4", "--policy", "mobile", "--tau", "0.5"))
    assert code == 0
    data = json.loads(out)
    assert len(data["token_ids"]) == 4 and data["text"] is None
    for key in ("prefill_s", "decode_tok_s", "tokens", "fallback_tokens", "expert_hits", "expert_misses", "h2d_bytes", "cache_slots"):
        assert key in data["stats"]
    assert data["stats"]["cache_slots"] == 4 and data["stats"]["tokens"] == 4
    assert data["stats"]["h2d_bytes"] == data["stats"]["expert_misses"] * (3 * 32 * 16 * 4)


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_directory(capsys, tmp_path):
    code, _, err = run(capsys, *gen(tmp_path / "nope"))
    assert_one_line_error(code, err, "model directory not found")


def test_model_that_is_a_file_says_so(capsys, checkpoints):
    weights = checkpoints["olmoe"] / "model.safetensors"
    for argv in (gen(weights), ["quantize", "--model", str(weights), "--to", "int8", "--out", "unused", "--quiet"]):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, f"--model {weights} is a file, not a checkpoint directory")
        assert "not found" not in err


def test_unsupported_architecture_names_supported_ones(capsys, checkpoints, tmp_path):
    dst = tmp_path / "llama"
    shutil.copytree(checkpoints["mixtral"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (dst / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, *gen(dst))
    assert_one_line_error(
        code, err, "'llama' is not supported", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe"
    )


def test_truncated_shard(capsys, checkpoints, tmp_path):
    dst = tmp_path / "trunc"
    shutil.copytree(checkpoints["olmoe"], dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(capsys, *gen(dst))
    assert_one_line_error(code, err, "model.safetensors", "truncated")


def test_missing_shard(capsys, checkpoints, tmp_path):
    from checkpoints import reference_model

    dst = tmp_path / "sharded"
    reference_model(checkpoints["olmoe"]).save_pretrained(dst, max_shard_size="40KB")
    victim = sorted(dst.glob("*.safetensors"))[1]
    victim.unlink()
    code, _, err = run(capsys, *gen(dst))
    assert_one_line_error(code, err, "missing shard", victim.name)


def test_missing_expert_weights(capsys, checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "noexp"
    shutil.copytree(checkpoints["qwen3_moe"], dst)
    weights = load_file(str(dst / "model.safetensors"))
    del weights["model.layers.2.mlp.experts.7.up_proj.weight"]
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run(capsys, *gen(dst))
    assert_one_line_error(code, err, "layer 2 expert 7 up")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--expert-cache", "2"], "too small for one layer's top-4 experts"),
        (["--gpu-memory", "0.0001"], "too small for one layer's top-4 experts"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--tau", "-0.1", "--policy", "mobile"], "tau"),
        (["--expert-cache", "0"], "--expert-cache 0: too small for one layer's top-4 experts (need >= 4 slots)"),
        (["--expert-cache", "1"], "--expert-cache 1: too small for one layer's top-4 experts (need >= 4 slots)"),
        (["--seed", "1" * 24], "seed must be an integer in [0, 2**64)"),
        (["--tau", "0.5"], "--tau applies to --policy mobile or exact only, not big"),
        (["--criterion", "margin", "--policy", "little"], "--criterion applies to --policy mobile or exact only, not little"),
        (["--policy", "mobile", "--criterion", "learned"], "criterion learned needs a fitted predictor"),
        (["--policy", "little", "--layer-adaptive", "1.5"], "layer-adaptive threshold must be in [0, 1]"),
        (["--policy", "little", "--cache-prior", "0.5"], "cache-prior factor must be a finite number >= 1"),
        (["--policy", "mobile", "--kv-repair", "-1"], "kv repair must be an integer >= 0"),
        (["--policy", "mobile", "--kv-repair", "0", "--rollback"], "rollback checks the positions a fallback repairs: it needs kv repair >= 1"),
    ],
)
def test_invalid_parameters(capsys, checkpoints, flags, needle):
    code, _, err = run(capsys, *gen(checkpoints["olmoe"]), *flags)
    assert_one_line_error(code, err, needle)


def test_prompt_longer_than_context(capsys, checkpoints):
    ids = ",".join(["5"] * 300)  # tiny models have 256 positions
    code, _, err = run(capsys, "generate", "--model", str(checkpoints["olmoe"]), "--prompt-ids", ids, "--quiet")
    assert_one_line_error(code, err, "prompt has 300 tokens; it must be shorter than the model's context of 256 tokens")
    assert "--max-context" not in err  # the default 4096 is not what limits


def test_prompt_longer_than_max_context_names_the_flag(capsys, checkpoints):
    ids = ",".join(["5"] * 100)
    code, _, err = run(capsys, "generate", "--model", str(checkpoints["olmoe"]), "--prompt-ids", ids, "--max-context", "64", "--quiet")
    assert_one_line_error(code, err, "prompt has 100 tokens; it must be shorter than --max-context 64 (the model's own context is 256 tokens)")


def test_malformed_prompt_ids_and_text_without_tokenizer(capsys, checkpoints):
    code, _, err = run(capsys, "generate", "--model", str(checkpoints["olmoe"]), "--prompt-ids", "1,x", "--quiet")
    assert_one_line_error(code, err, "--prompt-ids")
    code, _, err = run(capsys, "generate", "--model", str(checkpoints["olmoe"]), "--prompt", "hello", "--quiet")
    assert_one_line_error(code, err, "no tokenizer")
    code, _, err = run(capsys, "generate", "--model", str(checkpoints["olmoe"]), "--prompt-ids", "1,999", "--quiet")
    assert_one_line_error(code, err, "outside the vocabulary")
    code, _, err = run(capsys, "generate", "--model", str(checkpoints["olmoe"]), "--prompt-ids", "-1,2", "--quiet")
    assert_one_line_error(code, err, "prompt token id -1 is outside the vocabulary")


def test_outputs_that_cannot_be_written_fail_before_the_run(capsys, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for argv, needle in (
        (["eval", "--plot", str(a_file / "x.png"), "--quiet"], f"cannot write --plot {a_file / 'x.png'}: {a_file} is not a directory"),
        (["bench", "--json", str(a_file / "x.json"), "--quiet"], f"cannot write --json {a_file / 'x.json'}: {a_file} is not a directory"),
        (["calibrate", "--output", str(a_file / "x.json"), "--quiet"], f"cannot write --output {a_file / 'x.json'}: {a_file} is not a directory"),
        (["calibrate", "--output", str(a_file / "sub" / "x.json"), "--quiet"], f"{a_file} is not a directory"),
        (["bench", "--trace-dir", str(a_file / "traces"), "--quiet"], f"cannot write --trace-dir {a_file / 'traces'}: {a_file} is not a directory"),
        (["bench", "--json", str(tmp_path), "--quiet"], "is a directory"),
        (["bench", "--trace-dir", str(a_file), "--quiet"], "exists and is not a directory"),
    ):
        code, out, err = run(capsys, *argv)
        assert_one_line_error(code, err, needle)
        assert "File exists" not in err
        assert out == ""  # nothing ran


def test_generation_cut_short_by_the_context_says_so(capsys, checkpoints):
    ids = ",".join(["5"] * 250)  # tiny models have 256 positions: room for 6 new tokens
    code, out, err = run(capsys, "generate", "--model", str(checkpoints["olmoe"]), "--prompt-ids", ids, "--max-new-tokens", "20", "--quiet", "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) <= 6
    assert "warning: 250 prompt tokens leave room for 6 of the 20 new tokens asked" in err


def test_console_script_exit_status_and_no_traceback(tmp_path):
    """The installed entry point itself: bad flag value and a bad directory both exit 2 with one line."""
    exe = shutil.which("mobile-moe")
    cmd = [exe] if exe else [sys.executable, "-m", "mobile_moe.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for argv in (["generate", "--model", str(tmp_path), "--prompt-ids", "1"], ["generate", "--top-p", "abc"]):
        proc = subprocess.run(cmd + argv, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_cuda_requested_without_cuda(capsys, checkpoints):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # CI machines do not: the check runs there
    code, _, err = run(capsys, *gen(checkpoints["olmoe"], "--device", "cuda"))
    assert_one_line_error(code, err, "CUDA is not available")


def test_corrupt_config(capsys, checkpoints, tmp_path):
    dst = tmp_path / "badcfg"
    shutil.copytree(checkpoints["olmoe"], dst)
    (dst / "config.json").write_text('{"model_type": "olmoe", ')
    code, _, err = run(capsys, *gen(dst))
    assert_one_line_error(code, err, "config.json", "not valid JSON")


_DELETE = object()


@pytest.mark.parametrize(
    "arch, field, value, needles",
    [
        ("glm4_moe", "n_routed_experts", _DELETE, ("checkpoint lacks", "expert weights")),  # transformers' default (128) is not the checkpoint's
        ("glm4_moe", "use_qk_norm", _DELETE, ("weights the config does not describe", "k_norm")),
        ("ernie4_5_moe", "moe_k", None, ("config.json (ernie4_5_moe) needs a value for 'moe_k'",)),  # the config class accepts null
        ("ernie4_5_moe", "moe_layer_start_index", _DELETE, ("routed expert of layer 0, a dense layer in the config",)),
        ("gpt_oss", "num_local_experts", _DELETE, ("does not fit the config", "expected (128")),  # transformers' default is 128
        ("gpt_oss", "layer_types", ["sliding_attention", "bogus", "full_attention"], ("bogus",)),
    ],
)
def test_config_missing_a_required_field(capsys, checkpoints, tmp_path, arch, field, value, needles):
    dst = tmp_path / arch
    shutil.copytree(checkpoints[arch], dst)
    cfg = json.loads((dst / "config.json").read_text())
    if value is _DELETE:
        del cfg[field]
    else:
        cfg[field] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, *gen(dst))
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("arch", ["qwen3_5_moe_text", "qwen3_5_moe"])
@pytest.mark.parametrize("entry", ["sliding_attention", "bogus"])  # a type transformers knows but Qwen3.5 lacks; one it rejects
def test_unknown_layer_type_is_a_one_line_error(capsys, checkpoints, tmp_path, arch, entry):
    dst = tmp_path / arch
    shutil.copytree(checkpoints[arch], dst)
    cfg = json.loads((dst / "config.json").read_text())
    text = cfg.get("text_config", cfg)  # the full checkpoint nests the text stack's fields
    text["layer_types"] = ["linear_attention", entry, "full_attention"]
    (dst / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, *gen(dst))
    assert_one_line_error(code, err, "layer_types", entry)


def test_a_synthetic_model_too_big_for_memory_is_refused_before_building(capsys, monkeypatch):
    import mobile_moe.cli.bench as bench_command

    monkeypatch.setattr(bench_command, "available_memory_bytes", lambda: 24 * 2**30)  # this project's CPU machines
    code, out, err = run(capsys, "bench", "--synthetic", "olmoe-1b-7b", "--dtype", "float32", "--quiet")  # auto may pick bf16
    assert_one_line_error(code, err, "needs about 54.0 GiB", "24.0 GiB available", "--shrink")
    assert out == ""


def test_bench_table_says_how_mobile_fell_back(capsys):
    code, out, _ = run(
        capsys,
        "bench",
        "--synthetic",
        "qwen3-30b-a3b",
        "--shrink",
        "16",
        "--prompts",
        "1",
        "--new-tokens",
        "3",
        "--rounds",
        "1",
        "--expert-cache",
        "16",
        "--fallback-rate",
        "0.5",
        "--skip-transformers",
        "--quiet",
    )
    assert code == 0
    assert "mobile fell back on 50.0% of decode steps: forced at rate 0.5, evenly spaced" in out


def test_bench_prints_one_slot_plan_line_and_runs_with_it(capsys, checkpoints):
    model = str(checkpoints["olmoe"])  # 3 MoE layers x 16 experts, top-4: bench on cpu without a budget gives a quarter
    code, out, err = run(capsys, "bench", "--model", model, "--plan-only", "--quiet")
    assert code == 0 and err == ""
    assert out.splitlines() == [f"{model} on cpu: 12 of 48 expert slots (0.0 MiB each) (bench's default on cpu without a budget: three quarters offloaded)"]
    code, out, err = run(capsys, "bench", "--model", model, "--prompts", "1", "--new-tokens", "2", "--rounds", "1", "--skip-transformers", "--quiet")
    assert code == 0
    assert [line for line in err.splitlines() if "slots" in line] == [
        f"{model} on cpu: 12 of 48 expert slots (0.0 MiB each) (bench's default on cpu without a budget: three quarters offloaded)"
    ]
    assert ", 12 of 48 slots;" in out.splitlines()[0]  # the table header: the plan it ran with
    code, out, _ = run(capsys, "bench", "--model", model, "--plan-only", "--expert-cache", "8", "--quiet")
    assert out.splitlines() == [f"{model} on cpu: 8 of 48 expert slots (0.0 MiB each)"]  # a flag that sets the slots: no bench default


def test_serve_help_says_its_default_temperature_differs_from_the_cli(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    assert exit_.value.code == 0
    assert "A request without `temperature` samples at temperature 1.0, as OpenAI's API does" in text
    assert "generate and chat, which default to greedy decoding (--temperature 0)" in text


def test_unwritable_outputs_and_bad_or_busy_ports_fail_in_one_line(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for argv, needle in (
            (["quantize", "--to", "int4", "--out", "/proc/q"], "cannot write /proc/q"),
            (["serve", "--port", "99999"], "--port must be between 1 and 65535"),
            (["serve", "--port", port], f"cannot listen on 127.0.0.1:{port}"),
        ):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["generate", "eval", "calibrate"])
def test_threads_sets_torchs_cpu_threads_and_rejects_zero(command, capsys):
    before = torch.get_num_threads()
    try:
        code, _, err = run(capsys, command, "--threads", "0", *(["--prompt-ids", "1,2"] if command == "generate" else []), "--quiet")
        assert_one_line_error(code, err, "--threads must be >= 1, got 0")
        if command == "generate":
            assert run(capsys, "generate", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--threads", "1", "--quiet")[0] == 0
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_version_names_the_package_and_torch(capsys):
    import mobile_moe

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"mobile-moe {mobile_moe.__version__} (torch {torch.__version__})"


def test_a_reader_that_leaves_mid_stream_ends_generate_quietly(monkeypatch, capsys, tmp_path):
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            return sink.fileno()

    with open(tmp_path / "sink", "w") as sink:
        saved = os.dup(sink.fileno())
        monkeypatch.setattr(sys, "stdout", ClosedPipe())
        try:
            code = main(["generate", "--prompt", "def f(x):", "--max-new-tokens", "8", "--quiet"])
        finally:
            os.dup2(saved, sink.fileno())
            os.close(saved)
    assert code == 141 and "Traceback" not in capsys.readouterr().err
