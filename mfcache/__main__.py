"""``python -m mfcache`` (and ``torchrun -m mfcache``) runs the command-line app."""

from mfcache.cli.main import main

main()
