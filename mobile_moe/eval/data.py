"""Evaluation text: the demo corpus's splits or user-given files and directories."""

from __future__ import annotations

from pathlib import Path

from mobile_moe.errors import InvalidParameter
from mobile_moe.eval import corpus

DEFAULT_GLOB = "*.py"


def read_texts(paths: list[Path] | None, default_split: str, pattern: str = DEFAULT_GLOB) -> tuple[list[str], str]:
    """(texts, description): files matching `pattern` under directories in `paths` (files given by name are read as they
    are), or the demo corpus split when none are given. The description says how many files were read and skipped."""
    if not paths:
        return corpus.load_split(default_split), f"stdlib:{default_split}"
    texts: list[str] = []
    skipped = 0
    for path in paths:
        if not path.exists():
            raise InvalidParameter(f"data path not found: {path}")
        files = sorted(p for p in path.rglob(pattern) if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                texts.append(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                skipped += 1  # binary or unreadable files are not text to evaluate on
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidParameter(f"no readable {pattern} text in {', '.join(map(str, paths))}")
    where = ", ".join(map(str, paths)) if len(paths) <= 3 else f"{paths[0]} and {len(paths) - 1} more paths"
    return texts, f"{where} ({len(texts)} {pattern} files read, {skipped} unreadable skipped)"
