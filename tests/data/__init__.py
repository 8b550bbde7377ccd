"""Tests of ``mfcache.data``."""
