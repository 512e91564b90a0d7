#!/usr/bin/env python3
"""Crash-state exploration: command-line front end of tests/harness/crash_explore.py.

The harness is test code, not part of the installed daxfs package; run this from a checkout
(or `python -m tests.harness.crash_explore` from the repository root). See --help."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.harness.crash_explore import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
