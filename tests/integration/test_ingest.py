"""Ingestion with a local Ray into a real S3 server (SeaweedFS): quarantine, no-op rerun, incremental
version, refused concurrent run; one hostile video among good ones; the local Ray listens on loopback."""

from __future__ import annotations

import csv
import json
import time

import pytest

from pipeline.data.shards import load_index, verify_shard
from pipeline.data.storage import open_storage
from pipeline.data.synthetic import make_corpus, make_video
from pipeline.ingest.run import LEASE_KEY, IngestConfig, LeaseHeldError, run_ingest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.ingest.run import start_local_ray

    start_local_ray(num_cpus=2)  # on 127.0.0.1 only, as an ingest's own Ray
    yield
    ray.shutdown()


def config(root, output) -> IngestConfig:
    return IngestConfig.load(None, ["dataset=synthetic-motion", "format=kinetics",
                                    f"annotations={root / 'annotations.csv'}", f"source={root / 'videos'}",
                                    f"output={output}", "samples_per_shard=3", "transcode.short_side=48",
                                    "transcode.fps=16", "transcode.keyframe_interval=8"])


def test_ingest_quarantines_exactly_the_broken_videos_and_reruns_incrementally(tmp_path, s3_bucket, ray_local):
    root = tmp_path / "src"
    make_corpus(root, "motion", per_class={"train": 2, "val": 1})  # 12 videos
    videos = root / "videos"
    (videos / "motion00002.mp4").write_bytes(b"")  # zero bytes
    (videos / "motion00006.mp4").write_bytes((videos / "motion00006.mp4").read_bytes()[:700])  # truncated
    (videos / "motion00009.mp4").write_bytes(b"RIFF....not a video at all" * 40)  # garbage
    broken = {"motion00002_000000_000002", "motion00006_000000_000002", "motion00009_000000_000002"}
    output = f"s3://{s3_bucket}/datasets/synthetic-motion"
    cfg = config(root, output)

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_ingest(cfg, progress=False, tracking_uri=tracking)
    assert first.version == 1 and first.videos_in == 12 and first.videos_out == 9
    assert set(first.quarantine) == broken
    assert all(q["reason"] for q in first.quarantine.values())
    index, storage = load_index(output)
    assert index.num_samples() == 9 and not (broken & {k for s in index.shards for k in s.keys})
    for shard in index.shards:
        verify_shard(storage, shard)
    report = json.loads(storage.get_bytes("reports/v000001-quarantine.json"))
    assert set(report) == broken
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=tracking).get_run(first.mlflow_run_id)
    assert run.data.metrics["videos_failed"] == 3 and run.data.metrics["videos_out"] == 9
    assert run.data.params["version"] == "1"
    # the artifacts (quarantine.json) are next to the store, as a training run's: not in ./mlruns
    assert run.info.artifact_uri == (tmp_path / "mlartifacts" / first.mlflow_run_id / "artifacts").as_uri()
    assert (tmp_path / "mlartifacts" / first.mlflow_run_id / "artifacts" / "quarantine.json").exists()
    assert not storage.exists(LEASE_KEY)

    again = run_ingest(cfg, progress=False)
    assert again.version is None and "nothing to do" in again.message
    assert load_index(output)[0].version == 1

    (videos / "new0.mp4").write_bytes(make_video("motion", "moving_up", seed=77))
    (videos / "new1.mp4").write_bytes(make_video("motion", "moving_down", seed=78))
    with open(root / "annotations.csv", "a", newline="") as f:
        w = csv.writer(f)
        w.writerow(["moving_up", "new0", 0, 2, "train"])
        w.writerow(["moving_down", "new1", 0, 2, "train"])
    second = run_ingest(cfg, progress=False)
    assert second.version == 2
    v2, _ = load_index(output)
    old_urls = {s.url for s in index.shards}
    new_shards = [s for s in v2.shards if s.url not in old_urls]
    assert old_urls <= {s.url for s in v2.shards}  # untouched shards are reused, not rewritten
    assert {k for s in new_shards for k in s.keys} == {"new0_000000_000002", "new1_000000_000002"}
    assert load_index(output, version=1)[0].num_samples() == 9  # the old version stays readable

    storage.put_bytes(LEASE_KEY, json.dumps({"owner": "another-host:1:x", "started": time.time(),
                                             "expires": time.time() + 600}).encode())
    (videos / "new2.mp4").write_bytes(make_video("motion", "moving_up", seed=79))
    with open(root / "annotations.csv", "a", newline="") as f:
        csv.writer(f).writerow(["moving_up", "new2", 0, 2, "train"])
    with pytest.raises(LeaseHeldError, match="another-host:1:x"):
        run_ingest(cfg, progress=False)
    assert load_index(output)[0].version == 2


