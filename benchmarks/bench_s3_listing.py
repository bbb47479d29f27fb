#!/usr/bin/env python
"""Listing an ``s3://`` source prefix of 100k objects: what the ingest's first step costs on a real S3 server.

    python benchmarks/bench_s3_listing.py                          # 100k objects, extrapolated to 650k and 1.2M
    python benchmarks/bench_s3_listing.py --objects 30000 --threads 32

A SeaweedFS server (``infra/seaweedfs.py``, ``weed mini`` on 127.0.0.1, credentials of its own, in a temporary
directory) gets a bucket and ``--objects`` tiny objects (a few bytes: the listing does not read them) named
``videos/<class>/<id>.mp4`` across ``--classes`` class folders, uploaded by a thread pool (timed, but not the
measured quantity). Then, alternately, ``--repeats`` times each:

- the product: ``_source_index("s3://<bucket>/videos")`` (pipeline/ingest/run.py), which lists through
  ``S3Storage.list`` (pipeline/data/storage.py: the boto3 ``list_objects_v2`` paginator) and builds the
  name/location, checksum and relative-path tables the ingest plans from;
- the baseline: a plain boto3 ``list_objects_v2`` paginator over the same prefix, keeping (key, size, ETag)
  per object and nothing else.

Every ListObjectsV2 request is counted on the client itself (a botocore ``before-call`` hook on the client the
product builds, reached through ``open_storage``), so "paginated" is measured, not assumed. Peak Python memory
is measured in one more run of each under ``tracemalloc`` (which slows it: its time is not reported), and the
process's peak RSS at the end. Kinetics-700 (650k) and HowTo100M (1.2M) objects are a linear extrapolation of
the time and memory per object measured here, not a measurement. The server is stopped by its pid at the end,
on errors and on SIGTERM.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # infra/ is not installed with the package

from infra.seaweedfs import SeaweedFS  # noqa: E402
from pipeline.data import storage as storage_mod  # noqa: E402
from pipeline.ingest import run as ingest_run  # noqa: E402
from pipeline.train.launch import job_environment  # noqa: E402

TARGETS = {"Kinetics-700": 650_000, "HowTo100M": 1_200_000}


class RequestCounter:
    """Counts ListObjectsV2 requests on every boto3 client it is attached to (the paginator's pages), and
    splits their time: sent until the response body is in (the server and the loopback), and botocore's
    parsing of the XML into dicts (before-parse until response-received). The listing is single-threaded."""

    def __init__(self) -> None:
        self.lock, self.calls, self.wire, self.parse = threading.Lock(), 0, 0.0, 0.0
        self._mark = 0.0
        self.attached: set[int] = set()

    def attach(self, client) -> None:
        if id(client) in self.attached:
            return
        self.attached.add(id(client))
        ev = client.meta.events
        ev.register("before-call.s3.ListObjectsV2", self._count)
        ev.register("before-send.s3.ListObjectsV2", self._sent)
        ev.register("before-parse.s3.ListObjectsV2", self._received)
        ev.register("response-received.s3.ListObjectsV2", self._parsed)

    def _count(self, **_) -> None:
        with self.lock:
            self.calls += 1

    def _sent(self, **_) -> None:
        self._mark = time.perf_counter()

    def _received(self, **_) -> None:
        now = time.perf_counter()
        self.wire += now - self._mark
        self._mark = now

    def _parsed(self, **_) -> None:
        self.parse += time.perf_counter() - self._mark

    def take(self) -> tuple[int, float, float]:
        with self.lock:
            out = self.calls, self.wire, self.parse
            self.calls, self.wire, self.parse = 0, 0.0, 0.0
            return out


def counting_open_storage(counter: RequestCounter):
    """``open_storage`` as the product calls it, with the request counter on the client it builds."""
    real = storage_mod.open_storage

    def open_storage(uri, **kwargs):
        st = real(uri, **kwargs)
        if isinstance(st, storage_mod.S3Storage):
            counter.attach(st.client)  # the client the listing will use (one per process, built now)
        return st

    return open_storage


def upload(server: SeaweedFS, bucket: str, n: int, classes: int, threads: int) -> float:
    """``n`` objects of a few bytes, ``videos/class_XXXX/video_XXXXXXX.mp4``, put by ``threads`` threads."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name="us-east-1",
        config=Config(max_pool_connections=threads, retries={"max_attempts": 8, "mode": "standard"},
                      request_checksum_calculation="when_required"))
    done, lock = [0], threading.Lock()
    t0 = time.perf_counter()

    def put(start: int) -> None:
        for i in range(start, n, threads):
            client.put_object(Bucket=bucket, Key=f"videos/class_{i % classes:04d}/video_{i:07d}.mp4",
                              Body=b"%07d" % i)
            with lock:
                done[0] += 1
                if done[0] % 10_000 == 0:
                    dt = time.perf_counter() - t0
                    print(f"  uploaded {done[0]:>7}  {dt:7.1f} s  {done[0] / dt:7.0f} objects/s", flush=True)

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(put, s) for s in range(threads)]:
            f.result()
    return time.perf_counter() - t0


def product_listing(source: str):
    names, sums, rels = ingest_run._source_index(source)
    return len(rels), (names, sums, rels)


def baseline_listing(client, bucket: str, prefix: str, counter: RequestCounter):
    counter.attach(client)
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out.append((obj["Key"], obj["Size"], obj["ETag"]))
    return len(out), out


