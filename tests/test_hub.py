"""`--model ORG/NAME[@REVISION]`: hub ids resolved through huggingface_hub from a prebuilt offline cache, never the network."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from checkpoints import build_checkpoint
from huggingface_hub import errors as hub_errors

from mobile_moe import LLM, engine_config
from mobile_moe.cli import main
from mobile_moe.config import SamplingParams
from mobile_moe.errors import CheckpointError, InvalidParameter, UnsupportedArchitecture
from mobile_moe.loading import hub
from mobile_moe.loading.hub import parse_hub_id, resolve_model

ARCH = "olmoe"
REPO = "tiny-org/tiny-olmoe"
MAIN = "a" * 40  # commit hashes of the two cached snapshots
V2 = "b" * 40
STEPS = SamplingParams(max_new_tokens=4, stop_at_eos=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny checkpoints of one architecture (different weights): what `main` and `v2` of the repo hold."""
    root = tmp_path_factory.mktemp("hubsrc")
    return {"main": build_checkpoint(ARCH, root / "main", seed=0), "v2": build_checkpoint(ARCH, root / "v2", seed=1)}


def cache_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path | str], refs: tuple[str, ...] = ()) -> Path:
    """Lay `files` out as huggingface_hub's cache holds a download: blobs/<hash>, snapshots/<commit>/<name> -> blob, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # the commit hash, no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sources: dict[str, Path]) -> Path:
    """An offline HF cache (set through the environment after huggingface_hub was imported) holding REPO at main and v2."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for ref, commit in (("main", MAIN), ("v2", V2)):
        cache_snapshot(home / "hub", REPO, commit, {f.name: f for f in sources[ref].iterdir()}, refs=(ref,))
    return home / "hub"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve a name or open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_hub_id_from_offline_cache_generates_as_the_directory(cache, sources):
    """A hub id resolved from a prebuilt offline cache generates the same tokens as the same directory."""
    from_dir = LLM(sources["main"], engine_config(progress=False, expert_cache=4)).generate([5, 6, 7], STEPS).token_ids
    llm = LLM(REPO, engine_config(progress=False, expert_cache=4))
    assert llm.path == cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / MAIN
    assert llm.generate([5, 6, 7], STEPS).token_ids == from_dir
    assert len(from_dir) == 4


def test_cli_generates_from_hub_id(cache, sources, capsys):
    argv = ["generate", "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--quiet", "--json", "--expert-cache", "4"]
    code, by_id, err = run(capsys, *argv, "--model", REPO)
    assert code == 0, err
    code, by_dir, err = run(capsys, *argv, "--model", str(sources["main"]))
    assert code == 0, err
    assert json.loads(by_id)["token_ids"] == json.loads(by_dir)["token_ids"]


def test_revision_selects_its_snapshot(cache, sources):
    snapshots = cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
    assert resolve_model(f"{REPO}@v2", progress=False) == snapshots / V2  # a ref
    assert resolve_model(f"{REPO}@{V2}", progress=False) == snapshots / V2  # a commit hash
    assert resolve_model(f"{REPO}@main", progress=False) == snapshots / MAIN
    want = LLM(sources["v2"], engine_config(progress=False, expert_cache=4)).generate([3, 4], STEPS).token_ids
    assert LLM(f"{REPO}@v2", engine_config(progress=False, expert_cache=4)).generate([3, 4], STEPS).token_ids == want


def test_uncached_id_while_offline_is_one_line(cache, capsys):
    code, _, err = run(capsys, "generate", "--model", "tiny-org/not-here", "--prompt-ids", "1,2", "--quiet")
    line = one_line_error(code, err)
    assert "tiny-org/not-here" in line and "not cached" in line and "offline" in line, line
    code, _, err = run(capsys, "generate", "--model", f"{REPO}@nope", "--prompt-ids", "1,2", "--quiet")  # cached repo, uncached revision
    line = one_line_error(code, err)
    assert f"{REPO}@nope" in line and "not cached" in line and "offline" in line, line


def test_unsupported_architecture_refused_before_weights(cache, monkeypatch, capsys, sources):
    repo = "other-org/llama-tiny"
    cache_snapshot(
        cache,
        repo,
        "c" * 40,
        {"config.json": '{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}', "model.safetensors": sources["main"] / "model.safetensors"},
        refs=("main",),
    )

    def no_snapshot(*args, **kwargs):
        raise AssertionError("weights fetched before the architecture was checked")

    monkeypatch.setattr(hub, "snapshot_download", no_snapshot)
    with pytest.raises(UnsupportedArchitecture, match="architecture 'llama' is not supported"):
        resolve_model(repo)
    code, _, err = run(capsys, "generate", "--model", repo, "--prompt-ids", "1,2", "--quiet")
    line = one_line_error(code, err)
    assert repo in line and "architecture 'llama' is not supported (supported model_type: " in line, line


