#!/usr/bin/env bash
# Proves that the package installs next to a torch that is already there (a cluster's CUDA build) and works
# from there: a fresh virtual environment in a temporary folder, torch installed first, then a plain
# `pip install .` (non-editable, from a copy of this working tree) and `pip install '.[dev]'` for the test
# tools. After each install, every file of torch must be the very file it was (path, size, inode, mtime,
# SHA-256): not upgraded, not downgraded, not reinstalled. Then the wheel is built and must hold every
# subpackage, and the unit tests run from a copy of the tree WITHOUT pipeline/, so that `import pipeline`
# can only be the installed copy in site-packages (asserted before the first test).
#
#   bash infra/check_install.sh                 # ~10-20 minutes; needs the package index for the dependencies
#   TORCH_SPEC='torch==2.13.0' PYTHON=python3.11 KEEP=1 PYTEST_ARGS='tests/unit -x' bash infra/check_install.sh
#
# TORCH_SPEC stands in for the cluster's torch (default: the CPU wheel that this machine's disk serves). The
# dependencies resolve from the ranges in pyproject.toml, not from requirements.lock (that is what a cluster
# user gets); the versions that differ from the lock are listed. KEEP=1 leaves the temporary folder.
# Exit status: 0 when torch was kept, the wheel is complete and the tests passed; 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTEST_ARGS=${PYTEST_ARGS:-"tests/unit -m 'not gpu'"}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-install.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
export PIP_DISABLE_PIP_VERSION_CHECK=1
VPY=$WORK/venv/bin/python
t_all=$(date +%s)
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }
fail() { echo "check_install: FAILED: $*" >&2; exit 1; }
# pip's own noise about the machine's extra file:// index folders that do not exist: not a finding
pipq() { "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

# A manifest of every installed file of torch (its package and its dist-info), bytecode caches excluded:
# the same manifest after an install means pip did not touch torch (a reinstall of the same wheel gets new
# inodes and mtimes even where the bytes are equal).
torch_manifest() {
  "$VPY" - <<'EOF'
import hashlib, importlib.metadata as md, os, pathlib
dist = md.distribution("torch")
base = pathlib.Path(dist.locate_file(""))
rows = []
for f in dist.files:
    p = pathlib.Path(dist.locate_file(f))
    if "__pycache__" in f.parts or not p.is_file():
        continue
    st = p.stat()
    rows.append(f"{f.as_posix()} {st.st_size} {st.st_ino} {st.st_mtime_ns} "
                f"{hashlib.sha256(p.read_bytes()).hexdigest()}")
print(f"# torch {dist.version} at {base}")
print("\n".join(sorted(rows)))
EOF
}

step "interpreter and a fresh virtual environment in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
"$VPY" -c 'import sys; print(sys.version.split()[0], sys.executable)'
"$VPY" -m pip --version

step "torch first (stands in for the cluster's CUDA build): pip install $TORCH_SPEC"
t=$(date +%s)
pipq install -q "$TORCH_SPEC"
echo "installed in $(( $(date +%s) - t ))s"
"$VPY" -m pip show torch | grep -E '^(Name|Version|Location|Requires):'
torch_manifest > "$WORK/torch-before.txt"
echo "torch manifest: $(( $(wc -l < "$WORK/torch-before.txt") - 1 )) files," \
  "sha256 of the manifest $(sha256sum < "$WORK/torch-before.txt" | cut -c1-16)"

step "a copy of the working tree (tracked and untracked files git does not ignore: no .venv, no caches)"
mkdir "$WORK/src"
git -C "$REPO" ls-files -z --cached --others --exclude-standard | "$VPY" -c '
import os, shutil, sys
src, dst = sys.argv[1:3]
for rel in sys.stdin.buffer.read().decode().split("\0"):
    path = os.path.join(src, rel)
    if rel and os.path.isfile(path) and not os.path.islink(path):  # deleted but still tracked: skipped
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(path, os.path.join(dst, rel))
' "$REPO" "$WORK/src"
echo "$(find "$WORK/src" -type f | wc -l) files; distribution: $(
  "$VPY" -c 'import tomllib,sys; d=tomllib.load(open(sys.argv[1],"rb"))["project"]; print(d["name"], d["version"])' \
  "$WORK/src/pyproject.toml")"

check_torch() {
  torch_manifest > "$WORK/torch-after.txt"
  if cmp -s "$WORK/torch-before.txt" "$WORK/torch-after.txt"; then
    echo "torch untouched after $1: $(head -1 "$WORK/torch-after.txt" | cut -c3-)," \
      "$(( $(wc -l < "$WORK/torch-after.txt") - 1 )) files identical (path, size, inode, mtime, sha256)"
  else
    diff "$WORK/torch-before.txt" "$WORK/torch-after.txt" | head -20
    fail "torch changed during $1 (above: the first differences of its file manifest)"
  fi
}

