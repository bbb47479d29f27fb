"""The dataset lease: renewed while a run works (a run longer than the lease keeps it, a second run is refused
all along), a lease taken over makes the first run commit nothing, and the conditional writes it rests on
(local files and a real SeaweedFS: ``If-Match``) refuse a version that is no longer there.

Shards are built in this process (run_ingest with Ray replaced by a slow serial loop over build_shard); the
videos are real H.264 files encoded here."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipeline.cli.ingest import main as ingest_main
from pipeline.data.storage import ObjectChangedError, StorageError, open_storage
from pipeline.data.video import encode_video
from pipeline.ingest import run as ingest_run
from pipeline.ingest.run import (
    LEASE_KEY,
    IngestConfig,
    LeaseHeldError,
    LeaseLostError,
    acquire_lease,
    release_lease,
    renew_lease,
    run_ingest,
)
from pipeline.ingest.worker import build_shard

from .test_video import numbered_frames

LEASE_S = 1.5  # renewed every 0.5 s


def folder_config(tmp_path, *extra: str) -> IngestConfig:
    for name in ("a", "b"):
        path = tmp_path / "videos" / "walk" / f"{name}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_video(numbered_frames(6, 32, 48), fps=10))
    return IngestConfig.load(None, ["dataset=mine", "format=folder", f"source={tmp_path / 'videos'}",
                                    f"output={tmp_path / 'out'}", "samples_per_shard=4", "transcode.short_side=32",
                                    "transcode.fps=10", "transcode.keyframe_interval=4", "transcode.min_frames=1",
                                    f"lease_seconds={LEASE_S}", *extra])


@pytest.fixture
def slow_build(monkeypatch):
    """Ray replaced by a serial build that first waits until the test says go (``gate``)."""
    gate, building = threading.Event(), threading.Event()

    def build_all(plan, cfg, ray_address, progress):
        building.set()
        assert gate.wait(30), "the test never let the build finish"
        return [build_shard(p, cfg.output, cfg.dataset, cfg.transcode, cfg.decode_limits()) for p in plan.build]

    monkeypatch.setattr(ingest_run, "_build_all", build_all)
    return gate, building


def in_thread(fn):
    out: dict = {}

    def target():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def stored_lease(cfg) -> dict:
    return json.loads(open_storage(cfg.output).get_bytes(LEASE_KEY))


def test_a_run_longer_than_its_lease_keeps_it_and_a_second_run_is_refused_all_along(tmp_path, slow_build):
    gate, building = slow_build
    cfg = folder_config(tmp_path)
    t, out = in_thread(lambda: run_ingest(cfg, progress=False))
    assert building.wait(30)
    first = stored_lease(cfg)
    deadline = first["expires"] + 2 * LEASE_S  # well past the lease's first expiry
    refusals = 0
    while time.time() < deadline:
        with pytest.raises(LeaseHeldError, match=r"skipped: another ingest run holds the dataset lease .*lease\.json "
                                                 r"since .* \(.*:\d+:\w+; last renewed"):
            acquire_lease(open_storage(cfg.output), 60)
        refusals += 1
        time.sleep(0.2)
    now = stored_lease(cfg)
    assert now["owner"] == first["owner"] and now["expires"] > time.time()  # renewed, still ours
    assert now["renewed"] > first["expires"] - LEASE_S  # renewed after it started
    gate.set()
    t.join(60)
    assert "error" not in out, out.get("error")
    assert out["result"].version == 1 and out["result"].videos_out == 2
    assert refusals >= 10
    assert not open_storage(cfg.output).exists(LEASE_KEY)  # released at the end


def test_a_run_whose_lease_was_taken_over_commits_nothing(tmp_path, slow_build, caplog):
    gate, building = slow_build
    cfg = folder_config(tmp_path)
    storage = open_storage(cfg.output)
    t, out = in_thread(lambda: run_ingest(cfg, progress=False))
    assert building.wait(30)
    other = {"owner": "elsewhere:1:thief", "started": time.time(), "expires": time.time() + 3600}
    storage.put_bytes(LEASE_KEY, json.dumps(other).encode())  # e.g. taken over after a long stall
    time.sleep(LEASE_S)  # a renewal tick notices
    gate.set()
    t.join(60)
    assert isinstance(out.get("error"), LeaseLostError), out
    assert "lost the dataset lease, it is now held by elsewhere:1:thief; nothing is committed" in str(out["error"])
    assert not storage.list("indexes/")  # never committed under another's lease
    assert stored_lease(cfg)["owner"] == "elsewhere:1:thief"  # and the other run's lease is left alone


def test_renewal_and_release_never_touch_a_lease_that_is_not_ours(tmp_path):
    storage = open_storage(tmp_path)
    lease = acquire_lease(storage, 60)
    renew_lease(storage, lease, 120)
    assert stored_lease_at(storage)["expires"] == pytest.approx(time.time() + 120, abs=5)
    storage.put_bytes(LEASE_KEY, json.dumps({"owner": "x:1:y", "started": 0, "expires": time.time() + 60}).encode())
    with pytest.raises(LeaseLostError, match="now held by x:1:y"):
        renew_lease(storage, lease, 120)
    release_lease(storage, lease)
    assert stored_lease_at(storage)["owner"] == "x:1:y"
    storage.delete(LEASE_KEY)
    with pytest.raises(LeaseLostError, match="it was removed"):
        renew_lease(storage, lease, 120)


def stored_lease_at(storage) -> dict:
    return json.loads(storage.get_bytes(LEASE_KEY))


def test_an_overlapping_run_exits_3_with_a_skip_line_and_changes_nothing(tmp_path, capsys):
    cfg = folder_config(tmp_path)
    storage = open_storage(cfg.output)
    held = acquire_lease(storage, 60)
    args = ["--source", cfg.source, "--output", cfg.output, "--no-progress", "dataset=mine", "format=folder",
            "transcode.short_side=32"]
    assert ingest_main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("ingest: skipped: another ingest run holds the dataset lease ")
    assert held["owner"] in err and "exit code 3" in err
    assert stored_lease_at(storage)["owner"] == held["owner"] and not storage.list("indexes/")
    release_lease(storage, held)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_conditional_replace_and_delete(where, tmp_path, request):
    if where == "s3":
        storage = open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/root")
    else:
        storage = open_storage(tmp_path)
    v1 = storage.put_bytes("obj.json", b"one", if_absent=True)
    data, version = storage.get_versioned("obj.json")
    assert (data, version) == (b"one", v1)
    with pytest.raises(StorageError, match="already exists"):
        storage.put_bytes("obj.json", b"x", if_absent=True)
    v2 = storage.put_bytes("obj.json", b"two", if_match=v1)
    assert v2 != v1 and storage.get_versioned("obj.json") == (b"two", v2)
    with pytest.raises(ObjectChangedError, match="obj.json: changed"):
        storage.put_bytes("obj.json", b"three", if_match=v1)  # a stale version
    with pytest.raises(ObjectChangedError, match="obj.json: changed"):
        storage.delete("obj.json", if_match=v1)
    assert storage.get_bytes("obj.json") == b"two"
    storage.delete("obj.json", if_match=v2)
    assert not storage.exists("obj.json")
    with pytest.raises(ObjectChangedError):
        storage.put_bytes("obj.json", b"four", if_match=v2)  # gone: not recreated
    assert not storage.exists("obj.json")
    assert [o.key for o in storage.list()] == []  # a local lock file is hidden


def test_concurrent_conditional_replaces_on_local_storage_let_exactly_one_win(tmp_path):
    storage = open_storage(tmp_path)
    v = storage.put_bytes("lease.json", b"start")
    wins, barrier = [], threading.Barrier(8)

    def writer(i):
        barrier.wait()
        try:
            storage.put_bytes("lease.json", f"writer {i}".encode(), if_match=v)
            wins.append(i)
        except ObjectChangedError:
            pass

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(wins) == 1 and storage.get_bytes("lease.json") == f"writer {wins[0]}".encode()
