"""Tests of ``mfcache.demo_detector``."""
