"""The package's import layers: every ``mfcache`` import points down this order, never up.

    front ends (mfcache.cli, mfcache.api, mfcache.__main__)
      -> stages (the commands' library code) and demo_detector (the demo detector's trainer)
      -> cache
      -> heads, detectors, data
      -> ops
      -> leaf modules (mfcache/*.py: config, errors, runtime, ...; they import only each other)

Read from the source with ``ast`` (no imports run), so a new upward import fails here with
the file and the module it imports.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mfcache"
FRONT_ENDS = {"api", "__main__", "cli"}
LAYERS = {
    "cli": 5,
    "api": 5,
    "__main__": 5,
    "stages": 4,
    "demo_detector": 4,
    "cache": 3,
    "heads": 2,
    "detectors": 2,
    "data": 2,
    "ops": 1,
}


def layer(module: str) -> int:
    """The layer of ``mfcache.<part>...``: its subpackage's, or 0 for a leaf module."""
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def mfcache_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mfcache"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mfcache")}
    return found


def test_every_import_points_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for target in mfcache_imports(path):
            if layer(target) > layer(here):
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {target}")
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_every_subpackage_has_a_layer():
    """A new subpackage gets its place in LAYERS (and in the docs' layout) before it is used."""
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages <= set(LAYERS), subpackages - set(LAYERS)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: an ops module importing a head would be reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from mfcache.heads.base import HeadOutput\n")
    assert layer("mfcache.ops.losses") < layer(next(iter(mfcache_imports(bad))))
