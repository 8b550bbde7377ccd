"""The package's layout keeps its promises: training and evaluation read the cache alone."""

import subprocess
import sys


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after ``statement``."""
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def test_train_and_eval_import_no_detector_code():
    modules = loaded_after("import mfcache.stages.train, mfcache.stages.evaluate, mfcache.stages.sweep")
    assert not {m for m in modules if m.split(".")[0] in ("transformers", "timm")}
    detector_modules = {m for m in modules if m.startswith("mfcache.detectors")}
    assert detector_modules <= {"mfcache.detectors", "mfcache.detectors.base"}, detector_modules  # the spec/info types only
    assert not {m for m in modules if m.startswith(("mfcache.stages.extract", "mfcache.stages.predict",
                                                    "mfcache.demo_detector"))}
