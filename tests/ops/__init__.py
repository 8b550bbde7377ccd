"""Tests of ``mfcache.ops``."""
