"""Prompts cut out of source text: a function's signature and first body line, with the real next line."""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_LINES = 6  # lines of the file kept before the `def` line


@dataclass(frozen=True)
class Prompt:
    """A prompt (ending without a newline) and the line that really follows it."""

    text: str
    next_line: str


def _candidates(text: str) -> list[Prompt]:
    """Every `def` whose first body line and next line exist and are non-blank."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines[:-2]):
        if line.lstrip().startswith("def ") and line.rstrip().endswith(":") and lines[i + 1].strip() and lines[i + 2].strip():
            context = lines[max(0, i - CONTEXT_LINES) : i + 2]
            found.append(Prompt("\n".join(context), lines[i + 2]))
    return found


def cut_prompts(texts: list[str], max_prompts: int) -> list[Prompt]:
    """Up to max_prompts prompts spread evenly (deterministically) over all candidates in the texts."""
    pool = [p for text in texts for p in _candidates(text)]
    if len(pool) <= max_prompts:
        return pool
    step = len(pool) / max_prompts
    return [pool[int(i * step)] for i in range(max_prompts)]


def predicted_next_line(continuation: str) -> str | None:
    """The first full line the model wrote after the prompt's last line, or None if it never got there."""
    lines = continuation.split("\n")
    return lines[1] if len(lines) > 1 else None
