"""Evaluation text: the demo corpus's splits or user-given files and directories."""

from __future__ import annotations

from pathlib import Path

from mobile_moe.errors import InvalidParameter
from mobile_moe.eval import corpus


def read_texts(paths: list[Path] | None, default_split: str) -> tuple[list[str], str]:
    """(texts, description): the files under `paths`, or the demo corpus split when none are given."""
    if not paths:
        return corpus.load_split(default_split), f"stdlib:{default_split}"
    texts: list[str] = []
    for path in paths:
        if not path.exists():
            raise InvalidParameter(f"data path not found: {path}")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                texts.append(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue  # binary or unreadable files are not text to evaluate on
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidParameter(f"no readable text in {', '.join(map(str, paths))}")
    return texts, ", ".join(map(str, paths))
