"""The shard plan (deterministic, incremental) and the ingest lease, without Ray."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from pipeline.data.datasets import ManifestEntry
from pipeline.data.shards import DatasetIndex, ShardInfo
from pipeline.data.storage import open_storage
from pipeline.ingest.plan import Source, make_plan
from pipeline.ingest.run import LEASE_KEY, IngestConfig, LeaseHeldError, acquire_lease, release_lease

PRE = {"transcode": {"fps": 16}}


def src(vid: str, sha: str = "a", split: str = "train", label: str = "x") -> Source:
    return Source(ManifestEntry(vid, (f"{vid}.mp4",), ord(label[0]), label, split), f"/videos/{vid}.mp4", sha)


def committed(plan, version=1, quarantine=None) -> DatasetIndex:
    shards = [ShardInfo(p.url, p.split, len(p.sources), 1, "0", [s.entry.video_id for s in p.sources])
              for p in plan.build]
    checksums = {s.entry.video_id: s.sha256 for p in plan.build for s in p.sources}
    return DatasetIndex("d", version, ["x"], PRE, shards, source_checksums=checksums, quarantine=quarantine or {})


def test_same_inputs_same_shards_in_any_order():
    sources = [src(f"v{i:02d}") for i in range(10)] + [src("w0", split="val")]
    a = make_plan(sources, PRE, 4)
    b = make_plan(list(reversed(sources)), PRE, 4)
    assert [p.name for p in a.build] == [p.name for p in b.build]
    assert [len(p.sources) for p in a.build] == [4, 4, 2, 1] and a.build[-1].split == "val"
    assert make_plan(sources, {"transcode": {"fps": 30}}, 4).build[0].name != a.build[0].name


def test_incremental_plans_keep_intact_shards_and_rebuild_only_what_changed():
    sources = [src(f"v{i:02d}") for i in range(8)]
    last = committed(make_plan(sources, PRE, 4))
    assert make_plan(sources, PRE, 4, last).is_noop
    added = make_plan(sources + [src("v99")], PRE, 4, last)
    assert len(added.keep) == 2 and [[s.entry.video_id for s in p.sources] for p in added.build] == [["v99"]]
    shard_of_v00 = sorted(next(s.keys for s in last.shards if "v00" in s.keys))
    # a changed or deleted member is tombstoned in its shard, which stays (tests/unit/test_incremental.py)
    changed = make_plan([src("v00", sha="b")] + sources[1:], PRE, 4, last)
    assert changed.changed == ["v00"] and len(changed.keep) == 2
    assert [s.dropped for s in changed.keep if "v00" in s.keys] == [["v00"]] and len(shard_of_v00) == 4
    assert [[s.entry.video_id for s in p.sources] for p in changed.build] == [["v00"]]
    deleted = make_plan(sources[1:], PRE, 4, last)
    assert deleted.removed == ["v00"] and len(deleted.keep) == 2 and not deleted.build


def test_shards_mix_classes_even_when_the_annotations_are_sorted_by_label():
    """Kinetics' CSVs (and our synthetic corpora) list videos class by class; a shard of one class would
    leave the loader's shuffle buffer nothing to mix."""
    sources = [src(f"{label}{i:03d}", label=label) for label in "abcd" for i in range(16)]
    plan = make_plan(sources, PRE, 16)
    assert len(plan.build) == 4
    for shard in plan.build:
        assert len({s.entry.label_name for s in shard.sources}) >= 3


def test_quarantined_videos_are_not_retried_until_their_source_changes():
    sources = [src("v0"), src("bad", sha="x")]
    last = committed(make_plan([sources[0]], PRE, 4),
                     quarantine={"bad": {"sha256": "x", "reason": "corrupt", "kind": "content"}})
    assert make_plan(sources, PRE, 4, last).is_noop
    retry = make_plan([sources[0], src("bad", sha="y")], PRE, 4, last)
    assert [s.entry.video_id for p in retry.build for s in p.sources] == ["bad"]


def test_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match=r"duplicate video ids in the manifest: \['v1'\]"):
        make_plan([src("v1"), src("v1")], PRE, 4)


def test_a_second_run_is_refused_while_the_lease_is_held(tmp_path):
    storage = open_storage(tmp_path)
    lease = acquire_lease(storage, 60)
    with pytest.raises(LeaseHeldError, match="another ingest run holds .*lease.json"):
        acquire_lease(storage, 60)
    release_lease(storage, lease)
    assert not storage.exists(LEASE_KEY)
    release_lease(storage, acquire_lease(storage, 60))


def test_expired_and_dead_leases_are_taken_over(tmp_path):
    storage = open_storage(tmp_path)
    expired = {"owner": "elsewhere:1:x", "started": 0, "expires": time.time() - 1}
    storage.put_bytes(LEASE_KEY, json.dumps(expired).encode())
    release_lease(storage, acquire_lease(storage, 60))  # expired
    dead_pid = 2**22 + 12345
    while True:
        try:
            os.kill(dead_pid, 0)
            dead_pid += 1
        except ProcessLookupError:
            break
    storage.put_bytes(LEASE_KEY, json.dumps({"owner": f"{socket.gethostname()}:{dead_pid}:x", "started": 0,
                                             "expires": time.time() + 3600}).encode())
    release_lease(storage, acquire_lease(storage, 60))  # its holder on this host is gone


def test_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: d\nformat: kinetics\nannotations: a.csv\nsource: s\noutput: o\nshard_size: 3\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown key 'shard_size'"):
        IngestConfig.load(str(cfg), [])
    required = ["dataset=d", "format=kinetics", "annotations=a.csv", "source=s", "output=o"]
    with pytest.raises(ValueError, match=r"command line: unknown key 'transcode.framerate'"):
        IngestConfig.load(None, required + ["transcode.framerate=30"])
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['output'\]"):
        IngestConfig.load(None, required[:-1])
    ok = IngestConfig.load(None, required + ["transcode.fps=25"])
    assert ok.transcode.fps == 25 and ok.annotations == ["a.csv"]


def test_missing_annotation_files_are_named(tmp_path):
    from pipeline.ingest.run import run_ingest

    cfg = IngestConfig.load(None, ["dataset=d", "format=kinetics", f"annotations={tmp_path / 'none.csv'}",
                                   f"source={tmp_path}", f"output={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match=r"annotation file\(s\) not found: .*none.csv.*config key 'annotations'"):
        run_ingest(cfg, dry_run=True, progress=False)
