"""Tests of mfcache: one folder per subpackage of ``mfcache/`` (the tests of a top-level module
sit here, beside this file), ``guarantees/`` for the end-to-end promises of docs/guarantees.md,
``benchmarks/`` for the scripts in ``benchmarks/``, ``helpers/`` for what several modules import
and ``fixtures/`` for data files."""
