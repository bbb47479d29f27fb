"""The dataset lease: renewed while a run works (a run longer than the lease keeps it, a second run is refused
all along), a lease taken over makes the first run commit nothing, and the conditional writes it rests on
(local files and a real SeaweedFS: ``If-Match``) refuse a version that is no longer there.

Shards are built in this process (run_ingest with Ray replaced by a slow serial loop over build_shard); the
videos are real H.264 files encoded here. Time is the test's: the lease's clock (``run.lease_clock``) is virtual
and the keeper's background thread renews at the ticks the test gives, so no stall of a loaded machine can let a
lease expire or a renewal come late."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

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

LEASE_S = 60.0  # renewed every 20 s of the lease's clock, which the tests move by hand (HandTicked)


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


class Ticks:
    """Stands in for the keeper's stop event: its background thread's ``wait(interval)`` returns at each tick the
    test gives (False: renew now) or when the keeper is stopped (True), never because real time passed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ticks = 0
        self._stopped = False

    def wait(self, timeout=None) -> bool:
        with self._cond:
            seen = self._ticks
            self._cond.wait_for(lambda: self._stopped or self._ticks != seen)
            return self._stopped

    def tick(self) -> None:
        with self._cond:
            self._ticks += 1
            self._cond.notify_all()

    def set(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


@pytest.fixture
def hand_time(monkeypatch):
    """The lease's clock as a number the test moves, and the run's ``LeaseKeeper`` (its real background thread)
    renewing at the test's ticks: ``tick(seconds)`` moves the clock, lets the keeper's thread run one renewal and
    waits (at most 30 s, a hang guard only) until it is done."""
    clock = {"now": 1_700_000_000.0}
    keepers: list = []

    class HandTicked(ingest_run.LeaseKeeper):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self._stop = Ticks()
            keepers.append(self)

    def tick(seconds: float) -> None:
        keeper = keepers[-1]
        clock["now"] += seconds
        done = keeper.renewals + (keeper.lost is not None)
        keeper._stop.tick()
        deadline = time.monotonic() + 30
        while keeper.renewals + (keeper.lost is not None) == done and keeper._thread.is_alive():
            assert time.monotonic() < deadline, "the lease keeper's thread never renewed"
            time.sleep(0.01)

    monkeypatch.setattr(ingest_run, "lease_clock", lambda: clock["now"])
    monkeypatch.setattr(ingest_run, "LeaseKeeper", HandTicked)
    return SimpleNamespace(clock=clock, keepers=keepers, tick=tick)


def test_a_run_longer_than_its_lease_keeps_it_and_a_second_run_is_refused_all_along(tmp_path, slow_build,
                                                                                   hand_time):
    gate, building = slow_build
    cfg = folder_config(tmp_path)
    storage = open_storage(cfg.output)
    t, out = in_thread(lambda: run_ingest(cfg, progress=False))
    assert building.wait(30)
    first, version = storage.get_versioned(LEASE_KEY)
    first = json.loads(first)
    assert first["expires"] == hand_time.clock["now"] + LEASE_S
    versions = [version]
    for i in range(1, 7):  # every third of the lease, to twice past its first expiry
        hand_time.tick(LEASE_S / 3)
        data, version = storage.get_versioned(LEASE_KEY)
        now = json.loads(data)
        assert hand_time.keepers[-1].renewals == i and version not in versions  # renewed at each tick
        versions.append(version)
        assert now["owner"] == first["owner"] and now["started"] == first["started"]  # still ours
        assert now["renewed"] == hand_time.clock["now"] and now["expires"] == hand_time.clock["now"] + LEASE_S
        with pytest.raises(LeaseHeldError, match=r"skipped: another ingest run holds the dataset lease .*lease\.json "
                                                 r"since .* \(.*:\d+:\w+; last renewed"):
            acquire_lease(storage, 60)
    assert hand_time.clock["now"] == first["expires"] + LEASE_S  # a lease never renewed would be long gone
    gate.set()
    t.join(60)
    assert "error" not in out, out.get("error")
    assert out["result"].version == 1 and out["result"].videos_out == 2
    assert hand_time.keepers[-1].renewals == 7  # and once more right before the commit (confirm)
    assert not hand_time.keepers[-1]._thread.is_alive()  # stopped with the run
    assert not storage.exists(LEASE_KEY)  # released at the end


def test_a_run_whose_lease_was_taken_over_commits_nothing(tmp_path, slow_build, hand_time, caplog):
    gate, building = slow_build
    cfg = folder_config(tmp_path)
    storage = open_storage(cfg.output)
    t, out = in_thread(lambda: run_ingest(cfg, progress=False))
    assert building.wait(30)
    hand_time.tick(LEASE_S / 3)  # one renewal of its own first
    now = hand_time.clock["now"]
    other = {"owner": "elsewhere:1:thief", "started": now, "expires": now + 3600}
    storage.put_bytes(LEASE_KEY, json.dumps(other).encode())  # e.g. taken over after a long stall
    hand_time.tick(LEASE_S / 3)  # the next renewal tick notices
    keeper = hand_time.keepers[-1]
    assert keeper.renewals == 1 and isinstance(keeper.lost, LeaseLostError)
    keeper._thread.join(30)
    assert not keeper._thread.is_alive()  # a lost lease stops the renewals
    assert "lost the dataset lease, it is now held by elsewhere:1:thief" in caplog.text
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
