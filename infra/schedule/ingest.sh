#!/bin/sh
# One scheduled incremental ingest: what the cron line, the scrontab entry and the systemd service all run.
#
# Settings come from the environment or, when it exists, an env file (plain KEY=value lines, no quotes, as
# systemd's EnvironmentFile reads them too): $PIPELINE_INGEST_ENV, default ~/.config/pipeline/ingest.env.
#   INGEST_CONFIG        the ingest config (required), e.g. configs/ingest/k400.yaml (relative to PIPELINE_HOME)
#   PIPELINE_HOME        the checkout to run in (default: the one this script is in)
#   PIPELINE_PYTHON      its Python (default: $PIPELINE_HOME/.venv/bin/python)
#   PIPELINE_INGEST_LOG  append the run's output there (default: stdout/stderr, i.e. cron's mail, the Slurm
#                        job's output file, the journal)
#   INGEST_ARGS          more arguments for jobs/ingest.py (e.g. --ray-address auto), split on spaces
#   RAY_ADDRESS, AWS_*, MLFLOW_TRACKING_URI  passed through as they are
# Exit codes are jobs/ingest.py's: 0 done or nothing to do, 1 nothing could be committed, 2 bad configuration,
# 3 skipped: another run holds the dataset's lease (an overlapping run, not a failure).
env_file="${PIPELINE_INGEST_ENV:-$HOME/.config/pipeline/ingest.env}"
if [ -f "$env_file" ]; then
    set -a
    . "$env_file"
    set +a
fi
if [ -z "${PIPELINE_HOME:-}" ]; then
    PIPELINE_HOME=$(cd "$(dirname "$0")/../.." && pwd)
fi
if [ -n "${PIPELINE_INGEST_LOG:-}" ]; then
    mkdir -p "$(dirname "$PIPELINE_INGEST_LOG")"
    exec >>"$PIPELINE_INGEST_LOG" 2>&1
fi
cd "$PIPELINE_HOME" || { echo "ingest: PIPELINE_HOME=$PIPELINE_HOME: not a directory" >&2; exit 2; }
if [ -z "${INGEST_CONFIG:-}" ]; then
    echo "ingest: INGEST_CONFIG is not set (set it in $env_file, e.g. INGEST_CONFIG=configs/ingest/k400.yaml)" >&2
    exit 2
fi
python="${PIPELINE_PYTHON:-$PIPELINE_HOME/.venv/bin/python}"
echo "ingest: scheduled run at $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), config $INGEST_CONFIG"
# shellcheck disable=SC2086  # INGEST_ARGS is a list of words
exec "$python" jobs/ingest.py --config "$INGEST_CONFIG" --no-progress ${INGEST_ARGS:-}
