#!/usr/bin/env python
"""``python jobs/ingest.py ...`` from a checkout runs the installed ``timesformer-ingest`` command, whose code
is pipeline/cli/ingest.py (``--help`` says what it does)."""

import sys

from pipeline.cli.ingest import main

if __name__ == "__main__":
    sys.exit(main())
