"""Tests of ``mfcache.detectors``."""
