"""Imports flow one way: workflows -> tasks -> stage logic -> models; models/ imports no orchestration/tracking."""
from __future__ import annotations

import ast
from pathlib import Path

FORBIDDEN_IN_MODELS = {"flytekit", "mlflow", "torchx"}
FLYTE_FREE = ["models", "trainer", "common", "tasks/curate/decode.py", "tasks/compress/encode.py",
              "tasks/evaluate/evaluate.py", "tasks/register/registry.py"]


def _imports(path: Path) -> set:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _files(repo: Path, rel: str):
    p = repo / rel
    return [p] if p.is_file() else sorted(p.rglob("*.py"))


def test_models_import_no_orchestration(repo_root):
    files = _files(repo_root, "models")
    assert files
    for f in files:
        bad = _imports(f) & (FORBIDDEN_IN_MODELS | {"tasks", "workflows", "trainer", "common"})
        assert not bad, f"{f.relative_to(repo_root)} imports {bad}"


def test_stage_logic_imports_no_flyte(repo_root):
    for rel in FLYTE_FREE:
        for f in _files(repo_root, rel):
            assert "flytekit" not in _imports(f), f"{f.relative_to(repo_root)} imports flytekit"


def test_required_layout(repo_root):
    for d in ("workflows", "tasks", "models", "containers", "tests"):
        assert (repo_root / d).is_dir(), d
    for f in ("pyproject.toml", "README.md", "Makefile", ".ci/run", "configs/tiny.yaml"):
        assert (repo_root / f).is_file(), f