def test_existing_path_wins_and_non_ids_are_paths(cache, sources, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org").mkdir()
    shutil.copytree(sources["v2"], tmp_path / REPO)  # a local directory spelled like the hub id
    assert resolve_model(REPO) == Path(REPO)
    for spec in ("./tiny-org/missing", "~/tiny-org/missing", "/tiny-org/missing", "a/b/c", "a--b/c", "org/name@"):
        assert parse_hub_id(spec) is None, spec
        assert resolve_model(spec) == Path(spec)
    assert parse_hub_id("Qwen/Qwen1.5-MoE-A2.7B@refs/pr/1") == ("Qwen/Qwen1.5-MoE-A2.7B", "refs/pr/1")
    assert resolve_model(Path("tiny-org/missing")) == Path("tiny-org/missing")  # a Path object is never a hub id
    code, _, err = run(capsys, "generate", "--model", "./tiny-org/missing", "--prompt-ids", "1,2", "--quiet")
    assert "model directory not found" in one_line_error(code, err)


def _http_error(cls: type, status: int, message: str) -> Exception:
    """A huggingface_hub HTTP error as its HTTP client (httpx or httpx2) would carry it."""
    client = importlib.import_module(hub_errors.HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    return cls(message, response=client.Response(status, request=client.Request("GET", "https://huggingface.co/x")))


@pytest.mark.parametrize(
    "make, kind, needles",
    [
        (lambda: _http_error(hub_errors.GatedRepoError, 403, "403 Client Error.\nCannot access gated repo"), CheckpointError, ("gated", "HF_TOKEN")),
        (lambda: _http_error(hub_errors.RepositoryNotFoundError, 404, "404 Client Error.\nRepository Not Found"), CheckpointError, ("repository not found",)),
        (lambda: _http_error(hub_errors.RevisionNotFoundError, 404, "404 Client Error.\nRevision Not Found"), CheckpointError, ("revision 'v9' not found",)),
        (lambda: _http_error(hub_errors.HfHubHTTPError, 500, "500 Server Error.\nInternal"), CheckpointError, ("hub request failed: 500 Server Error.",)),
        (lambda: _http_error(hub_errors.HfHubHTTPError, 401, "401 Client Error."), CheckpointError, ("access denied", "HF_TOKEN")),
        (
            lambda: hub_errors.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"),
            CheckpointError,
            ("is not cached", "cannot be reached"),
        ),
        (lambda: hub_errors.OfflineModeIsEnabled("offline"), CheckpointError, ("is not cached", "offline")),
        (lambda: ConnectionError("connection refused"), CheckpointError, ("cannot be reached", "ConnectionError")),
        (lambda: hub_errors.HFValidationError("Revisions must not contain spaces"), InvalidParameter, ("Revisions must",)),
    ],
)
def test_hub_failures_map_to_one_line(monkeypatch, make, kind, needles):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)

    def fail(*args, **kwargs):
        raise make()

    monkeypatch.setattr(hub, "hf_hub_download", fail)
    with pytest.raises(kind) as info:
        resolve_model("some-org/some-model@v9", progress=False)
    message = str(info.value)
    assert "\n" not in message and "some-org/some-model@v9" in message, message
    for needle in needles:
        assert needle in message, message


def test_unexpected_errors_are_not_swallowed(monkeypatch):
    def fail(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(hub, "hf_hub_download", fail)
    with pytest.raises(KeyError):
        resolve_model("some-org/some-model", progress=False)


def test_call_time_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    assert hub.hub_cache_dir() == str(tmp_path / "home" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub.hub_cache_dir() == str(tmp_path / "elsewhere")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_offline()


def test_a_model_too_big_for_the_ram_is_refused_before_its_weights_are_fetched(cache, monkeypatch, capsys):
    from mobile_moe.loading import loader

    def no_snapshot(*args, **kwargs):
        raise AssertionError("weights fetched before the memory check")

    monkeypatch.setattr(hub, "snapshot_download", no_snapshot)
    monkeypatch.setattr(loader, "available_memory_bytes", lambda: 1024)
    code, _, err = run(capsys, "generate", "--model", REPO, "--prompt-ids", "1,2", "--quiet")
    line = one_line_error(code, err)
    assert "of RAM" in line and "--offload-dir" in line, line
    with pytest.raises(InvalidParameter, match="of RAM"):
        LLM(REPO, engine_config(progress=False))
