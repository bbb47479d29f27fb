#!/usr/bin/env python
"""``python jobs/export.py ...`` from a checkout runs the installed ``timesformer-export`` command, whose code
is pipeline/cli/export.py (``--help`` says what it does)."""

import sys

from pipeline.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
