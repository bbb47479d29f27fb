#!/usr/bin/env python
"""Ingest throughput: videos/s per core against a plain PyAV transcode loop over the same files in the
same run, and the speed-up from 1 to 2 Ray workers.

The plain loop decodes each file, scales every frame to the target short side in YUV and encodes it
with the same codec settings, one file after another on one core. The ingest runs the real job
(manifest, checksums, plan, Ray tasks, shard tars, upload to a local dataset root, verify, commit).

    python benchmarks/bench_ingest.py                 # 12 videos of 8 s at 480x360
    python benchmarks/bench_ingest.py --videos 24 --seconds 10
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.data.video import encode_video
from pipeline.ingest.run import IngestConfig, run_ingest
from pipeline.ingest.worker import TranscodeConfig


def make_sources(root: Path, videos: int, seconds: float) -> None:
    (root / "videos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for v in range(videos):
        base = rng.integers(0, 255, size=(90, 120, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        frames = [np.roll(base, shift=(t, 2 * t), axis=(0, 1)) for t in range(int(seconds * 30))]
        (root / "videos" / f"src{v:04d}.mp4").write_bytes(encode_video(frames, 30, keyframe_interval=60))
        rows.append({"label": f"c{v % 4}", "youtube_id": f"src{v:04d}", "time_start": 0,
                     "time_end": int(seconds), "split": "train"})
    with open(root / "annotations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plain_transcode(path: Path, cfg: TranscodeConfig, one_scaler: bool = False) -> int:
    """The reference: decode, scale in YUV, encode; returns the output size. Plain: ``frame.reformat``
    per frame (a new swscale context each time); ``one_scaler``: one VideoReformatter, as ingest does."""
    import av
    from av.video.reformatter import VideoReformatter

    scaler = VideoReformatter()
    out_buf = io.BytesIO()
    with av.open(str(path)) as src, av.open(out_buf, "w", format="mp4") as out:
        vs = src.streams.video[0]
        vs.thread_type, vs.thread_count = "SLICE", 1
        w, h = vs.codec_context.width, vs.codec_context.height
        s = cfg.short_side / min(w, h)
        tw, th = round(w * s / 2) * 2, round(h * s / 2) * 2
        enc = out.add_stream(cfg.codec, rate=round(cfg.fps))
        enc.width, enc.height, enc.pix_fmt = tw, th, "yuv420p"
        enc.options = {"g": str(cfg.keyframe_interval), "keyint_min": str(cfg.keyframe_interval),
                       "crf": str(cfg.crf), "preset": cfg.preset}
        for i, frame in enumerate(src.decode(vs)):
            f = (scaler.reformat(frame, width=tw, height=th, format="yuv420p") if one_scaler
                 else frame.reformat(width=tw, height=th, format="yuv420p"))
            f.pts = i
            for p in enc.encode(f):
                out.mux(p)
        for p in enc.encode():
            out.mux(p)
    return len(out_buf.getvalue())


def timed_ingest(root: Path, output: Path, workers: int, cfg: TranscodeConfig) -> float:
    import ray

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        ic = IngestConfig(dataset="bench", format="kinetics", annotations=[str(root / "annotations.csv")],
                          source=str(root / "videos"), output=str(output), samples_per_shard=1, transcode=cfg)
        t0 = time.perf_counter()
        result = run_ingest(ic, progress=False)
        elapsed = time.perf_counter() - t0
        if result.failed:
            raise RuntimeError(f"the benchmark corpus should ingest cleanly: {result.quarantine}")
        return elapsed
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cfg = TranscodeConfig(short_side=256, fps=30, keyframe_interval=16)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        t0 = time.perf_counter()
        make_sources(root, args.videos, args.seconds)
        print(f"sources: {args.videos} videos of {args.seconds:g}s at 480x360 30 fps "
              f"({time.perf_counter() - t0:.1f}s to make); target short side {cfg.short_side}, {cfg.fps:g} fps")
        rates = {}
        for one_scaler in (False, True):
            t0 = time.perf_counter()
            for path in sorted((root / "videos").glob("*.mp4")):
                plain_transcode(path, cfg, one_scaler)
            rates[one_scaler] = args.videos / (time.perf_counter() - t0)
        one = args.videos / timed_ingest(root, Path(tmp) / "out1", 1, cfg)
        two = args.videos / timed_ingest(root, Path(tmp) / "out2", 2, cfg)
    raw, raw1 = rates[False], rates[True]
    print(f"plain PyAV transcode, 1 core        : {raw:6.2f} videos/s  (frame.reformat per frame)")
    print(f"PyAV transcode, one scaler, 1 core  : {raw1:6.2f} videos/s")
    print(f"ingest, 1 Ray worker                : {one:6.2f} videos/s  ({one / raw:.2f} of plain, target >= 0.8; "
          f"{one / raw1:.2f} of one-scaler)")
    print(f"ingest, 2 Ray workers               : {two:6.2f} videos/s  (speed-up {two / one:.2f}x over 1 worker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
