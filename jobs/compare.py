#!/usr/bin/env python
"""``python jobs/compare.py ...`` from a checkout runs the installed ``timesformer-compare`` command, whose code
is pipeline/cli/compare.py (``--help`` says what it does)."""

import sys

from pipeline.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
