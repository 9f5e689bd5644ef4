"""Tests tune afresh: launch configs chosen by the tuning stay in memory (tests/test_tuning.py turns the on-disk
store on for its own tests, in a temporary folder)."""

import os

os.environ.setdefault("SPHERE_FAST_TUNING_CACHE", "0")
