#!/bin/sh
# One scheduled incremental ingest: what the cron line, the scrontab entry and the systemd service all run.
#
# Settings come from the environment or, when it exists, an env file: $PIPELINE_INGEST_ENV, default
# ~/.config/pipeline/ingest.env. It is read as data, never run: each line is blank, a # comment, or NAME=value
# (NAME: letters, digits, _; not starting with a digit); the value is taken literally, to the end of the line
# (spaces included; one pair of surrounding "..." or '...' removed; no $ expansion, no $(...), no escapes) and
# exported, overriding the environment. Any other line stops the run with its line number (exit 2). The same
# lines suit systemd's EnvironmentFile.
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
cr=$(printf '\r')
if [ -f "$env_file" ]; then
    lineno=0
    while IFS= read -r line || [ -n "$line" ]; do
        lineno=$((lineno + 1))
        line=${line%"$cr"}  # a file saved with CRLF line ends
        case ${line#"${line%%[![:space:]]*}"} in
            '' | '#'*) continue ;;  # blank, or a comment
        esac
        name=${line%%=*}
        case $name in
            "$line" | '' | [0-9]* | *[!A-Za-z0-9_]*)
                echo "ingest: $env_file line $lineno: not a NAME=value line (NAME: letters, digits, _), refused" \
                    "without running anything: $line" >&2
                exit 2 ;;
        esac
        value=${line#*=}
        case $value in
            \"*\" | \'*\') value=${value#?}; value=${value%?} ;;  # one pair of surrounding quotes
        esac
        export "$name=$value"
    done <"$env_file"
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
set -f  # INGEST_ARGS is split on spaces, never globbed
# shellcheck disable=SC2086  # INGEST_ARGS is a list of words
exec "$python" jobs/ingest.py --config "$INGEST_CONFIG" --no-progress ${INGEST_ARGS:-}
