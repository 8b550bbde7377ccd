"""What several test modules import: ``ROOT`` (the repository), the CLI runners and the one
assertion about a user error (``cli``), padded detector batches (``batches``)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
