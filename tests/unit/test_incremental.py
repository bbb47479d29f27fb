"""Incremental versions: a deleted, changed or moved video is tombstoned in its shard (the shard stays, the
index's ``dropped`` says which of its samples are gone, every count leaves them out, the loader passes over
them), changed and new videos go into new shards, and a shard whose live fraction falls below
``compact_below`` is repacked by copying its survivors' transcoded bytes (never transcoding them again).

Planning on made-up shard entries; reading, copying and ingesting on real local shards of real encoded
videos (the end-to-end run replaces Ray by a serial loop over the same ``build_shard``)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import pytest
import torch

from pipeline.data.datasets import Manifest, ManifestEntry
from pipeline.data.loader import ClipConfig, make_loader
from pipeline.data.shards import (
    DatasetIndex,
    ShardError,
    ShardInfo,
    ShardSample,
    commit_index,
    load_index,
    put_shard,
    read_shard,
    sha256_of,
    verify_shard,
)
from pipeline.data.storage import open_storage
from pipeline.data.synthetic import COLOUR_CLASSES, make_video
from pipeline.data.video import DecodeLimits
from pipeline.ingest import run as ingest_run
from pipeline.ingest import worker
from pipeline.ingest.plan import Source, make_plan
from pipeline.ingest.run import assemble_index, run_ingest
from pipeline.train import evaluate

from .test_own_dataset import ingest_config, video

PRE = {"transcode": {"fps": 16}}
CLASSES = ["x"]
CLIP = ClipConfig(num_frames=2, sampling_rate=8, crop=32, scale=(32, 40), flip=False)


def src(vid: str, sha: str = "a", split: str = "train") -> Source:
    return Source(ManifestEntry(vid, (f"{vid}.mp4",), 0, "x", split), f"/videos/{vid}.mp4", sha)


def fake_built(plan) -> list[dict]:
    """The shard tasks' results without transcoding: each planned shard with its members."""
    return [{"shard": ShardInfo(p.url, p.split, len(p.sources), 10, hashlib.sha256(p.url.encode()).hexdigest(),
                                [s.entry.video_id for s in p.sources]), "quarantine": {}, "stats": {"bytes_in": 0}}
            for p in plan.build]


def next_index(sources: list[Source], last: DatasetIndex | None, **kw) -> tuple[DatasetIndex, object]:
    """Plan against ``last`` and assemble the next index the way run_ingest does (fake shard results)."""
    plan = make_plan(sources, PRE, 4, last, labels=(CLASSES, False), **kw)
    manifest = Manifest("d", CLASSES, [s.entry for s in sources])
    return assemble_index("d", manifest, PRE, DecodeLimits(), sources, {}, last, plan, fake_built(plan)), plan


def shard_of(index: DatasetIndex, key: str) -> ShardInfo:
    return next(s for s in index.shards if key in s.live_keys())


def built_ids(plan) -> list[str]:
    return sorted(s.entry.video_id for p in plan.build if not p.is_copy for s in p.sources)


# -- planning ---------------------------------------------------------------------------------------------


