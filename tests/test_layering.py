"""The import layers of docs/architecture.md, read from the source (every import statement,
also those inside functions), so a change that breaks a layer fails here, naming the line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ncfm_core"
UPPER = ("ncfm_core.jobs", "ncfm_core.api")  # the layers that call the pieces, never called by them


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_submodule(name: str) -> bool:
    """Whether ``ncfm_core.<name>`` is a module or package (not an attribute of the root)."""
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every ncfm import of ``path``. ``from ncfm_core import x`` counts as
    ``ncfm_core.x`` when x is a submodule, else as the package root ``ncfm_core`` (an attribute
    of the root, e.g. ``__version__``, which loads the whole API and every job)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "ncfm_core"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "ncfm_core":
                found += [(node.lineno, f"ncfm_core.{a.name}" if _is_submodule(a.name) else "ncfm_core")
                          for a in node.names]
            elif node.module.split(".")[0] == "ncfm_core":
                found.append((node.lineno, node.module))
    return found


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_scan_sees_every_kind_of_import(tmp_path):
    sample = tmp_path / "probe.py"
    sample.write_text("import ncfm_core.jobs\nfrom ncfm_core import __version__, store\n"
                      "def f():\n    from ncfm_core.api import distill\n"
                      "from . import files\nimport torch\n")
    assert imports(sample) == [(1, "ncfm_core.jobs"), (2, "ncfm_core"), (2, "ncfm_core.store"), (4, "ncfm_core.api")]


@pytest.mark.parametrize("path", [p for p in SOURCES if p.parent.name == "store"], ids=lambda p: p.name)
def test_the_store_imports_nothing_of_ncfm_but_errors_and_platform(path):
    allowed = ("ncfm_core.errors", "ncfm_core.platform", "ncfm_core.store")
    wrong = [f"{_module_name(path)}:{line} imports {module}" for line, module in imports(path)
             if not _within(module, allowed)]
    assert wrong == []


PIECES = [p for p in SOURCES if _module_name(p) != "ncfm_core" and not _within(_module_name(p), UPPER)]


@pytest.mark.parametrize("path", PIECES, ids=lambda p: _module_name(p))
def test_no_piece_imports_a_job_the_api_or_the_package_root(path):
    wrong = [f"{_module_name(path)}:{line} imports {module}" for line, module in imports(path)
             if module == "ncfm_core" or _within(module, UPPER)]
    assert wrong == []


@pytest.mark.parametrize("path", [p for p in SOURCES if _within(_module_name(p), UPPER)], ids=lambda p: _module_name(p))
def test_jobs_and_the_api_do_not_import_the_package_root(path):
    # The root imports the API, which imports the jobs: importing it back is a cycle that only
    # works while the root's imports happen to be ordered around it.
    wrong = [f"{_module_name(path)}:{line} imports {module}" for line, module in imports(path) if module == "ncfm_core"]
    assert wrong == []


def test_the_library_never_imports_the_command_line():
    wrong = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            wrong += [f"{_module_name(path)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in ("typer", "rich", "click", "ncfm_cli")]
    assert wrong == []
