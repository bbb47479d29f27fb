#!/usr/bin/env python
"""``python jobs/demo.py ...`` from a checkout runs the installed ``timesformer-demo`` command, whose code
is pipeline/cli/demo.py (``--help`` says what it does)."""

import sys

from pipeline.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
