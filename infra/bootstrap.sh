#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from the pinned, tested lock file.
# Idempotent: does nothing when .venv already matches requirements.lock and pyproject.toml.
#
#   bash infra/bootstrap.sh            # PYTHON=python3.11 to choose the interpreter, VENV=path to move it
#
# On a GPU cluster, install your CUDA build of torch into the venv after this (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.bootstrap-stamp"
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
ver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$ver" in
  3.11|3.12) ;;
  *) echo "bootstrap: need Python 3.11 or 3.12, '$PYTHON' is $ver (set PYTHON=...)" >&2; exit 2 ;;
esac
echo "bootstrap: installing the pinned dependency set into $VENV (first time: about 2 minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.lock 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
  2> >(grep -v "is ignored: it is neither" >&2)
echo "$want" > "$STAMP"
echo "bootstrap: ready ($VENV)" >&2