def test_deletions_and_changes_keep_their_shards_with_tombstones_and_exact_counts():
    sources = [src(f"v{i:02d}") for i in range(12)] + [src(f"w{i}", split="val") for i in range(4)]
    v1, _ = next_index(sources, None)
    assert len(v1.shards) == 4 and v1.num_samples() == 16
    gone, changed = "v03", "v07"
    a, b = shard_of(v1, gone), shard_of(v1, changed)
    assert a.url != b.url  # the ids were chosen to fall in two shards (same plan, same shards every time)
    now = [s if s.entry.video_id != changed else src(changed, sha="b") for s in sources if s.entry.video_id != gone]
    v2, plan = next_index(now, v1)
    # every shard stays, the same objects (url, sha256, bytes); the two lose a member each
    assert sorted((s.url, s.sha256, s.bytes) for s in v2.shards if s.url in {x.url for x in v1.shards}) == \
        sorted((s.url, s.sha256, s.bytes) for s in v1.shards)
    assert plan.summary()["keep_shards"] == 4 and plan.removed == [gone] and plan.changed == [changed]
    assert next(s for s in v2.shards if s.url == a.url).dropped == [gone]
    assert next(s for s in v2.shards if s.url == b.url).dropped == [changed]
    assert built_ids(plan) == [changed]  # only the changed video is transcoded again, into a new shard
    assert shard_of(v2, changed).url not in {s.url for s in v1.shards}
    # exact counts: the whole dataset, per split, and what an epoch is made of
    assert v2.num_samples() == 15 and v2.num_samples("train") == 11 and v2.num_samples("val") == 4
    assert v2.source_checksums[changed] == "b" and gone not in v2.source_checksums
    # the tombstones survive the JSON round trip and change the split's identity
    back = DatasetIndex.from_json(v2.to_json())
    assert [s.dropped for s in back.shards] == [s.dropped for s in v2.shards] and back.num_samples() == 15
    assert v2.split_digest("train") != v1.split_digest("train") and v2.split_digest("val") == v1.split_digest("val")
    # nothing new: nothing to do, the tombstones stay as they are
    assert make_plan(now, PRE, 4, back, labels=(CLASSES, False)).is_noop


def test_a_video_deleted_then_added_again_is_transcoded_once_more_and_counted_once():
    sources = [src(f"v{i:02d}") for i in range(8)]
    v1, _ = next_index(sources, None)
    v2, _ = next_index(sources[1:], v1)
    assert v2.num_samples() == 7 and "v00" not in {k for s in v2.shards for k in s.live_keys()}
    v3, plan = next_index(sources, v2)
    assert built_ids(plan) == ["v00"] and v3.num_samples() == 8
    old = next(s for s in v3.shards if "v00" in s.keys and "v00" in s.dropped)  # still tombstoned where it was
    assert shard_of(v3, "v00").url != old.url
    assert sum(k == "v00" for s in v3.shards for k in s.live_keys()) == 1


def test_a_video_changed_twice_lives_only_in_its_newest_shard():
    sources = [src(f"v{i:02d}") for i in range(8)]
    v1, _ = next_index(sources, None)
    first = shard_of(v1, "v05")
    v2, _ = next_index([s if s.entry.video_id != "v05" else src("v05", sha="b") for s in sources], v1)
    second = shard_of(v2, "v05")
    v3, plan = next_index([s if s.entry.video_id != "v05" else src("v05", sha="c") for s in sources], v2)
    third = shard_of(v3, "v05")
    assert len({first.url, second.url, third.url}) == 3 and built_ids(plan) == ["v05"]
    assert second.url not in {s.url for s in v3.shards}  # it held only v05: nothing left, it leaves the index
    assert next(s for s in v3.shards if s.url == first.url).dropped == ["v05"]
    assert v3.num_samples() == 8 and v3.source_checksums["v05"] == "c"


def test_a_sparse_shard_is_compacted_by_copying_its_survivors_and_leaves_the_index():
    sources = [src(f"v{i:02d}") for i in range(8)]
    v1, _ = next_index(sources, None)
    target = v1.shards[0]
    survivor = target.keys[-1]
    now = [s for s in sources if s.entry.video_id not in target.keys[:-1]]  # 3 of its 4 members deleted
    v2, plan = next_index(now, v1)
    assert plan.compacted == [target.url] and built_ids(plan) == []  # nothing to transcode
    copy = next(p for p in plan.build if p.is_copy)
    assert [(old.url, keys) for old, keys in copy.copy_from] == [(target.url, [survivor])]
    assert target.url not in {s.url for s in v2.shards} and shard_of(v2, survivor).url == copy.url
    assert v2.num_samples() == 5
    # the threshold: at 0 a shard is never compacted, only tombstoned
    v2b, plan_b = next_index(now, v1, compact_below=0)
    assert not plan_b.compacted and next(s for s in v2b.shards if s.url == target.url).live == 1
    # several sparse shards are repacked into one copy shard
    keep_two = {v1.shards[0].keys[0], v1.shards[1].keys[0]}
    v3, plan3 = next_index([s for s in sources if s.entry.video_id in keep_two], v1)
    assert sorted(plan3.compacted) == sorted(s.url for s in v1.shards)
    assert len(v3.shards) == 1 and sorted(v3.shards[0].keys) == sorted(keep_two)


