"""Waiting on the processes a test started."""

import os
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
