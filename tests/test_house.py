"""The house rules: which part of the recipe may import which (shared/ARCHITECTURE.md's seams).

Every import statement in mamba/, tools/ and the top-level scripts is parsed, including those
inside functions (a lazy import crosses a seam as surely as one at the top), relative imports
resolved to absolute names. A violation names the file, the line and the rule it breaks.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _is(name: str, *prefixes: str) -> bool:
    """Whether module `name` is one of `prefixes` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# (rule, applies to a file at this repository path, forbids importing this module name)
RULES = [
    ("mamba/layout.py imports nothing from mamba: it is the contract both data and model read",
     lambda path: path == "mamba/layout.py",
     lambda name: _is(name, "mamba")),
    ("mamba/model/ never imports data, training, runs or Composer (model/composer_model.py adapts it)",
     lambda path: path.startswith("mamba/model/") and path != "mamba/model/composer_model.py",
     lambda name: _is(name, "mamba.data", "mamba.training", "mamba.runs", "composer")),
    ("mamba/model/composer_model.py imports Composer, never data, training or runs",
     lambda path: path == "mamba/model/composer_model.py",
     lambda name: _is(name, "mamba.data", "mamba.training", "mamba.runs")),
    ("mamba/model/ops/ holds kernels only: it never imports a mixer, block or LM module",
     lambda path: path.startswith("mamba/model/ops/"),
     lambda name: _is(name, "mamba.model") and not _is(name, "mamba.model.ops")),
    ("mamba/data/ never imports the model or the trainer",
     lambda path: path.startswith("mamba/data/"),
     lambda name: _is(name, "mamba.model", "mamba.training")),
    ("mamba/runs/ reads what a run left on disk without the trainer",
     lambda path: path.startswith("mamba/runs/"),
     lambda name: _is(name, "mamba.training", "composer")),
    ("tools/ are thin CLIs over the package: they never import the trainer",
     lambda path: path.startswith("tools/"),
     lambda name: _is(name, "mamba.training")),
]


def source_files(root: Path) -> list[Path]:
    """The Python files the rules look at: mamba/, tools/ and the scripts at the top level."""
    return sorted([*(root / "mamba").rglob("*.py"), *(root / "tools").rglob("*.py"), *root.glob("*.py")])


def imports(path: Path, root: Path) -> list[tuple[int, list[str]]]:
    """(line, absolute module names) per import statement in the file. `from a import b` names
    both a and a.b (b may be a submodule: `from mamba import training`); `from . import x` is
    resolved against the file's package."""
    package = list(path.relative_to(root).parent.parts)  # __init__.py's package is its own folder
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
            found.append((node.lineno, ([base] if base else []) + names))
    return found


def violations(root: Path) -> list[str]:
    """Every import statement that breaks a rule, as 'file:line: imports NAME: RULE'."""
    out = []
    for path in source_files(root):
        rel = path.relative_to(root).as_posix()
        for line, names in imports(path, root):
            for rule, applies, forbids in RULES:
                bad = [name for name in names if forbids(name)]
                if applies(rel) and bad:  # the most specific name: mamba.training.trainer, not mamba
                    out.append(f"{rel}:{line}: imports {max(bad, key=len)}: {rule}")
    return out


def test_the_house_keeps_its_rules():
    found = violations(REPO)
    assert not found, "imports that cross the house's seams:\n" + "\n".join(found)


# What a fresh interpreter may not have loaded after importing every module of a part, through
# everything those modules import in turn (a lazy import inside a function is not run; the line
# rules above cover those): (part, modules left out, forbidden module prefixes).
LOADED_RULES = [
    ("mamba/layout.py", [], ["mamba.config", "mamba.data", "mamba.model", "mamba.runs", "mamba.training"]),
    ("mamba/model", ["composer_model"], ["mamba.data", "mamba.training", "mamba.runs", "composer"]),
    ("mamba/data", [], ["mamba.model", "mamba.training", "mamba.runs"]),
    ("mamba/runs", [], ["mamba.training", "composer"]),
]


