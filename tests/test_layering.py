"""The house as drawn: the import graph, read from the source with `ast`, has no arrow back up.

train.py / evaluate.py -> engine/ -> model/ -> kernels/; data/ serves the CLIs and the engine,
never model/ or kernels/; kernels/ import torch and triton only; baselines/ may use the engine,
the engine never the baselines. The top-level modules other than the two CLIs (`paths.py`, ...)
are leaves every layer may use: they import nothing of ours. Imports inside functions count: a
lazy import is still an arrow.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIS = ("train", "evaluate")
LEAVES = tuple(sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in CLIS))
OURS = ("model", "kernels", "engine", "data", "baselines", "bench", "tests", *CLIS, *LEAVES)

# package -> packages of ours it must never import
FORBIDDEN = {
    "kernels": set(OURS) - {"kernels"},
    "model": {"data", "engine", "baselines", "bench", "tests", "train", "evaluate"},
    "data": {"model", "kernels", "engine", "baselines", "bench", "tests", "train", "evaluate"},
    "engine": {"baselines", "bench", "tests", "train", "evaluate"},
    **{leaf: set(OURS) for leaf in LEAVES},
}


# Arrows that exist and are not fixed yet, each named with why; no new entry without one.
# Semantic histories (data/history.py, python -m data.prepare --history-select semantic) embed
# titles with the base model: that belongs above data/, with the embedding function passed in.
KNOWN: set[tuple[str, str]] = set()


def _imports(path: Path):
    """(line, imported module, imported names) for every import in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative import: resolve against this file's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            yield node.lineno, module, tuple(a.name for a in node.names)


def _files(package: str):
    if package in LEAVES:
        return [ROOT / f"{package}.py"]
    return sorted((ROOT / package).rglob("*.py"))


def _arrows(package: str):
    for path in _files(package):
        for line, module, names in _imports(path):
            yield f"{path.relative_to(ROOT)}:{line}", module.split(".")[0], module, names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_arrow_back_up(package):
    assert _files(package), f"no sources found for {package}/"
    bad = [f"{where} imports {module}" for where, top, module, _ in _arrows(package)
           if top in FORBIDDEN[package] and (where.split(":")[0], module) not in KNOWN]
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(bad)


def test_known_arrows_still_exist():
    # a fixed arrow leaves KNOWN, so the exception cannot hide a later one
    found = {(where.split(":")[0], module) for package in FORBIDDEN
             for where, _, module, _ in _arrows(package)}
    assert KNOWN <= found, f"fixed, remove from KNOWN: {sorted(KNOWN - found)}"


@pytest.mark.parametrize("package", ["model", "kernels", "engine", "data", "baselines", *LEAVES])
def test_no_private_names_across_packages(package):
    bad = [f"{where} imports {module}.{name}" for where, top, module, names in _arrows(package)
           if top in OURS and top != package for name in names if name.startswith("_")]
    assert not bad, "private names used across packages:\n" + "\n".join(bad)


TEST_ONLY = {"pytest", "transformers", "peft", "gguf", "datasets"}  # requirements-test.txt


@pytest.mark.parametrize("package", ["model", "kernels", "engine", "data", *CLIS, *LEAVES])
def test_product_never_imports_test_only_packages(package):
    # what requirements.txt leaves out; bench/ and baselines/ compare with them, the product not
    files = [ROOT / f"{package}.py"] if package in CLIS else _files(package)
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in files
           for line, module, _ in _imports(path) if module.split(".")[0] in TEST_ONLY]
    assert not bad, "the product imports a test-only package:\n" + "\n".join(bad)
