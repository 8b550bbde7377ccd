"""Tests of ``mfcache.heads``."""
