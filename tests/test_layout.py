"""The package's layout keeps its promises: training and evaluation read the cache alone."""

from tests.helpers.processes import loaded_after


def test_train_and_eval_import_no_detector_code():
    modules = loaded_after("import mfcache.stages.train, mfcache.stages.evaluate, mfcache.stages.sweep")
    assert not {m for m in modules if m.split(".")[0] in ("transformers", "timm")}
    detector_modules = {m for m in modules if m.startswith("mfcache.detectors")}
    assert detector_modules <= {"mfcache.detectors", "mfcache.detectors.base"}, (
        detector_modules
    )  # the spec/info types only
    assert not {
        m
        for m in modules
        if m.startswith(("mfcache.stages.extract", "mfcache.stages.predict", "mfcache.demo_detector"))
    }


def test_the_tests_mirror_the_package():
    """tests/ has one folder per subpackage of mfcache (its tests), plus guarantees/ (the end-to-end
    promises), benchmarks/ (the scripts), helpers/ and fixtures/; every test folder is a package."""
    import importlib.util
    from pathlib import Path

    tests = Path(__file__).parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    subpackages = {p.parent.name for p in (tests.parent / "mfcache").glob("*/__init__.py")} | {"cli"}
    assert all(importlib.util.find_spec(f"mfcache.{name}") for name in subpackages)
    assert folders == subpackages | {"guarantees", "benchmarks", "helpers", "fixtures"}
    for folder in folders - {"fixtures"}:
        assert (tests / folder / "__init__.py").is_file(), folder


def test_test_modules_share_code_through_helpers_only():
    """A test module imports shared code from tests/helpers (or data from tests/fixtures), never
    from another test module: running or moving one test file cannot break another."""
    import ast
    from pathlib import Path

    tests = Path(__file__).parent
    wrong = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("tests.") and not name.startswith(("tests.helpers", "tests.fixtures")):
                    wrong.append(f"{path.relative_to(tests)} imports {name}")
    assert not wrong, wrong


def test_the_documented_layout_is_the_tree():
    """docs/development.md's "How the code is laid out" names every subpackage and top-level module of
    mfcache/, and every file it names exists (a module renamed or removed fails here)."""
    import re

    from tests.helpers import ROOT

    page = (ROOT / "docs" / "development.md").read_text()
    block = page.split("## How the code is laid out", 1)[1].split("```", 2)[1]
    package = ROOT / "mfcache"
    folders = {p.parent.name for p in package.glob("*/__init__.py")}
    modules = {p.name for p in package.glob("*.py")} - {"__init__.py", "__main__.py"}
    unnamed = {f"{f}/" for f in folders if f"mfcache/{f}/" not in block}
    unnamed |= {m for m in modules if not re.search(rf"\b{re.escape(m)}", block)}
    assert not unnamed, f"not in the layout: {sorted(unnamed)}"
    existing = {p.name for p in package.rglob("*.py")}
    stale = {name for name in re.findall(r"\b([a-z_0-9]+\.py)\b", block) if name not in existing}
    assert not stale, f"named in the layout but not in mfcache/: {sorted(stale)}"
