"""Processes a test starts: waiting for them to end, the modules a fresh interpreter imports."""

import os
import subprocess
import sys
import time


def group_gone(pgid, seconds=30):
    """Whether every process of group ``pgid`` (the command and its loader workers) has ended
    within ``seconds``: nothing is left running after the command exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after ``statement``."""
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
