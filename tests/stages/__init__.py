"""Tests of ``mfcache.stages``."""
