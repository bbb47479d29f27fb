#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from the pinned, tested lock file.
# Idempotent: does nothing when .venv already matches requirements.lock and pyproject.toml.
#
#   bash infra/bootstrap.sh            # PYTHON=python3.11 to choose the interpreter, VENV=path to move it
#
# On a GPU cluster: create the venv, install your CUDA build of torch into it, then run this with
# KEEP_TORCH=1, which installs everything else from the lock and leaves that torch alone (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.bootstrap-stamp"
KEEP_TORCH=${KEEP_TORCH:-0}
want=$( (cat requirements.lock pyproject.toml; echo "keep_torch=$KEEP_TORCH") | sha256sum | cut -c1-16)

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
lock=requirements.lock
if [ "$KEEP_TORCH" = 1 ]; then
  "$VENV/bin/python" -c "import torch" 2>/dev/null \
    || { echo "bootstrap: KEEP_TORCH=1 but $VENV has no torch; install your CUDA build of torch first" >&2; exit 2; }
  lock=$(mktemp); grep -v '^torch==' requirements.lock > "$lock"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$lock" 2> >(grep -v "is ignored: it is neither" >&2)
# The distribution was named "pipeline" until it became timesformer-pipeline ("pipeline" on the public index is
# another project): a venv bootstrapped before has that editable install of this checkout still; drop it.
if "$VENV/bin/python" -P - <<'EOF'  # -P: not the egg-info a build leaves in the checkout
import importlib.metadata as md, json, pathlib, sys
try:
    url = json.loads(md.distribution("pipeline").read_text("direct_url.json") or "{}").get("url", "")
except md.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if url == pathlib.Path.cwd().resolve().as_uri() else 1)
EOF
then
  "$VENV/bin/python" -m pip uninstall -q -y pipeline
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . \
  2> >(grep -v "is ignored: it is neither" >&2)
echo "$want" > "$STAMP"
echo "bootstrap: ready ($VENV)" >&2
