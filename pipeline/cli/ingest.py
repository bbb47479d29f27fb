"""Ingest videos into WebDataset shards and commit a new dataset version (incremental, resumable).

    python jobs/ingest.py --config configs/ingest/synthetic.yaml
    python jobs/ingest.py --config configs/ingest/k400.yaml output=s3://my-bucket/k400 samples_per_shard=128
    python jobs/ingest.py --config configs/ingest/k400.yaml --dry-run      # the plan, nothing written
    python jobs/ingest.py --config ... --ray-address auto                  # an existing Ray cluster

A rerun with nothing new does nothing and says so; new sources give new shards only; changed sources
are reprocessed; deleted ones leave the next version. Videos that fail are listed with their reason in
reports/v<version>-quarantine.json next to the index: "content" failures (the file is bad or over a
decode limit, ``limits.*``) stay there until the file changes; "transient" ones (a read error, a dead
worker) are tried again by the next run. Exit codes: 0 done or nothing to do, 1 nothing could be
committed (every shard failed, or this run lost its lease), 2 bad configuration or input, 3 skipped: another
run holds the dataset's lease (a scheduled run overlapping a running one: not a failure). The lease is renewed
while a run works, so a run may last longer than ``lease_seconds``; a run whose lease was taken over commits
nothing. Local sources whose size and modification time are unchanged are not read again (a checksum cache in
the dataset root); infra/schedule/ has cron, scrontab and systemd schedules (docs/ingestion.md, "Scheduling").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.data.storage import StorageError
from pipeline.ingest.run import IngestConfig, IngestError, LeaseHeldError, run_ingest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="configs/ingest/<dataset>.yaml")
    p.add_argument("--source", help="directory of source videos (overrides the config)")
    p.add_argument("--annotations", nargs="+", help="annotation files (override the config)")
    p.add_argument("--output", help="dataset root: s3://bucket/prefix or a local directory")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit without writing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (transcode.fps=25 ...)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    for key in ("source", "output"):
        if getattr(args, key):  # quoted: a path such as 2024 or "yes" stays a string
            overrides.append(f"{key}={json.dumps(getattr(args, key))}")
    if args.annotations:
        overrides.append(f"annotations={json.dumps(args.annotations)}")
    try:
        cfg = IngestConfig.load(args.config, overrides)
        result = run_ingest(cfg, ray_address=args.ray_address, dry_run=args.dry_run,
                            progress=not args.no_progress and sys.stderr.isatty())
    except LeaseHeldError as e:
        print(f"ingest: {e}", file=sys.stderr)
        return 3
    except (ValueError, StorageError, FileNotFoundError) as e:  # ConfigError is a ValueError: one line, no trace
        print(f"ingest: {e}", file=sys.stderr)
        return 2
    except IngestError as e:
        print(f"ingest: {e}", file=sys.stderr)
        return 1
    print(result.message)
    if result.version is not None:
        rate = result.videos_in / result.seconds if result.seconds else 0.0
        print(f"videos in {result.videos_in}, out {result.videos_out}, failed {result.failed}; "
              f"{result.bytes_in / 1e6:.1f} MB read; {rate:.1f} videos/s; {result.seconds:.1f}s")
        for vid, q in sorted(result.quarantine.items())[:10]:
            print(f"  quarantined ({q.get('kind', 'content')}) {vid}: {q['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
