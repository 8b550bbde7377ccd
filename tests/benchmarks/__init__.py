"""Tests of the scripts in ``benchmarks/``: each runs as the docs say, on the CPU."""