def measure(fn, *args, traced: bool = False) -> tuple[int, float, int]:
    """(objects, seconds, peak traced bytes or 0); the result is dropped before returning."""
    gc.collect()
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    n, result = fn(*args)
    dt = time.perf_counter() - t0
    peak = 0
    if traced:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    del result
    gc.collect()
    return n, dt, peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=100_000, help="objects to upload and list (default 100000)")
    p.add_argument("--classes", type=int, default=400, help="class folders under videos/ (default 400)")
    p.add_argument("--threads", type=int, default=32, help="upload threads (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed listings of each kind (default 3)")
    args = p.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops the server
    work = Path(tempfile.mkdtemp(prefix="bench-s3-listing-"))
    server = SeaweedFS(work / "seaweedfs")
    bucket, prefix = "bench-listing", "videos"
    source = f"s3://{bucket}/{prefix}"
    print(f"S3 listing: {args.objects} objects in {args.classes} class folders under {source}; SeaweedFS "
          f"(weed mini) on 127.0.0.1; python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    try:
        t0 = time.perf_counter()
        server.start()
        server.create_bucket(bucket)
        print(f"  server up in {time.perf_counter() - t0:.1f} s (pid {server.proc.pid}, {server.endpoint})")
        print(f"upload ({args.threads} threads; not the measured quantity):", flush=True)
        t_up = upload(server, bucket, args.objects, args.classes, args.threads)
        print(f"  uploaded {args.objects} objects in {t_up:.1f} s ({args.objects / t_up:.0f} objects/s)", flush=True)

        counter = RequestCounter()
        ingest_run.open_storage = counting_open_storage(counter)  # the product's call, counted
        plain = server.client()
        runs = {"product": [], "baseline": []}
        pages = {}
        with job_environment(server.env()):  # the usual boto3 way: endpoint and credentials in the environment
            print(f"listing, alternately, {args.repeats} times each:", flush=True)
            for r in range(args.repeats):
                for kind in ("product", "baseline"):
                    fn = (product_listing, source) if kind == "product" else (
                        baseline_listing, plain, bucket, prefix + "/", counter)
                    n, dt, _ = measure(*fn)
                    calls, wire, parse = counter.take()
                    assert n == args.objects, f"{kind} listed {n} objects, expected {args.objects}"
                    runs[kind].append((dt, wire, parse))
                    pages[kind] = calls
                    print(f"  {kind:<9} run {r + 1}: {n} objects in {dt:6.2f} s  {n / dt:8.0f} objects/s  "
                          f"{calls} ListObjectsV2 requests; server + loopback {wire:5.2f} s, XML parsing "
                          f"(botocore) {parse:5.2f} s, the rest {dt - wire - parse:5.2f} s", flush=True)
            # the product's cost per call that does not grow with the listing (a boto3 session and client of
            # its own, the bucket check): an empty prefix, timed and traced, kept out of the per-object rate
            _, fixed_t, _ = measure(product_listing, f"s3://{bucket}/no-such-prefix")
            _, _, fixed_mem = measure(product_listing, f"s3://{bucket}/no-such-prefix", traced=True)
            counter.take()
            print(f"  product on an empty prefix (fixed cost per call): {fixed_t:.2f} s, peak "
                  f"{fixed_mem / 2**20:.1f} MiB", flush=True)
            peaks = {}
            for kind in ("product", "baseline"):
                fn = (product_listing, source) if kind == "product" else (
                    baseline_listing, plain, bucket, prefix + "/", counter)
                _, _, peaks[kind] = measure(*fn, traced=True)
                counter.take()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        print("results (best of the timed runs; peak Python memory from one more run under tracemalloc):")
        fastest = {k: min(v) for k, v in runs.items()}
        best = {k: v[0] for k, v in fastest.items()}
        for kind in ("product", "baseline"):
            what = ("_source_index -> S3Storage.list (paginated), tables built" if kind == "product"
                    else "plain boto3 list_objects_v2 paginator")
            print(f"  {kind:<9} {best[kind]:6.2f} s  {args.objects / best[kind]:8.0f} objects/s  "
                  f"{pages[kind]} requests ({args.objects / pages[kind]:.0f} objects per page)  "
                  f"peak {peaks[kind] / 2**20:6.1f} MiB ({peaks[kind] / args.objects:.0f} B/object)  [{what}]")
            _, wire, parse = fastest[kind]
            print(f"  {'':<9} of which server + loopback {wire:5.2f} s ({wire / best[kind]:.0%}), botocore XML "
                  f"parsing {parse:5.2f} s ({parse / best[kind]:.0%}), the rest {best[kind] - wire - parse:5.2f} s "
                  f"({(best[kind] - wire - parse) / best[kind]:.0%})")
        print(f"  product / baseline time: {best['product'] / best['baseline']:.2f}x; peak RSS of this process "
              f"{rss:.0f} MiB")
        print("extrapolated linearly (time and memory per object measured at "
              f"{args.objects} objects; an extrapolation, not a measurement):")
        print(f"  (product: its fixed cost per call, {fixed_t:.2f} s and {fixed_mem / 2**20:.1f} MiB, plus the "
              f"rest per object)")
        for name, target in TARGETS.items():
            t = fixed_t + (best["product"] - fixed_t) / args.objects * target
            tb = best["baseline"] / args.objects * target
            mem = fixed_mem + (peaks["product"] - fixed_mem) / args.objects * target
            per_page = args.objects / pages["product"]
            print(f"  {name} ({target} objects): product {t:6.1f} s (baseline {tb:6.1f} s), "
                  f"~{-(-target // per_page):.0f} requests, peak ~{mem / 2**20:.0f} MiB")
    finally:
        server.stop()
        print(f"server stopped (pid {server.proc.pid if server.proc else '-'})", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