def test_dry_run_writes_nothing_and_a_missing_bucket_is_explained(tmp_path, seaweedfs, ray_local):
    root = tmp_path / "src"
    make_corpus(root, "colour", per_class={"train": 1})
    cfg = config(root, "s3://no-such-ingest-bucket/ds")
    with pytest.raises(Exception, match="bucket 'no-such-ingest-bucket' does not exist"):
        run_ingest(cfg, dry_run=True, progress=False)
    seaweedfs.create_bucket("dry-run-bucket")
    dry = run_ingest(config(root, "s3://dry-run-bucket/ds"), dry_run=True, progress=False)
    assert dry.version is None and dry.plan["build_videos"] == 4
    assert open_storage("s3://dry-run-bucket/ds").list() == []


def test_a_killed_run_resumes_to_a_complete_index_without_duplicates(tmp_path, s3_bucket, seaweedfs):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "src"
    make_corpus(root, "motion", per_class={"train": 6})  # 24 videos, one per shard
    output = f"s3://{s3_bucket}/datasets/killed"
    cmd = [sys.executable, "jobs/ingest.py", "--no-progress", "dataset=killed", "format=kinetics",
           f"annotations={root / 'annotations.csv'}", f"source={root / 'videos'}", f"output={output}",
           "samples_per_shard=1", "transcode.short_side=48", "transcode.fps=16", "max_in_flight=1"]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(cmd, cwd=repo, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    storage = open_storage(output)
    deadline = time.time() + 120
    while time.time() < deadline and len([o for o in storage.list("shards/") if o.key.endswith(".tar")]) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-run
    proc.wait(timeout=30)
    stored_before = [o.key for o in storage.list("shards/")]
    assert 3 <= len(stored_before) < 24, "the kill should land mid-run"
    assert not storage.list("indexes/")  # nothing committed: readers see no partial version

    rerun = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    index, _ = load_index(output)
    keys = [k for s in index.shards for k in s.keys]
    assert len(keys) == len(set(keys)) == 24  # none missing, none twice
    for shard in index.shards:
        verify_shard(storage, shard)  # every referenced object is complete
    assert set(stored_before) <= {s.url for s in index.shards}  # the killed run's shards were reused
    again = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_sources_from_an_s3_prefix_and_from_a_file_list(tmp_path, s3_bucket, ray_local):
    root = tmp_path / "src"
    make_corpus(root, "colour", per_class={"train": 1})  # 4 videos
    src = open_storage(f"s3://{s3_bucket}/raw/videos")
    for f in sorted((root / "videos").iterdir()):
        src.put_file(f.name, f)
    cfg = config(root, f"s3://{s3_bucket}/datasets/from-s3")
    cfg.source = f"s3://{s3_bucket}/raw/videos"
    first = run_ingest(cfg, progress=False)
    assert first.version == 1 and first.videos_out == 4 and not first.quarantine
    assert run_ingest(cfg, progress=False).version is None  # ETag checksums: unchanged means no work
    src.put_bytes("colour00001.mp4", make_video("colour", "green", seed=999))  # the source changed
    changed = run_ingest(cfg, progress=False)
    assert changed.version == 2 and changed.plan["changed_videos"] == 1

    listing = tmp_path / "list.txt"
    videos = sorted((root / "videos").iterdir())
    listing.write_text("# local paths and s3 URIs may mix\n" + str(videos[0]) + "\n"
                       + "\n".join(src.uri(v.name) for v in videos[1:]) + "\n")
    cfg2 = config(root, f"s3://{s3_bucket}/datasets/from-list")
    cfg2.source = str(listing)
    listed = run_ingest(cfg2, progress=False)
    assert listed.version == 1 and listed.videos_out == 4 and not listed.quarantine


def test_a_killed_ray_worker_is_retried_and_the_run_completes(tmp_path, s3_bucket, ray_local):
    import signal
    import threading

    import psutil

    root = tmp_path / "src"
    make_corpus(root, "motion", per_class={"train": 4})  # 16 videos, one per shard
    cfg = config(root, f"s3://{s3_bucket}/datasets/worker-killed")
    cfg.samples_per_shard, cfg.max_in_flight = 1, 2
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", run_ingest(cfg, progress=False)))
    runner.start()
    killed = None
    deadline = time.time() + 60
    while killed is None and time.time() < deadline and runner.is_alive():
        for proc in psutil.process_iter(["name", "cmdline"]):
            if "build_shard" in " ".join(proc.info["cmdline"] or []) or "build_shard" in (proc.info["name"] or ""):
                proc.send_signal(signal.SIGKILL)  # a worker dies mid-task
                killed = proc.pid
                break
        time.sleep(0.05)
    runner.join(timeout=300)
    assert killed is not None, "no running shard task was found to kill"
    r = result["r"]
    assert r.version == 1 and r.videos_out == 16 and not r.quarantine
    index, storage = load_index(cfg.output)
    keys = [k for s in index.shards for k in s.keys]
    assert len(keys) == len(set(keys)) == 16
    for shard in index.shards:
        verify_shard(storage, shard)


def test_six_good_videos_and_one_that_libx264_refuses_commit_the_six(tmp_path, ray_local):
    """A 2x2048 video made libx264 refuse to open (av.error.ExternalError): the shard task failed with a Ray
    traceback naming no file and the six good videos were not committed."""
    import numpy as np

    from pipeline.data.video import encode_video

    root = tmp_path / "src"
    make_corpus(root, "colour", per_class={"train": 2})  # 8 videos
    videos = sorted((root / "videos").iterdir())
    thin = videos[3]
    thin.write_bytes(encode_video(np.zeros((3, 2048, 2, 3), np.uint8), fps=10, codec="mpeg4", container="avi"))
    videos[5].unlink()  # and one listed video is missing: 6 good ones remain
    cfg = config(root, tmp_path / "out")
    cfg.samples_per_shard = 8  # all in one shard
    result = run_ingest(cfg, progress=False)
    assert result.version == 1 and result.videos_out == 6 and len(result.quarantine) == 2
    bad = next(k for k in result.quarantine if k.startswith(thin.stem))
    q = result.quarantine[bad]
    assert q["kind"] == "content" and q["reason"].startswith(f"{thin}: the libx264 encoder refused the 48x49152")
    index, storage = load_index(cfg.output)
    assert index.num_samples() == 6 and len(index.shards) == 1
    verify_shard(storage, index.shards[0])


LISTENERS = r"""
import json, os
os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
import psutil
import ray  # imported before the ingest starts its Ray: Ray has read its environment by now
from pipeline.ingest.run import start_local_ray
start_local_ray(num_cpus=1)
@ray.remote
def task():
    return os.getpid()
ray.get([task.remote() for _ in range(2)])  # worker processes too
me = psutil.Process()
found = set()
for proc in [me, *me.children(recursive=True)]:
    try:
        found |= {(c.laddr.ip, proc.name()) for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
ray.shutdown()
print(json.dumps(sorted(found)))
"""


def test_the_local_ray_of_an_ingest_listens_on_loopback_only():
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", LISTENERS], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    listeners = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name for _, name in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the sockets were seen at all
    outside = [(ip, name) for ip, name in listeners if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not outside, f"listening beyond loopback: {outside}"
