#!/usr/bin/env python
"""``python jobs/predict.py ...`` from a checkout runs the installed ``timesformer-predict`` command, whose code
is pipeline/cli/predict.py (``--help`` says what it does)."""

import sys

from pipeline.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
