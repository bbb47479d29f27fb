#!/usr/bin/env python
"""``python jobs/evaluate.py ...`` from a checkout runs the installed ``timesformer-evaluate`` command, whose code
is pipeline/cli/evaluate.py (``--help`` says what it does)."""

import sys

from pipeline.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
