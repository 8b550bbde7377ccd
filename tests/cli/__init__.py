"""Tests of ``mfcache.cli``."""
