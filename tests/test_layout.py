"""The package's layering (docs/design.md §7): lower layers never import higher ones, and only the transfer module owns
CUDA streams and events."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mobile_moe"
RANK = {  # a module may import only from packages of its rank or below
    "config": 0, "errors": 0, "jsonio": 0, "__init__": 6, "__main__": 6,  # the package itself: the public facade
    "layers": 1,
    "models": 2, "experts": 2, "policy": 2,
    "loading": 3,
    "engine": 4,
    "eval": 5, "bench": 5, "serve": 5, "chat": 5,
    "cli": 6, "cluster": 6,  # cluster: Ray Serve replicas of the server, built from the CLI's flags
}  # fmt: skip


def _part(module: str) -> str:
    """The top-level part of a `mobile_moe.*` module name (a package, or a module at the top)."""
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def _imports(path: Path) -> list[str]:
    """The `mobile_moe.*` modules a file imports (at any depth of the file: function-level imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mobile_moe"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("mobile_moe")]
    return found


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if part == "demo_model":
            continue
        for module in _imports(path):
            target = _part(module)
            if target in RANK and RANK[target] > RANK[part]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong


def test_only_the_transfer_module_owns_cuda_streams_and_events():
    owners = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(call in path.read_text() for call in ("torch.cuda.Stream(", "torch.cuda.stream(", "torch.cuda.Event("))
    )
    assert owners == ["experts/transfer.py"], owners
