#!/usr/bin/env python
"""Planning, diffing and committing at Kinetics-700 and HowTo100M sizes, and loading the index they make.

The real code on simulated sources (no video bytes): listing-like ``Source`` objects (S3-style ETag+size
checksums), ``make_plan`` for the first version, the index of that version assembled by the ingest's own
``assemble_index`` from fake shard results (the planned members, a made-up size and sha256) and committed
with ``commit_index`` to a local dataset root (empty shard files stand in for the tars), then an
incremental diff against it with 1% of the videos deleted, 1% added and 1% changed (scattered), committed
as the next version, and ``load_index`` of that version in a fresh process, as a rank does at launch. A loader
worker (forked by the DataLoader) holds the loader stages' view of the index (``loader.loading_view``: the
split's shards without member lists or per-video checksums): its size pickled is printed next to the whole
index's. The diff runs twice: 1% deleted + 1% added (the issue's case, not committed), then with 1% changed
as well (committed as v2).

Each step runs in its own process, so its peak memory (``ru_maxrss``) is its own; the RSS before the
measured call (the simulated sources, the imports) is printed next to it.

    python benchmarks/bench_plan_scale.py                          # HowTo100M 1.2M, Kinetics-700 650k, 100k
    python benchmarks/bench_plan_scale.py --cases kinetics700      # one case
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {  # name: (videos, {split: fraction}, classes)
    "howto100m": (1_200_000, {"train": 1.0}, 23_611),
    "kinetics700": (650_000, {"train": 0.84, "validate": 0.054, "test": 0.106}, 700),
    "issue-100k": (100_000, {"train": 1.0}, 400),
}
SAMPLES_PER_SHARD = 256
PRE = {"transcode": {"short_side": 256, "fps": 30.0, "codec": "libx264", "crf": 23, "preset": "veryfast",
                     "keyframe_interval": 16, "min_frames": 2}}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vid(case: str, i: int) -> str:
    h = hashlib.blake2b(f"{case}{i}".encode(), digest_size=8).hexdigest()[:11]
    return h if case == "howto100m" else f"{h}_{i % 300:06d}_{i % 300 + 10:06d}"  # Kinetics: ytid_start_end


def make_sources(case: str, version: int, change: bool = True) -> tuple[list, object]:
    """The case's sources for version 1, or for version 2 (1% deleted, 1% added and, with ``change``, 1%
    changed, scattered; ``issue-100k``: only 1% deleted, the issue's measurement)."""
    import numpy as np

    from pipeline.data.datasets import Manifest, ManifestEntry
    from pipeline.ingest.plan import Source

    n, splits, num_classes = CASES[case]
    classes = [f"class {c:05d}" for c in range(num_classes)]
    index = list(range(n))
    changed: set[int] = set()
    if version == 2:
        rng = np.random.default_rng(0)
        pick = rng.permutation(n)
        k = n // 100
        deleted = set(pick[:k].tolist())
        changed = set() if case == "issue-100k" or not change else set(pick[k:2 * k].tolist())
        index = [i for i in index if i not in deleted] + ([] if case == "issue-100k" else list(range(n, n + k)))
    bounds, acc = [], 0.0
    for split, frac in splits.items():
        acc += frac
        bounds.append((acc * n, split))
    sources, entries = [], []
    for i in index:
        split = next((s for b, s in bounds if i < b), bounds[-1][1])
        vid = _vid(case, i)
        label = i % num_classes
        start = None if case == "howto100m" else float(i % 300)
        e = ManifestEntry(vid, (f"{vid}.mp4",), label if split != "test" else -1, classes[label], split, start,
                          None if start is None else start + 10)
        etag = hashlib.blake2b(f"{vid}{i in changed}".encode(), digest_size=16).hexdigest()
        sources.append(Source(e, f"s3://videos/{case}/{vid}.mp4", f"s3:{etag}:{1_000_000 + i}"))
        entries.append(e)
    return sources, Manifest(case, classes, entries)


def fake_build(plan) -> list[dict]:
    """What the shard tasks would return: each planned shard with its members, a made-up size and sha256."""
    from pipeline.data.shards import ShardInfo

    out = []
    for p in plan.build:
        keys = [s.entry.video_id for s in p.sources]
        out.append({"shard": ShardInfo(p.url, p.split, len(keys), 2_000_000 * len(keys),
                                       hashlib.sha256(p.url.encode()).hexdigest(), keys),
                    "quarantine": {}, "stats": {"bytes_in": 0}})
    return out


