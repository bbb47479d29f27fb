#!/usr/bin/env python
"""``python jobs/launch.py ...`` from a checkout runs the installed ``timesformer-launch`` command, whose code
is pipeline/cli/launch.py (``--help`` says what it does)."""

import sys

from pipeline.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