def test_a_new_class_list_still_keeps_no_shard_and_copies_none():
    sources = [src(f"v{i:02d}") for i in range(8)]
    v1, _ = next_index(sources, None)
    plan = make_plan(sources[3:], PRE, 4, v1, labels=(["x", "y"], False))
    assert not plan.keep and not plan.compacted and not any(p.is_copy for p in plan.build)
    assert built_ids(plan) == sorted(s.entry.video_id for s in sources[3:])


def test_an_index_written_before_tombstones_reads_exactly_as_before():
    shards = [{"bytes": 10, "keys": ["a", "b"], "samples": 2, "sha256": "1" * 64, "split": "train",
               "url": "shards/train/a.tar"},
              {"bytes": 10, "keys": ["c"], "samples": 1, "sha256": "2" * 64, "split": "train",
               "url": "shards/train/b.tar"}]
    old = json.dumps({"classes": ["x"], "created": 1.0, "dataset": "d", "decode_limits": {},
                      "format": "pipeline.dataset_index/1", "preprocessing": PRE, "quarantine": {},
                      "shards": shards, "source_checksums": {"a": "s", "b": "s", "c": "s"}, "version": 1},
                     indent=1, sort_keys=True)
    index = DatasetIndex.from_json(old)
    assert [s.dropped for s in index.shards] == [[], []] and index.num_samples("train") == 3
    assert index.to_json() == old  # no field added: the same document
    assert index.split_digest("train") == sha256_of(("1" * 64 + "2" * 64).encode())[:16]
    hostile = json.loads(old)
    hostile["shards"][0]["dropped"] = ["zz"]
    with pytest.raises(ShardError, match=r"shards\[0\].dropped.*distinct keys of the shard's own samples"):
        DatasetIndex.from_json(json.dumps(hostile))
    hostile["shards"][0]["dropped"] = ["a", "a"]
    with pytest.raises(ShardError, match=r"shards\[0\].dropped"):
        DatasetIndex.from_json(json.dumps(hostile))


# -- real shards: the loader, the test protocol, compaction ------------------------------------------------

META = {"label": 0, "label_name": "red", "dataset": "d", "split": "val", "source": "-", "duration": 2.0,
        "fps": 16.0, "num_frames": 32, "source_sha256": "-"}


@pytest.fixture
def stored(tmp_path):
    """Two real shards of three colour videos each in a local dataset root, committed as v1."""
    storage = open_storage(tmp_path / "ds")
    shards = []
    for s in range(2):
        samples = [ShardSample(f"s{s}v{i}", make_video("colour", COLOUR_CLASSES[i], seed=10 * s + i),
                               {**META, "label": i, "label_name": COLOUR_CLASSES[i]}) for i in range(3)]
        shards.append(put_shard(storage, f"shards/val/{s:06d}.tar", "val", samples))
    index = DatasetIndex("d", 1, list(COLOUR_CLASSES), {}, shards)
    commit_index(storage, index)
    return index, storage


def with_dropped(index: DatasetIndex, dropped: dict[str, list[str]], version: int = 2) -> DatasetIndex:
    shards = [dataclasses.replace(s, dropped=dropped.get(s.url, [])) for s in index.shards]
    return dataclasses.replace(index, version=version, shards=shards)


