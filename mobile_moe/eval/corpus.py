"""The demo corpus: the Python standard library's own source, split deterministically by file.

Every machine with Python has it, so the demo model's training and held-out evaluation data is
reproducible anywhere; :func:`corpus_hash` pins exactly which files and bytes were used.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
SPLITS = ("train", "validation", "test")


def stdlib_root() -> Path:
    """The directory of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _relative(path: Path) -> str:
    """The posix path of `path` relative to the stdlib root."""
    return path.relative_to(stdlib_root()).as_posix()


def _is_excluded(relative_path: str) -> bool:
    """Whether a relative path lies inside a test or third-party directory."""
    return any(part in EXCLUDED_DIRS for part in relative_path.split("/")[:-1])


def _is_utf8(path: Path) -> bool:
    """Whether the file's bytes decode as UTF-8."""
    try:
        path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


def _walk_py_files(root: Path) -> list[Path]:
    """Every `.py` file under `root`, not descending into excluded directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return found


def stdlib_sources() -> list[Path]:
    """The stdlib's non-test, UTF-8 `.py` files, sorted by relative posix path."""
    candidates = sorted(_walk_py_files(stdlib_root()), key=_relative)
    return [p for p in candidates if p.is_file() and not _is_excluded(_relative(p)) and _is_utf8(p)]


def split_of(relative_path: str) -> str:
    """The split ('train', 'validation' or 'test') a file belongs to, from a hash of its path."""
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < 90:
        return "train"
    return "validation" if bucket < 95 else "test"


def split_files(name: str) -> list[Path]:
    """The files of one split, in sorted path order."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    return [p for p in stdlib_sources() if split_of(_relative(p)) == name]


def load_split(name: str) -> list[str]:
    """The texts of one split's files, in sorted path order."""
    return [p.read_text(encoding="utf-8") for p in split_files(name)]


def corpus_hash() -> str:
    """sha256 over every file's relative path and content, in order: the corpus's identity."""
    digest = hashlib.sha256()
    for path in stdlib_sources():
        digest.update(_relative(path).encode("utf-8"))
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()
