#!/usr/bin/env python
"""Change detection of local sources: what a no-op scheduled run costs when nothing changed.

    python benchmarks/bench_change_detection.py                      # 100k real files, extrapolated to 1.2M
    python benchmarks/bench_change_detection.py --files 20000 --target 650000

Measured, with the real code (``_source_index``/``read_folder``/``resolve_sources``/``SourceCache``):
1. ``--files`` real files (tiny: the bytes do not matter once they are not read) in class folders under a
   temporary directory, modified an hour ago; a first run with no cache (every file hashed) writes the
   checksum cache into a local dataset root.
2. The no-op run: the cache loaded from the dataset root, the source walked, the folder manifest read, every
   file stat'ed and looked up; the hash function is counted and must not be called (no source bytes read).
3. At ``--target`` entries, in memory and on disk: the cache written and loaded (gzip JSON) and looked up
   once per file.
The no-op run at ``--target`` files is extrapolated: (walk + manifest + stat/lookup) per file at ``--files``,
times ``--target``, plus the cache load measured at ``--target``. Creating 1.2M real files would take this
disk longer than the measurement itself; the per-file cost is linear (one directory entry, one stat, one
dict lookup).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipeline.data.datasets import read_folder
from pipeline.data.storage import open_storage
from pipeline.ingest import run as ingest_run
from pipeline.ingest.run import SOURCES_CACHE_KEY, SourceCache, _source_index, resolve_sources


def timed(label: str, fn, *args, **kwargs):
    gc.collect()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    dt = time.perf_counter() - t0
    print(f"  {label:<52} {dt:8.2f} s", flush=True)
    return out, dt


def make_files(root: Path, n: int, per_class: int = 1000) -> None:
    past = time.time() - 3600
    for i in range(n):
        d = root / f"class_{i // per_class:04d}"
        if i % per_class == 0:
            d.mkdir(parents=True, exist_ok=True)
        p = d / f"video_{i:07d}.mp4"
        with open(p, "wb") as f:
            f.write(b"%07d" % i)
        os.utime(p, (past, past))


def noop_run(source: str, dataset_root: str, counter: list[int]) -> dict[str, float]:
    """The change-detection part of a scheduled run (run_ingest up to the plan), timed by step."""
    storage = open_storage(dataset_root)
    cache, t_load = timed("cache load (gzip JSON)", SourceCache.load, storage)
    (names_rels), t_walk = timed("walk the source (_source_index)", _source_index, source)
    manifest, t_manifest = timed("folder manifest (read_folder)", read_folder, names_rels[2], "bench")
    before = counter[0]
    (sources, missing), t_resolve = timed("stat + cache lookup (resolve_sources)", resolve_sources, manifest,
                                          source, cache)
    _, t_save = timed("cache save (skipped when unchanged)", cache.save, storage)
    assert not missing, f"{len(missing)} missing"
    return {"load": t_load, "walk": t_walk, "manifest": t_manifest, "resolve": t_resolve, "save": t_save,
            "hashed": counter[0] - before, "hits": cache.hits, "sources": len(sources)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=100_000, help="real files to create and walk (default 100000)")
    p.add_argument("--target", type=int, default=1_200_000, help="listed files to extrapolate to (default 1.2M)")
    p.add_argument("--dir", help="where to create the files (default: a temporary directory, removed after)")
    args = p.parse_args(argv)

    counter = [0]
    real_hash = ingest_run.sha256_file

    def counting_hash(path):
        counter[0] += 1
        return real_hash(path)

    ingest_run.sha256_file = counting_hash  # every full read of a local source goes through it
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-change-"))
    source, root = work / "videos", work / "dataset"
    print(f"change detection: {args.files} real files under {source}; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs", flush=True)
    try:
        _, t_make = timed(f"create {args.files} files", make_files, source, args.files)

        print("first run (no cache: every file hashed, the cache written):")
        first = noop_run(str(source), str(root), counter)
        cache_bytes = (root / SOURCES_CACHE_KEY).stat().st_size
        print(f"  hashed {first['hashed']} files; cache {cache_bytes / 1e6:.1f} MB")

        print("no-op run (the cache loaded from the dataset root):")
        noop = noop_run(str(source), str(root), counter)
        per_file = (noop["walk"] + noop["manifest"] + noop["resolve"]) / args.files
        print(f"  hashed {noop['hashed']} files (no source bytes read), cache hits {noop['hits']}; "
              f"{per_file * 1e6:.1f} us per file for walk + manifest + stat/lookup")
        assert noop["hashed"] == 0 and noop["hits"] == args.files

        print(f"the cache at {args.target} entries (synthetic paths, real gzip JSON file):")
        big = SourceCache({f"/data/howto100m/videos/class_{i // 1000:04d}/video_{i:07d}.mp4":
                           [1_000_000 + i, 1_700_000_000_000_000_000 + i, os.urandom(32).hex()]
                           for i in range(args.target)})
        big.new = dict(big.old)
        big.old = {}
        big_root = open_storage(work / "big")
        _, t_big_save = timed("cache save", big.save, big_root)
        big_bytes = (work / "big" / SOURCES_CACHE_KEY).stat().st_size
        loaded, t_big_load = timed("cache load", SourceCache.load, big_root)
        keys = list(loaded.old)

        def lookups():
            hits = 0
            for k in keys:  # what checksum() does after its stat
                known = loaded.old.get(k)
                if known is not None and known[0] == known[0] and known[1] == known[1]:
                    hits += 1
            return hits

        _, t_lookup = timed(f"{len(keys)} lookups (in memory)", lookups)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  cache file {big_bytes / 1e6:.1f} MB; peak RSS of this process {rss:.0f} MiB")

        estimate = per_file * args.target + t_big_load
        print(f"no-op scheduled run over {args.target} files (extrapolated: {per_file * 1e6:.1f} us/file measured "
              f"at {args.files} files x {args.target}, plus the cache load measured at {args.target}): "
              f"{estimate:.1f} s; target 120 s: {'met' if estimate < 120 else 'MISSED'}; source files hashed: 0")
        print(f"(creating the {args.files} files took {t_make:.1f} s; the first, uncached run hashed them all)")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