class MeanColour(torch.nn.Module):
    """A model without a config: scores each video by its mean colour (enough for the pass's counts)."""

    def forward(self, x):
        rgb = x.float().mean(dim=(2, 3, 4))
        return torch.cat([rgb, rgb.sum(1, keepdim=True)], dim=1)


def test_the_loader_and_the_test_protocol_pass_over_tombstoned_samples(stored):
    v1, storage = stored
    v2 = with_dropped(v1, {"shards/val/000000.tar": ["s0v1"], "shards/val/000001.tar": ["s1v0", "s1v2"]})
    commit_index(storage, v2)
    index, store = load_index(str(storage.uri("")).rstrip("/"))
    assert index.version == 2 and index.num_samples("val") == 3
    for shard in index.shards:
        verify_shard(store, shard)  # the tars are untouched: verification still holds
    loader = make_loader(index, store, "val", train=False, batch_size=2, num_workers=0, clip=CLIP)
    batches = list(loader)
    keys = sorted(k for b in batches for k in b.get("key", []))
    assert keys == ["s0v0", "s0v2", "s1v1"]
    read = sum(b["faults"]["read"] for b in batches)
    assert read == 3 and not any(b["faults"]["skipped"] for b in batches)  # not read, not a fault
    # training: a tombstoned sample never reaches a batch
    train = make_loader(index, store, "val", train=True, batch_size=3, num_workers=0, clip=CLIP, epoch_samples=12)
    seen = {k for b in train for k in b["key"]}
    assert seen <= {"s0v0", "s0v2", "s1v1"} and seen
    report = evaluate.test_protocol(MeanColour(), torch.float32, index, store, split="val", clip=CLIP,
                                    protocol="multi_view", temporal_clips=1, spatial_crops=1, batch_size=4,
                                    device=torch.device("cpu"), num_workers=0)
    assert report["videos"] + report["unlabelled"] == 3 == report["index_videos"]
    assert report["skipped"] == 0 and report["read"] == 3


def test_compaction_copies_the_survivors_bytes_and_never_transcodes(stored, monkeypatch):
    v1, storage = stored

    def no_transcode(*args, **kwargs):
        raise AssertionError("compaction transcoded a video")

    monkeypatch.setattr(worker, "transcode", no_transcode)
    sources = [Source(ManifestEntry(k, (f"{k}.mp4",), int(k[-1]), COLOUR_CLASSES[int(k[-1])], "val"),
                      f"/v/{k}.mp4", "s") for s in v1.shards for k in s.keys]  # each with the label it was given
    last = dataclasses.replace(v1, source_checksums={s.entry.video_id: "s" for s in sources})
    keep = {"s0v2", "s1v1"}  # one survivor in each shard: both below 0.5 live
    plan = make_plan([s for s in sources if s.entry.video_id in keep], last.preprocessing, 4, last)
    assert sorted(plan.compacted) == sorted(s.url for s in v1.shards) and len(plan.build) == 1
    result = worker.build_shard(plan.build[0], storage.uri(""), "d", worker.TranscodeConfig())
    new = result["shard"]
    assert result["stats"]["copied"] == 2 and not result["quarantine"]
    assert new.keys == ["s0v2", "s1v1"] and new.url not in {s.url for s in v1.shards}
    verify_shard(storage, new)
    old = {s.key: s for shard in v1.shards for s in read_shard(io.BytesIO(storage.get_bytes(shard.url)))}
    for sample in read_shard(io.BytesIO(storage.get_bytes(new.url))):
        assert sample.video == old[sample.key].video and sample.meta == old[sample.key].meta  # the same bytes
    manifest = Manifest("d", list(COLOUR_CLASSES), [s.entry for s in sources if s.entry.video_id in keep])
    kept = [s for s in sources if s.entry.video_id in keep]
    v2 = assemble_index("d", manifest, last.preprocessing, DecodeLimits(), kept, {}, last, plan, [result])
    assert [s.url for s in v2.shards] == [new.url] and v2.num_samples() == 2
    # an old shard that no longer matches its index entry is not copied from
    storage.put_bytes(v1.shards[0].url, b"tampered")
    storage.delete(new.url)
    with pytest.raises(ShardError, match="differs from the index"):
        worker.build_shard(plan.build[0], storage.uri(""), "d", worker.TranscodeConfig())


