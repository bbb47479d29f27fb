# The two commands (see README): `make demo` runs the main job on the embedded default,
# `make test` runs the whole test suite. Both install what they need into .venv first.
PY := .venv/bin/python

.PHONY: demo test lint bench venv lock

venv:
	@bash infra/bootstrap.sh

demo: venv
	$(PY) jobs/demo.py

test: venv
	$(PY) -m ruff check pipeline jobs tests infra benchmarks
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check pipeline jobs tests infra benchmarks

bench: venv
	$(PY) benchmarks/bench.py

# Re-resolve the dependency set (after editing pyproject.toml) into requirements.lock.
lock:
	rm -rf /tmp/pipeline-lock && python3 -m venv /tmp/pipeline-lock
	/tmp/pipeline-lock/bin/pip install -q torch==2.13.0  # the CPU wheel on disk first: pyproject's range would take a CUDA build
	/tmp/pipeline-lock/bin/pip install -q -e '.[dev]'
	{ echo "# Pinned, tested dependency set (Python 3.11, Linux x86_64). Regenerate with: make lock"; \
	  /tmp/pipeline-lock/bin/pip freeze --exclude-editable | sed 's/^torch==.*/torch==2.13.0/'; } > requirements.lock