step "pip install <copy>   (non-editable: what a user on a cluster runs)"
t=$(date +%s)
pipq install "$WORK/src" > "$WORK/pip-install.log" 2>&1 || { tail -40 "$WORK/pip-install.log"; fail "pip install ."; }
echo "installed in $(( $(date +%s) - t ))s"
grep -E "^Successfully installed" "$WORK/pip-install.log" | fold -w 118 -s
check_torch "pip install ."

step "pip install '<copy>[dev]'   (the test runner, the linter and the reference implementations)"
t=$(date +%s)
pipq install "$WORK/src[dev]" > "$WORK/pip-dev.log" 2>&1 || { tail -40 "$WORK/pip-dev.log"; fail "pip install .[dev]"; }
echo "installed in $(( $(date +%s) - t ))s"
grep -E "^Successfully installed" "$WORK/pip-dev.log" | fold -w 118 -s
check_torch "pip install '.[dev]'"

step "pip check, and the resolved versions next to requirements.lock (the tested set)"
"$VPY" -m pip check || fail "pip check found broken requirements"
"$VPY" -m pip freeze --exclude-editable > "$WORK/freeze.txt"
"$VPY" - "$REPO/requirements.lock" "$WORK/freeze.txt" <<'EOF'
import sys
from packaging.utils import canonicalize_name as cn
def pins(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[cn(name)] = version.strip().split("+")[0]  # 2.13.0+cpu is the lock's 2.13.0
    return out
lock, here = pins(sys.argv[1]), pins(sys.argv[2])
same = sorted(n for n in lock if here.get(n) == lock[n])
differ = sorted(n for n in lock if n in here and here[n] != lock[n])
print(f"{len(same)} of {len(lock)} locked packages at the locked version; {len(differ)} at another:")
for n in differ:
    print(f"  {n}: lock {lock[n]}, installed {here[n]}")
missing = sorted(n for n in lock if n not in here)
extra = sorted(n for n in here if n not in lock)
print("not installed (needed only by the lock's resolution):", ", ".join(missing) or "none")
print("installed, not in the lock:", ", ".join(extra) or "none")
EOF

step "the wheel (pip wheel --no-deps) holds every subpackage and module of pipeline/"
t=$(date +%s)
pipq wheel -q --no-deps -w "$WORK/wheel" "$WORK/src" > "$WORK/pip-wheel.log" 2>&1 \
  || { tail -20 "$WORK/pip-wheel.log"; fail "pip wheel"; }
"$VPY" - "$WORK/src" "$WORK/wheel" <<'EOF'
import pathlib, sys, zipfile
src, wheels = pathlib.Path(sys.argv[1]), list(pathlib.Path(sys.argv[2]).glob("*.whl"))
assert len(wheels) == 1, wheels
names = set(zipfile.ZipFile(wheels[0]).namelist())
modules = {p.relative_to(src).as_posix() for p in (src / "pipeline").rglob("*.py")}
packages = sorted({m.rsplit("/", 1)[0] for m in modules})
no_init = [p for p in packages if f"{p}/__init__.py" not in modules]
lacking = sorted(modules - names)
print(f"{wheels[0].name}: {len(names)} files; {len(modules)} modules of pipeline/ in {len(packages)} packages")
print("packages:", " ".join(p.replace("/", ".") for p in packages))
if no_init:
    sys.exit(f"folders of pipeline/ without __init__.py (setuptools leaves them out): {no_init}")
if lacking:
    sys.exit(f"modules missing from the wheel: {lacking}")
print("every module of pipeline/ is in the wheel")
EOF
echo "built in $(( $(date +%s) - t ))s"

step "the unit tests against the INSTALLED package: pytest $PYTEST_ARGS"
cp -a "$WORK/src" "$WORK/tree"
rm -rf "$WORK/tree/pipeline"  # nothing to import from the checkout: only site-packages has `pipeline`
mkdir "$WORK/plugin"
cat > "$WORK/plugin/installed_pipeline.py" <<'EOF'
"""Refuses to run the tests unless `pipeline` is the installed copy in the venv's site-packages."""
import sys
import sysconfig
from pathlib import Path


def pytest_sessionstart(session):
    import pipeline

    where = Path(pipeline.__file__).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    if site not in where.parents:
        sys.exit(f"pipeline imported from {where}, not from {site}")
    print(f"\npipeline {pipeline.__version__} imported from {where}")
EOF
t=$(date +%s)
status=0
(cd "$WORK/tree" && export PYTHONSAFEPATH=1 PYTHONPATH="$WORK/plugin" \
  && eval "\"\$VPY\" -m pytest -p installed_pipeline -p no:cacheprovider -q $PYTEST_ARGS") \
  > "$WORK/pytest.log" 2>&1 || status=$?
grep -E "^pipeline .* imported from" "$WORK/pytest.log" || true
grep -v "^pipeline .* imported from" "$WORK/pytest.log" | tail -15
echo "tests ran in $(( $(date +%s) - t ))s (exit $status)"
check_torch "the tests"
[ "$status" = 0 ] || fail "unit tests (exit $status): the log is $WORK/pytest.log with KEEP=1"

echo
echo "check_install: OK in $(( $(date +%s) - t_all ))s: torch kept, wheel complete, tests passed"
