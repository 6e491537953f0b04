"""Imports flow one way: workflows -> tasks -> stage logic -> models; models/ imports no orchestration/tracking."""
from __future__ import annotations

import ast
import re
from pathlib import Path

FORBIDDEN_IN_MODELS = {"flytekit", "mlflow", "torchx"}
FLYTE_FREE = ["models", "trainer", "common", "tasks/curate/decode.py", "tasks/compress/encode.py",
              "tasks/evaluate/evaluate.py", "tasks/register/registry.py", "tasks/preference/__init__.py",
              "tasks/preference/labels.py", "tasks/preference/auto.py", "tasks/preference/encode.py",
              "tasks/preference/build.py"]


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


def _module_name(repo: Path, path: Path) -> str:
    rel = path.relative_to(repo).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _repo_modules(repo: Path) -> dict:
    dirs = ("workflows", "tasks", "trainer", "common", "models", "containers")
    return {_module_name(repo, f): f for d in dirs for f in sorted((repo / d).rglob("*.py"))}


def _edges(repo: Path, modules: dict) -> dict:
    """module -> the repository modules it imports anywhere in the file (function-local imports too)."""
    edges = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def test_import_graph_has_no_cycle(repo_root):
    """No module of the repository reaches itself through imports (module level or inside functions)."""
    edges = _edges(repo_root, _repo_modules(repo_root))
    state: dict = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_only_the_device_module_reads_megatron_parallel_state(repo_root):
    """Process groups come from trainer/device.py (the Layout) and roles from the ParallelPlan: nothing else reads
    megatron's parallel_state or tags on parameters."""
    role_tags = ("_tp_sharded", "_tp_partial", "_sp_partial", "_pp_replicated", "_cp_partial")
    for path in _repo_modules(repo_root).values():
        text = path.read_text()
        rel = path.relative_to(repo_root).as_posix()
        if rel != "trainer/device.py":
            assert not re.search(r"parallel_state\.|import parallel_state|parallel_state import", text), \
                f"{rel} reads megatron's parallel_state"
        assert not any(tag in text for tag in role_tags), f"{rel} uses a parameter-role tag"


def test_task_cache_versions_cover_every_module_they_import(repo_root, tmp_path):
    """A task's cache version is the code version of the modules it imports, transitively (function-local imports
    too): the evaluate task's covers the latent format and the DiT, the training task's the trainer it launches."""
    from common.hashing import imported_modules

    train = imported_modules("tasks.train.task", "trainer.train")
    assert {"trainer.parallel.plan", "trainer.state", "models.dit", "common.latents", "common.config"} <= set(train)
    compress = imported_modules("tasks.compress.task")
    assert {"tasks.compress.encode", "common.latents", "models.vae", "models.text_encoder"} <= set(compress)
    assert not any(m.startswith(("trainer", "workflows")) for m in compress)