@pytest.mark.parametrize("part,left_out,forbidden", LOADED_RULES, ids=[r[0] for r in LOADED_RULES])
def test_importing_a_part_loads_nothing_it_may_not_import(part, left_out, forbidden):
    root = REPO / part
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    modules = [".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for f in files]
    modules = [m for m in modules if m.rsplit(".", 1)[-1] not in left_out]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(sorted(m for m in sys.modules if m.startswith({tuple(p + '.' for p in forbidden)!r})"
            + f" or m in {tuple(forbidden)!r}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", f"importing {part} loads {run.stdout.strip()}"


@pytest.mark.parametrize("path,source,name", [
    ("mamba/layout.py", "import numpy\nfrom mamba import files\n", "mamba.files"),
    ("mamba/model/lm.py", "def f():\n    from mamba.data.loader import count_tokens\n", "mamba.data.loader"),
    ("mamba/model/hf.py", "import composer.core\n", "composer.core"),
    ("mamba/model/composer_model.py", "from ..training import trainer\n", "mamba.training.trainer"),
    ("mamba/model/ops/ssd.py", "from mamba.model.mamba2 import Mamba2\n", "mamba.model.mamba2"),
    ("mamba/model/ops/kernels.py", "from .. import block\n", "mamba.model.block"),
    ("mamba/data/pack.py", "from mamba.model import lm\n", "mamba.model"),
    ("mamba/runs/export.py", "from composer.utils import dist\n", "composer.utils"),
    ("tools/generate.py", "import mamba.training.trainer as t\n", "mamba.training.trainer"),
])
def test_a_forbidden_import_is_named_with_its_file_and_line(tmp_path, path, source, name):
    """The checker itself, on a small tree: each rule fires, relative and lazy imports included."""
    file = tmp_path / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("import os\n" + source)
    found = violations(tmp_path)
    assert found and all(f.startswith(f"{path}:") for f in found)
    assert any(f"imports {name}" in f for f in found), found


@pytest.mark.parametrize("path,source", [
    ("mamba/model/composer_model.py", "from composer.models import ComposerModel\n"),
    ("mamba/model/lm.py", "from mamba.model.ops import kernels\nfrom mamba.config.schema import KernelMode\n"),
    ("mamba/model/ops/ssd.py", "from mamba.model.ops.rms_norm import RMSNorm\n"),
    ("tools/pack.py", "from mamba.data import pack\n"),
    ("mamba/training/trainer.py", "from mamba.runs import export\nimport composer\n"),
])
def test_allowed_imports_pass(tmp_path, path, source):
    file = tmp_path / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(source)
    assert violations(tmp_path) == []


# torch versions: the recipe runs on two stacks (README "Stacks") and asks mamba/capabilities.py
# what the installed torch can do; nothing else compares, branches on or names a torch version.
# (setup.py and tools/install.sh pin versions to install; benchmarks print the one they ran on.)
TORCH_VERSION = re.compile(r"torch\.__version__|version\(\s*['\"]torch['\"]|\btorch[ \t]*[<>=~!]*[ \t]*\d+\.\d+")
CAPABILITIES = "mamba/capabilities.py"


def torch_versions_named(root: Path) -> list[str]:
    """'file:line: text' for every mention of a torch version outside mamba/capabilities.py."""
    out = []
    for path in source_files(root):
        rel = path.relative_to(root).as_posix()
        if rel in (CAPABILITIES, "setup.py"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if TORCH_VERSION.search(line):
                out.append(f"{rel}:{number}: {line.strip()}")
    return out


def test_only_the_capabilities_module_knows_torch_versions():
    found = torch_versions_named(REPO)
    assert not found, f"torch versions named outside {CAPABILITIES}:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "if torch.__version__ >= '2.8':\n    pass\n",
    "from importlib.metadata import version\nv = version('torch')\n",
    "# gloo cannot average in torch 2.7\n",
    "NEEDS = 'torch>=2.9'\n",
])
def test_a_torch_version_outside_capabilities_is_named(tmp_path, source):
    file = tmp_path / "mamba" / "training" / "parallel.py"
    file.parent.mkdir(parents=True)
    file.write_text("import torch\n" + source)
    (tmp_path / CAPABILITIES).write_text("# torch 2.7.0 sums where asked to average\n")
    found = torch_versions_named(tmp_path)
    assert len(found) == 1 and found[0].startswith("mamba/training/parallel.py:"), found
