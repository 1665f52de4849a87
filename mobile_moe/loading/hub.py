"""`--model ORG/NAME[@REVISION]`: a Hugging Face hub id resolved to a snapshot directory in the standard HF cache.

Only what the engine reads is fetched (config, safetensors weights and index, tokenizer and chat template), and
config.json comes first so an unsupported architecture is refused before any weights are downloaded. The cache,
token and offline switches are huggingface_hub's own (HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE), read when
a model is resolved rather than only when huggingface_hub was imported. Every failure is one line naming what went
wrong, as a CheckpointError (or UnsupportedArchitecture / InvalidParameter).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    DisabledRepoError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars, validate_repo_id

from mobile_moe.errors import CheckpointError, InvalidParameter, MobileMoeError, UnsupportedArchitecture
from mobile_moe.models.registry import check_supported

# What the engine reads from a checkpoint: nothing else (other weight formats, images, READMEs) is downloaded.
ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template*",
    "*.jinja",
)
# ORG/NAME with an optional @REVISION (a branch, tag or commit; may hold '/', e.g. refs/pr/1). The first character
# is alphanumeric or '_', so '/...', './...' and '~/...' are always paths.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*)(?:@(?P<revision>[^@\s]+))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
ConfigCheck = Callable[[Path], None]  # a snapshot directory holding config.json -> raises MobileMoeError to refuse it
TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment flag


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the hub could not be reached", from whichever HTTP clients are installed."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)), ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


CONNECTION_ERRORS = _connection_errors()


def parse_hub_id(model: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `model` reads as ORG/NAME[@REVISION], else None (then it is a path)."""
    m = HUB_ID.fullmatch(model)
    if m is None:
        return None
    try:
        validate_repo_id(m["repo"])
    except HFValidationError:
        return None
    return m["repo"], m["revision"]


def resolve_model(model: str | Path, progress: bool = True, check_config: ConfigCheck | None = None) -> Path:
    """The checkpoint directory `model` names: an existing local path as given; a str reading ORG/NAME[@REVISION]
    downloaded (or found in the HF cache) as a hub snapshot; anything else returned as a path for the loader to
    report as missing. A Path object is always a path. `check_config` sees the snapshot directory holding only
    config.json, before any weights are fetched (e.g. that the model will fit in RAM)."""
    path = Path(model)
    if isinstance(model, Path) or path.exists():
        return path
    parsed = parse_hub_id(model)
    if parsed is None:
        return path
    return download(*parsed, progress=progress, check_config=check_config)


def hub_cache_dir() -> str:
    """huggingface_hub's cache folder as the environment names it now (its constants module reads the
    environment once, at import), by the same rules: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    home = os.path.expandvars(
        os.path.expanduser(os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")))
    )
    return os.path.expandvars(os.path.expanduser(os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub read it at import."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return (flag or "").upper() in TRUE or bool(constants.HF_HUB_OFFLINE)


def download(repo_id: str, revision: str | None = None, progress: bool = True, check_config: ConfigCheck | None = None) -> Path:
    """The local snapshot of `repo_id` at `revision`: config.json first (refusing an unsupported architecture, then
    whatever `check_config` refuses), then the weights, tokenizer and chat template. Offline, only the cache is read,
    with no network call."""
    spec = repo_id if revision is None else f"{repo_id}@{revision}"
    offline = hub_offline()
    common = dict(cache_dir=hub_cache_dir(), local_files_only=offline)
    with _progress_bars(progress):
        try:
            config_file = Path(hf_hub_download(repo_id, "config.json", revision=revision, **common))
            check_architecture(config_file, spec)
            if check_config is not None:
                check_config(config_file.parent)
            # the snapshot of the very commit config.json came from, even if the branch moves meanwhile
            commit = config_file.parent.name if COMMIT.fullmatch(config_file.parent.name) else revision
            snapshot = Path(snapshot_download(repo_id, revision=commit, allow_patterns=list(ALLOW_PATTERNS), **common))
        except MobileMoeError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to one line below, or re-raised if not a hub failure
            mapped = hub_error(e, repo_id, revision, offline)
            if mapped is e:
                raise
            raise mapped from None
    return snapshot


def check_architecture(config_file: Path, spec: str) -> None:
    """Refuse an unsupported model_type from the config alone, before any weights are fetched."""
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config.json of {spec} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json of {spec} is not a JSON object")
    try:
        check_supported(raw.get("model_type"), raw.get("architectures"))
    except UnsupportedArchitecture as e:
        raise UnsupportedArchitecture(f"{spec}: {e}") from None


def hub_error(e: BaseException, repo: str, revision: str | None, offline: bool) -> BaseException:
    """One-line MobileMoeError for a huggingface_hub failure while resolving repo@revision; other exceptions unchanged."""
    spec = repo if revision is None else f"{repo}@{revision}"
    if isinstance(e, GatedRepoError):
        return CheckpointError(f"{spec} is a gated repository: request access on https://huggingface.co/{repo} and set HF_TOKEN (or run `hf auth login`)")
    if isinstance(e, RepositoryNotFoundError):
        return CheckpointError(f"{spec}: repository not found on the Hugging Face hub (if it is private, set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return CheckpointError(f"{spec}: revision {revision or constants.DEFAULT_REVISION!r} not found in {repo}")
    if isinstance(e, DisabledRepoError):
        return CheckpointError(f"{spec}: the repository is disabled on the Hugging Face hub")
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        incomplete = "incomplete" in str(e)
        what = f"the cached snapshot of {spec} is incomplete" if incomplete else f"{spec} is not cached"
        if offline or isinstance(e, OfflineModeIsEnabled) or isinstance(e.__cause__, OfflineModeIsEnabled):
            return CheckpointError(f"{what} and the hub is offline (HF_HUB_OFFLINE=1); download it once with network access")
        return CheckpointError(f"{what} and the Hugging Face hub cannot be reached (no network?)")
    if isinstance(e, EntryNotFoundError):
        return CheckpointError(f"{spec} has no config.json (not a transformers checkpoint)")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return CheckpointError(f"{spec}: access denied by the Hugging Face hub (HTTP {status}; check HF_TOKEN)")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return CheckpointError(f"{spec}: Hugging Face hub request failed: {first}")
    if isinstance(e, CONNECTION_ERRORS):
        return CheckpointError(f"{spec} is not cached and the Hugging Face hub cannot be reached ({type(e).__name__})")
    if isinstance(e, HFValidationError):
        return InvalidParameter(f"{spec}: {' '.join(str(e).split())}")
    return e


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's own download bars, silenced for the call when progress is off (HF_HUB_DISABLE_PROGRESS_BARS wins)."""
    if enabled or are_progress_bars_disabled():
        yield
        return
    with warnings.catch_warnings():  # it warns, and keeps bars on, when HF_HUB_DISABLE_PROGRESS_BARS=0 is set
        warnings.simplefilter("ignore")
        disable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable_progress_bars()