def commit(root: Path, manifest, sources, last, plan) -> dict:
    from pipeline.data.shards import commit_index, index_key
    from pipeline.data.storage import open_storage
    from pipeline.data.video import DecodeLimits
    from pipeline.ingest.run import assemble_index

    storage = open_storage(str(root))
    built = fake_build(plan)
    for r in built:  # commit_index checks that every listed shard is stored
        path = root / r["shard"].url
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    t = time.perf_counter()
    index = assemble_index(manifest.dataset, manifest, PRE, DecodeLimits(), sources, {}, last, plan, built)
    commit_index(storage, index)
    seconds = time.perf_counter() - t
    size = (root / index_key(index.version)).stat().st_size
    return {"commit_s": seconds, "index_bytes": size, "index_videos": index.num_samples(),
            "index_shards": len(index.shards)}


def step_plan(case: str, root: Path) -> dict:
    from pipeline.ingest.plan import make_plan

    sources, manifest = make_sources(case, 1)
    before = _rss_mib()
    t = time.perf_counter()
    plan = make_plan(sources, PRE, SAMPLES_PER_SHARD, None, labels=(manifest.classes, False))
    seconds = time.perf_counter() - t
    out = {"videos": len(sources), "plan_s": seconds, "rss_before_mib": before, "peak_mib": _peak_mib(),
           **plan.summary()}
    out.update(commit(root, manifest, sources, None, plan))
    out["peak_with_commit_mib"] = _peak_mib()
    return out


def step_diff(case: str, root: Path, old_plan_code: str | None = None, change: bool = True,
              do_commit: bool = True) -> dict:
    """``old_plan_code``: the path of an earlier plan.py to run on the same inputs, for comparison."""
    from pipeline.data.shards import load_index
    from pipeline.ingest.plan import make_plan

    sources, manifest = make_sources(case, 2, change)
    t = time.perf_counter()
    last, _ = load_index(str(root))
    load_s = time.perf_counter() - t
    before = _rss_mib()
    t = time.perf_counter()
    plan = make_plan(sources, PRE, SAMPLES_PER_SHARD, last, labels=(manifest.classes, False))
    seconds = time.perf_counter() - t
    out = {"videos": len(sources), "load_last_s": load_s, "diff_s": seconds, "rss_before_mib": before,
           "peak_mib": _peak_mib(), **plan.summary()}
    if old_plan_code is not None:  # the plan before tombstones (git HEAD's plan.py), on the same inputs
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_plan", old_plan_code)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_plan"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        old = module.make_plan(sources, PRE, SAMPLES_PER_SHARD, last, labels=(manifest.classes, False))
        out["before_keep_shards"] = len(old.keep)
        out["before_build_videos"] = sum(len(p.sources) for p in old.build)
    if do_commit:
        out.update(commit(root, manifest, sources, last, plan))
        out["peak_with_commit_mib"] = _peak_mib()
    return out


def step_load(root: Path) -> dict:
    from pipeline.data.shards import load_index

    before = _rss_mib()
    t = time.perf_counter()
    index, _ = load_index(str(root))
    seconds = time.perf_counter() - t
    out = {"load_s": seconds, "rss_before_mib": before, "peak_mib": _peak_mib(), "rss_after_mib": _rss_mib(),
           "videos": index.num_samples(), "shards": len(index.shards)}
    from pipeline.data.loader import loading_view  # (torch: after the load's peak was taken)

    out["full_pickle_bytes"] = len(pickle.dumps(index))
    # what the loader's stages hold (and each forked DataLoader worker with them): the split's view
    split = max({s.split for s in index.shards}, key=lambda name: index.num_samples(name))
    t = time.perf_counter()
    view = loading_view(index, split)
    out["view_s"] = time.perf_counter() - t
    out["view_split"], out["view_shards"] = split, len(view.shards)
    blob = pickle.dumps(view)
    out["view_pickle_bytes"] = len(blob)
    t = time.perf_counter()
    pickle.loads(blob)
    out["view_unpickle_s"] = time.perf_counter() - t
    return out