# -- end to end: run_ingest over real videos -----------------------------------------------------------------


@pytest.fixture
def serial(monkeypatch):
    def build_all(plan, cfg, ray_address, progress):
        return [worker.build_shard(p, cfg.output, cfg.dataset, cfg.transcode, cfg.decode_limits())
                for p in plan.build]

    monkeypatch.setattr(ingest_run, "_build_all", build_all)


def test_an_incremental_ingest_keeps_untouched_shards_and_transcodes_only_the_changed_video(tmp_path, serial,
                                                                                             monkeypatch):
    names = [f"c{i}" for i in range(6)]
    for i, name in enumerate(names):
        path = tmp_path / "videos" / ("cat" if i % 2 else "dog") / f"{name}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(video(8 + i))
    cfg = ingest_config(tmp_path, "folder", "samples_per_shard=2")
    assert run_ingest(cfg, progress=False).version == 1
    v1, store = load_index(str(tmp_path / "out"))
    assert len(v1.shards) == 3 and v1.num_samples("train") == 6
    by_key = {k: s for s in v1.shards for k in s.keys}
    gone = next(iter(v1.shards[0].keys))
    changed = next(k for k in v1.shards[1].keys)
    (tmp_path / "videos").joinpath(*gone.split("_", 1)).with_suffix(".mp4").unlink()
    (tmp_path / "videos").joinpath(*changed.split("_", 1)).with_suffix(".mp4").write_bytes(video(20))
    calls = []
    real = worker.transcode
    monkeypatch.setattr(worker, "transcode", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    second = run_ingest(cfg, progress=False)
    assert second.version == 2 and len(calls) == 1 and calls[0].endswith(f"{changed.split('_', 1)[1]}.mp4")
    v2, store = load_index(str(tmp_path / "out"))
    # all three shards of v1 stay, byte for byte (the same url and sha256); the changed video is in a new one
    old = {(s.url, s.sha256, s.bytes) for s in v1.shards}
    assert old <= {(s.url, s.sha256, s.bytes) for s in v2.shards} and len(v2.shards) == 4
    assert {s.url: s.dropped for s in v2.shards if s.dropped} == {by_key[gone].url: [gone],
                                                                 by_key[changed].url: [changed]}
    for shard in v2.shards:
        verify_shard(store, shard)
    assert v2.num_samples("train") == 5 and second.videos_out == 5
    loader = make_loader(v2, store, "train", train=False, batch_size=2, num_workers=0, clip=CLIP)
    keys = sorted(k for b in loader for k in b.get("key", []))
    assert keys == sorted(set(by_key) - {gone}) and len(keys) == v2.num_samples("train")
    # compaction (every shard with a tombstone is below 1.0): copied, never transcoded
    monkeypatch.setattr(worker, "transcode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("transcoded")))
    third = run_ingest(ingest_config(tmp_path, "folder", "samples_per_shard=2", "compact_below=1.0"),
                       progress=False)
    v3, store = load_index(str(tmp_path / "out"))
    assert third.version == 3 and third.plan["compacted_shards"] == 2 and third.plan["build_videos"] == 0
    assert not any(s.dropped for s in v3.shards) and v3.num_samples("train") == 5
    assert {s.url for s in v3.shards}.isdisjoint({by_key[gone].url, by_key[changed].url})
    loader = make_loader(v3, store, "train", train=False, batch_size=2, num_workers=0, clip=CLIP)
    assert sorted(k for b in loader for k in b.get("key", [])) == keys


# -- a missing source is held, not deleted; relabels and new bounds; a failed copy ----------------------------


def test_a_listed_video_whose_source_is_missing_is_held_as_it_was_not_deleted():
    sources = [src(f"v{i:02d}") for i in range(8)]
    v1, _ = next_index(sources, None)
    # the source of every video is gone for a moment (an unmounted directory): still listed, so not deleted
    plan = make_plan([], PRE, 4, v1, labels=(CLASSES, False), missing=[s.entry.video_id for s in sources])
    assert plan.is_noop and plan.removed == [] and plan.dropped == 0
    assert plan.held == sorted(s.entry.video_id for s in sources) and len(plan.keep) == len(v1.shards)
    # one source missing, another deleted from the manifest, in the same shard: only the deleted one is dropped
    a = v1.shards[0]
    held, gone = a.keys[0], a.keys[1]
    now = [s for s in sources if s.entry.video_id not in (held, gone)]
    manifest = Manifest("d", CLASSES, [s.entry for s in now])
    plan = make_plan(now, PRE, 4, v1, labels=(CLASSES, False), missing=[held], compact_below=0.9)
    assert plan.held == [held] and plan.removed == [gone] and not plan.compacted  # a held member: not repacked
    missing = {held: {"sha256": "", "reason": "not found", "kind": "transient"}}
    v2 = assemble_index("d", manifest, PRE, DecodeLimits(), now, missing, v1, plan, fake_built(plan))
    assert held in shard_of(v2, held).live_keys() and shard_of(v2, held).url == a.url
    assert next(s for s in v2.shards if s.url == a.url).dropped == [gone]
    assert v2.num_samples() == 7 and held not in v2.quarantine  # live, so not quarantined too
    assert v2.source_checksums[held] == v1.source_checksums[held]  # kept as it was: the next run compares it
    assert v2.entry_digests[held] == v1.entry_digests[held]
    # the source is back, unchanged: nothing to do, nothing transcoded
    assert make_plan(now + [next(s for s in sources if s.entry.video_id == held)], PRE, 4, v2,
                     labels=(CLASSES, False)).is_noop


def test_a_run_that_would_remove_most_of_the_last_version_is_refused_unless_allowed():
    sources = [src(f"v{i:02d}") for i in range(8)]
    v1, _ = next_index(sources, None)
    plan = make_plan(sources[:3], PRE, 4, v1, labels=(CLASSES, False))
    assert len(plan.removed) == 5
    why = ingest_run.check_removals(v1, plan, 0.5)
    assert why and "remove 5 of the 8 videos of version 1" in why and "max_removed_fraction=1" in why
    assert ingest_run.check_removals(v1, plan, 1.0) is None
    assert ingest_run.check_removals(v1, make_plan(sources[4:], PRE, 4, v1, labels=(CLASSES, False)), 0.5) is None
    # a new class list keeps nothing, but the videos that left the manifest are still counted as removed
    plan = make_plan(sources[:3], PRE, 4, v1, labels=(["x", "y"], False))
    assert len(plan.removed) == 5 and ingest_run.check_removals(v1, plan, 0.5)


def relabel(s: Source, **changes) -> Source:
    return Source(dataclasses.replace(s.entry, **changes), s.uri, s.sha256)


def test_a_relabel_is_copied_with_its_new_labels_and_new_bounds_are_transcoded_again():
    sources = [src(f"v{i:02d}") for i in range(8)]
    v1, _ = next_index(sources, None)
    assert v1.entry_digests.keys() == v1.source_checksums.keys()
    a = v1.shards[0]
    relabelled, bounds = a.keys[0], a.keys[1]
    now = [relabel(s, label=1, label_name="y") if s.entry.video_id == relabelled
           else relabel(s, start=5.0, end=9.0) if s.entry.video_id == bounds else s for s in sources]
    plan = make_plan(now, PRE, 4, v1, labels=(CLASSES, False))
    assert plan.relabelled == [relabelled] and plan.changed == [bounds] and not plan.is_noop
    assert built_ids(plan) == [bounds]  # only the new clip bounds are transcoded
    copy = next(p for p in plan.build if p.is_copy)  # the relabel: its clip copied from its shard
    assert [(old.url, keys) for old, keys in copy.copy_from] == [(a.url, [relabelled])]
    assert copy.sources[0].entry.label == 1
    v2, _ = next_index(now, v1)
    assert sorted(next(s for s in v2.shards if s.url == a.url).dropped) == sorted([bounds, relabelled])
    assert v2.num_samples() == 8 and v2.entry_digests[relabelled] != v1.entry_digests[relabelled]
    assert make_plan(now, PRE, 4, v2, labels=(CLASSES, False)).is_noop  # recorded: nothing to do next time
    # an index written before entry digests: every entry counts as unchanged (an upgrade rebuilds nothing)
    old = DatasetIndex.from_json(v1.to_json())
    old.entry_digests = {}
    assert "entry_digests" not in json.loads(old.to_json())
    assert make_plan(now, PRE, 4, old, labels=(CLASSES, False)).is_noop
    hostile = json.loads(v1.to_json())
    hostile["entry_digests"]["v00"] = "$(x)"
    with pytest.raises(ShardError, match=r"entry_digests\['v00'\].*24 lowercase hex digits"):
        DatasetIndex.from_json(json.dumps(hostile))


def test_a_failed_compaction_copy_puts_its_old_shard_back_with_the_survivors_live():
    sources = [src(f"v{i:02d}") for i in range(8)]
    v1, _ = next_index(sources, None)
    a = v1.shards[0]
    gone = set(a.keys[:3])  # 3 of 4 deleted: the survivor is to be copied and the shard to leave the index
    now = [s for s in sources if s.entry.video_id not in gone]
    plan = make_plan(now, PRE, 4, v1, labels=(CLASSES, False))
    assert plan.compacted == [a.url]
    built = [worker.shard_failure(p, OSError("the worker died")) if p.is_copy else b
             for p, b in zip(plan.build, fake_built(plan), strict=True)]
    manifest = Manifest("d", CLASSES, [s.entry for s in now])
    v2 = assemble_index("d", manifest, PRE, DecodeLimits(), now, {}, v1, plan, built)
    back = next(s for s in v2.shards if s.url == a.url)
    assert (back.sha256, back.keys, sorted(back.dropped)) == (a.sha256, a.keys, sorted(gone))
    assert v2.num_samples() == 5 and not v2.quarantine  # every present video is live; none quarantined
    # the next run plans the copy again
    assert make_plan(now, PRE, 4, v2, labels=(CLASSES, False)).compacted == [a.url]
    # but an old shard that is not what its index says (the copy found it damaged) is never put back
    built = [worker.shard_failure(p, ShardError(f"{a.url}: differs from the index")) if p.is_copy else b
             for p, b in zip(plan.build, fake_built(plan), strict=True)]
    v2 = assemble_index("d", manifest, PRE, DecodeLimits(), now, {}, v1, plan, built)
    assert a.url not in {s.url for s in v2.shards} and v2.num_samples() == 4
    assert v2.quarantine[a.keys[3]]["kind"] == "transient"  # transcoded from its source by the next run


def manifest_dataset(tmp_path, rows: list[str]) -> None:
    (tmp_path / "m.csv").write_text("path,label,split,start,end\n" + "\n".join(rows) + "\n")


def test_an_ingest_holds_listed_videos_through_a_source_outage_and_refuses_a_mass_removal(tmp_path, serial):
    from pipeline.cli.ingest import main

    (tmp_path / "videos").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / "videos" / f"v{i}.mp4").write_bytes(video(8 + i))
        rows.append(f"v{i}.mp4,{'ab'[i % 2]},train,,")
    manifest_dataset(tmp_path, rows)
    extra = [f"annotations={tmp_path / 'm.csv'}"]
    cfg = ingest_config(tmp_path, "manifest", *extra)
    assert run_ingest(cfg, progress=False).version == 1
    # the source directory is empty for a while (an NFS or automount hiccup): nothing is deleted or committed
    (tmp_path / "videos").rename(tmp_path / "away")
    (tmp_path / "videos").mkdir()
    outage = run_ingest(cfg, progress=False)
    assert outage.version is None and "nothing to do: version 1 is up to date (6 videos)" in outage.message
    assert "6 listed video(s) whose source is missing now are kept" in outage.message
    (tmp_path / "videos").rmdir()
    (tmp_path / "away").rename(tmp_path / "videos")
    assert run_ingest(cfg, progress=False).version is None  # back: still nothing to do
    # the manifest is cut short: 5 of 6 would be removed, refused (exit 2) with what would go and how to allow it
    manifest_dataset(tmp_path, rows[:1])
    with pytest.raises(ingest_run.RemovalRefusedError, match=r"remove 5 of the 6 videos of version 1"):
        run_ingest(cfg, progress=False)
    args = ["dataset=mine", "format=manifest", f"source={tmp_path / 'videos'}", f"output={tmp_path / 'out'}",
            "samples_per_shard=4", "transcode.short_side=32", "transcode.fps=10", "transcode.keyframe_interval=4",
            "transcode.min_frames=1", *extra]
    assert main(["--no-progress", *args]) == 2
    assert load_index(str(tmp_path / "out"))[0].version == 1
    allowed = run_ingest(ingest_config(tmp_path, "manifest", *extra, "max_removed_fraction=1"), progress=False)
    assert allowed.version == 2 and allowed.videos_out == 1


def test_an_ingest_picks_up_a_relabel_by_copy_and_new_bounds_by_transcoding(tmp_path, serial, monkeypatch):
    (tmp_path / "videos").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "videos" / f"v{i}.mp4").write_bytes(video(30))
        rows.append(f"v{i}.mp4,{'ab'[i % 2]},train,,,v{i}")
    header = "path,label,split,start,end,id\n"  # ids given: otherwise an id says its clip bounds
    (tmp_path / "m.csv").write_text(header + "\n".join(rows) + "\n")
    cfg = ingest_config(tmp_path, "manifest", f"annotations={tmp_path / 'm.csv'}")
    assert run_ingest(cfg, progress=False).version == 1
    calls = []
    real = worker.transcode
    monkeypatch.setattr(worker, "transcode", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    # v0 relabelled (a -> b), v1 given clip bounds: the same source bytes
    (tmp_path / "m.csv").write_text(header + "\n".join(["v0.mp4,b,train,,,v0", "v1.mp4,b,train,1,2,v1"] + rows[2:]))
    second = run_ingest(cfg, progress=False)
    assert second.version == 2 and second.plan["relabelled_videos"] == 1 and second.plan["changed_videos"] == 1
    assert [c.rsplit("/", 1)[-1] for c in calls] == ["v1.mp4"]  # the relabel was not transcoded
    v2, store = load_index(str(tmp_path / "out"))
    meta = {}
    for shard in v2.shards:
        verify_shard(store, shard)
        live = set(shard.live_keys())
        meta.update({s.key: s.meta for s in read_shard(io.BytesIO(store.get_bytes(shard.url))) if s.key in live})
    assert (meta["v0"]["label"], meta["v0"]["label_name"]) == (v2.classes.index("b"), "b")
    assert (meta["v1"]["start"], meta["v1"]["end"], meta["v1"]["num_frames"]) == (1.0, 2.0, 10)
    assert v2.num_samples() == 4
    assert run_ingest(cfg, progress=False).version is None  # recorded: nothing to do next time
