"""The documents a newcomer reads: a short README that starts with the two set-up commands, docs/ whose links resolve,
and a CLI reference that names every flag the parser defines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mobile_moe.cli import build_parser
from mobile_moe.models.registry import SUPPORTED

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKDOWN = [README, *sorted(DOCS.glob("*.md"))]
README_LIMIT = 12_000  # characters: what it is, how to start, one command per task, links; the rest lives in docs/
INSTALL_AND_GENERATE = 'pip install . && mobile-moe generate --prompt "def fibonacci(n):"'

FENCE = re.compile(r"^(`{3,})[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^()\s]+)\)")


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks, in order."""
    return [m.group(2) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (where links and headings live)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def readme_commands() -> list[str]:
    """The lines of the README's first code block."""
    return [line.strip() for line in code_blocks(README.read_text())[0].strip().splitlines()]


def test_readme_is_short():
    assert len(README.read_text()) <= README_LIMIT, "move detail into docs/ and link it"


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text()
    assert text.index("```") < text.index("\n## "), "the set-up commands come before the first section"
    install, test = readme_commands()
    assert install == INSTALL_AND_GENERATE
    assert test.startswith('pip install -e ".[dev]" && ') and test.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    test = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in (line.strip() for line in ci), f".ci/run must run the README's test command: {test}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    """Every relative link names a file of the repository, and an anchor one of that file's headings."""
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or ROOT not in dest.parents:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_hand_kept_test_counts(path: Path):
    """A count of tests goes stale with the next test; pytest prints the real one."""
    assert not re.search(r"\b\d[\d,]* tests\b", path.read_text())


def test_every_supported_architecture_is_documented():
    readme, design = README.read_text(), (DOCS / "design.md").read_text()
    for model_type in SUPPORTED:
        assert f"`{model_type}`" in readme, model_type
        assert re.search(rf"^\| [^|]*`{model_type}`", design, re.M), f"{model_type} has no row in design.md's routing table"


def test_cli_reference_names_every_flag():
    """docs/cli.md lists each command's flags in its own section or in the shared engine and policy flags."""
    sections = re.split(r"^## ", (DOCS / "cli.md").read_text(), flags=re.M)
    by_title = {s.split("\n", 1)[0].strip(): s for s in sections}
    shared = by_title["Engine flags"] + by_title["Policy flags"]
    commands = next(a for a in build_parser()._actions if a.choices and isinstance(a.choices, dict)).choices
    missing = []
    for name, parser in commands.items():
        assert name in by_title, f"docs/cli.md has no section for {name}"
        for action in parser._actions:
            for flag in (o for o in action.option_strings if o.startswith("--") and o != "--help"):
                if not re.search(rf"`{re.escape(flag)}[ `=]", by_title[name] + shared):
                    missing.append(f"{name} {flag}")
    assert not missing, f"flags missing from docs/cli.md: {missing}"