def run_step(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"step {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--step", choices=["plan", "diff", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--old-plan", help=argparse.SUPPRESS)
    ap.add_argument("--no-change", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        root = Path(args.root)
        if args.step == "plan":
            out = step_plan(args.case, root)
        elif args.step == "diff":
            out = step_diff(args.case, root, args.old_plan, change=not args.no_change,
                            do_commit=not args.no_change)
        else:
            out = step_load(root)
        print(json.dumps(out))
        return
    print(f"bench_plan_scale: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {SAMPLES_PER_SHARD} "
          f"samples per shard")
    repo = Path(__file__).resolve().parent.parent
    for case in args.cases:
        with tempfile.TemporaryDirectory(prefix=f"plan-{case}-") as tmp:
            root = Path(tmp) / "dataset"
            old_plan = None
            if case == "issue-100k":  # the plan before this change, for the before/after numbers
                old = subprocess.run(["git", "show", "HEAD~0:pipeline/ingest/plan.py"], cwd=repo, capture_output=True,
                                     text=True)
                if old.returncode == 0 and "def _diff" not in old.stdout:
                    old_plan = Path(tmp) / "old_plan.py"
                    old_plan.write_text(old.stdout)
            p = run_step(["--step", "plan", "--case", case, "--root", str(root)])
            print(f"\n== {case}: {p['videos']:,} videos ==")
            print(f"plan v1:  {p['plan_s']:.1f} s, peak RSS {p['peak_mib']:.0f} MiB (sources alone "
                  f"{p['rss_before_mib']:.0f} MiB); {p['build_shards']} shards to build, {p['build_videos']:,} videos")
            print(f"commit v1: {p['commit_s']:.1f} s (assemble + schema check + write); index "
                  f"{p['index_bytes'] / 2**20:.1f} MiB, {p['index_shards']} shards; peak RSS "
                  f"{p['peak_with_commit_mib']:.0f} MiB")
            variants = [["--no-change"], []] if case != "issue-100k" else [[]]
            for variant in variants:
                d = run_step(["--step", "diff", "--case", case, "--root", str(root), *variant]
                             + (["--old-plan", str(old_plan)] if old_plan else []))
                what = ("1% deleted" if case == "issue-100k" else "1% deleted + 1% added"
                        + ("" if variant else " + 1% changed"))
                work = d["build_videos"] / d["videos"]
                print(f"diff v2 ({what}): load v1 {d['load_last_s']:.1f} s, make_plan {d['diff_s']:.1f} s, peak "
                      f"RSS {d['peak_mib']:.0f} MiB (sources + v1 index {d['rss_before_mib']:.0f} MiB)")
                print(f"  shards kept {d['keep_shards']}, built {d['build_shards']}, compacted "
                      f"{d['compacted_shards']} (into {d['copy_shards']} copy shards, {d['copy_videos']} videos "
                      f"copied); videos to transcode {d['build_videos']:,} ({100 * work:.2f}% of {d['videos']:,}); "
                      f"dropped {d['dropped_videos']:,} (removed {d['removed_videos']:,}, changed "
                      f"{d['changed_videos']:,})")
            if "before_keep_shards" in d:
                print(f"  before tombstones (git HEAD's plan.py, same inputs): shards kept {d['before_keep_shards']}, "
                      f"videos to transcode {d['before_build_videos']:,}")
            print(f"commit v2: {d['commit_s']:.1f} s; index {d['index_bytes'] / 2**20:.1f} MiB, "
                  f"{d['index_shards']} shards, {d['index_videos']:,} videos; peak RSS "
                  f"{d['peak_with_commit_mib']:.0f} MiB")
            ld = run_step(["--step", "load", "--root", str(root)])
            print(f"load_index v2 (a rank at launch, fresh process): {ld['load_s']:.2f} s, peak RSS "
                  f"{ld['peak_mib']:.0f} MiB (imports {ld['rss_before_mib']:.0f} MiB; held after "
                  f"{ld['rss_after_mib']:.0f} MiB)")
            print(f"  a loader worker (forked by the DataLoader) holds the split's view, not the index: "
                  f"{ld['view_split']} {ld['view_shards']} shards, built in {ld['view_s']:.3f} s, "
                  f"{ld['view_pickle_bytes'] / 2**20:.2f} MiB pickled ({ld['view_unpickle_s']:.3f} s to unpickle) "
                  f"against {ld['full_pickle_bytes'] / 2**20:.1f} MiB for the whole index")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
