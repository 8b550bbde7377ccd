"""Tests of ``mfcache.cache``."""
