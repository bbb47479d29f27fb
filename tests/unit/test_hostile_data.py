"""Hostile and broken data on local storage: swapped shards are refused before any of their samples is
used, broken samples are skipped and counted (across the DataLoader worker boundary), the skip ceiling
stops the loop with a clear error, hostile indexes are refused by field, reads resume after transient
errors, and local objects honour the umask. Every hostile input is built here, at test time."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import tarfile
from types import SimpleNamespace

import pytest
import torch

from pipeline.data import storage as storage_mod
from pipeline.data.loader import (
    ClipConfig,
    DataQualityError,
    FaultTally,
    index_limits,
    make_loader,
    view_loader,
)
from pipeline.data.shards import (
    DatasetIndex,
    ShardError,
    ShardInfo,
    ShardSample,
    commit_index,
    index_key,
    load_index,
    sha256_of,
    shard_bytes,
)
from pipeline.data.storage import LocalStorage, StorageError, open_resuming, open_storage
from pipeline.data.synthetic import MOTION_CLASSES, make_video
from pipeline.data.video import DecodeLimits

CLIP = ClipConfig(num_frames=2, sampling_rate=8, crop=32, scale=(32, 40), flip=False)


def meta(label, **changes) -> dict:
    m = {"label": label, "label_name": "x", "dataset": "hostile", "split": "train", "source": "-",
         "duration": 2.0, "fps": 16.0, "num_frames": 32, "source_sha256": "-"}
    m.update(changes)
    return {k: v for k, v in m.items() if v is not ...}  # ... deletes a field


def tar_of(members: list[tuple]) -> bytes:
    """A tar from (name, payload) members; payload bytes, or ("symlink"|"hardlink", target), or ("dir",)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 0, 0o644
            if isinstance(payload, bytes):
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            kind = payload[0]
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE}[kind]
            if kind != "dir":
                info.linkname = payload[1]
            tar.addfile(info)
    return buf.getvalue()


def good(key: str, label: int, seed: int, **changes) -> list[tuple]:
    return [(f"{key}.mp4", make_video("motion", MOTION_CLASSES[label], seed=seed)),
            (f"{key}.json", json.dumps(meta(label, **changes)).encode())]


def commit(storage, shards: dict[str, tuple[bytes, list[str]]], split: str = "train") -> DatasetIndex:
    """Store the shard bytes and commit an index that describes exactly those bytes."""
    infos = []
    for url, (data, keys) in shards.items():
        storage.put_bytes(url, data)
        infos.append(ShardInfo(url, split, len(keys), len(data), sha256_of(data), keys))
    index = DatasetIndex("hostile", 1, list(MOTION_CLASSES), {}, infos)
    commit_index(storage, index)
    return index


def drain(loader, limit: int = 50) -> tuple[list[dict], BaseException | None]:
    """Iterate until the loader raises (or ``limit`` items): (items, error). The error's traceback is
    dropped and the iterator shut down here: an errored DataLoader iterator that a traceback keeps alive
    is only freed by the garbage collector later, which waits 5 s for its worker."""
    items, error, it = [], None, iter(loader)
    try:
        for item in it:
            items.append(item)
            if len(items) >= limit:
                break
    except Exception as e:
        error = e.with_traceback(None)
    del it
    return items, error


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


# -- a shard that is not the one the index describes -----------------------------------------------


@pytest.mark.parametrize("pipeline,workers", [("train", 0), ("train", 1), ("val", 1), ("views", 0)])
def test_a_swapped_shard_is_refused_before_any_of_its_samples_is_used(tmp_path, pipeline, workers):
    """The probe: a shard replaced by a valid tar with the same keys and every label set to 3 trained
    silently. Now the stream stops with a ShardError naming it, and no batch holds any of its samples."""
    storage = open_storage(tmp_path / "ds")
    split = "train" if pipeline == "train" else "val"
    keys = [f"v{i}" for i in range(3)]
    original = tar_of([m for i, k in enumerate(keys) for m in good(k, i, seed=i, split=split)])
    shards = {f"shards/{split}/000000.tar": (original, keys)}
    if pipeline != "train":  # evaluation: a good shard first, then the swapped one (an exact pass)
        other = [f"w{i}" for i in range(3)]
        shards = {f"shards/{split}/000000.tar": (tar_of([m for i, k in enumerate(other)
                                                         for m in good(k, i, seed=10 + i, split=split)]), other),
                  f"shards/{split}/000001.tar": (original, keys)}
    index = commit(storage, shards, split)
    swapped_url = f"shards/{split}/00000{len(shards) - 1}.tar"
    swapped = tar_of([m for i, k in enumerate(keys) for m in good(k, 3, seed=i, split=split)])
    storage.put_bytes(swapped_url, swapped)
    assert len(swapped) != 0 and sha256_of(swapped) != sha256_of(original)

    if pipeline == "train":
        loader = make_loader(index, storage, "train", train=True, batch_size=1, num_workers=workers, endless=True,
                             clip=CLIP, seed=1)
    elif pipeline == "val":
        loader = make_loader(index, storage, "val", train=False, batch_size=1, num_workers=workers, clip=CLIP)
    else:
        loader = view_loader(index, storage, "val", clip=CLIP, protocol="multi_view", temporal_clips=1,
                             spatial_crops=1, num_workers=workers)
    seen, error = drain(loader)
    assert isinstance(error, ShardError), f"the swapped shard was not refused ({error!r})"
    message = str(error)
    assert storage.uri(swapped_url) in message and "dataset hostile" in message and "index v1" in message
    assert "sha256" in message and "re-ingest" in message.lower()
    labels = [int(x) for b in seen for x in torch.as_tensor(b["label"]).reshape(-1)]
    assert 3 not in labels  # nothing from the swapped shard reached a batch
    assert not {k for b in seen for k in ([b["key"]] if isinstance(b["key"], str) else b["key"])} & set(keys)
    if pipeline != "train":  # the refusal is the swapped shard's: the good one before it was evaluated
        assert labels and set(labels) <= {0, 1, 2}


def test_an_object_longer_or_shorter_than_the_index_says_is_refused_without_reading_on(tmp_path):
    keys = ["a", "b"]
    data = tar_of([m for i, k in enumerate(keys) for m in good(k, i, seed=i)])
    storage = CountingStorage(tmp_path / "ds")
    index = commit(storage, {"shards/train/000000.tar": (data, keys)})
    # a valid tar with 8 MiB of padding after it: a plain tar reader would stop at the end marker and train
    storage.put_bytes("shards/train/000000.tar", data + b"\0" * (8 << 20))
    storage.bytes_read = 0
    with pytest.raises(ShardError, match=rf"holds more than {len(data)} bytes, the index says {len(data)}"):
        take(make_loader(index, storage, "train", train=True, batch_size=1, num_workers=0, endless=True,
                         clip=CLIP), 1)
    assert storage.bytes_read <= len(data) + 1  # stopped one byte past the index's size
    storage.put_bytes("shards/train/000000.tar", data[:-512])
    with pytest.raises(ShardError, match=rf"holds {len(data) - 512} bytes, the index says {len(data)}"):
        take(make_loader(index, storage, "train", train=True, batch_size=1, num_workers=0, endless=True,
                         clip=CLIP), 1)


class CountingStorage(LocalStorage):
    """Local storage that counts the bytes its readers hand out."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.bytes_read = 0

    def open(self, key: str, offset: int = 0):
        f = super().open(key, offset)
        outer = self

        class Counting(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, b):
                n = f.readinto(b)
                outer.bytes_read += n
                return n

            def close(self):
                f.close()
                super().close()
        return Counting()


# -- broken samples ----------------------------------------------------------------------------------


def hostile_shard(split: str) -> tuple[bytes, list[str], set[str], dict[str, int]]:
    """One shard with four good samples and every kind of broken one; returns (bytes, keys, good keys,
    expected skips by reason). In evaluation, label -1 (unlabelled) is a good sample."""
    members, keys = [], []

    def add(key, parts):
        members.extend(parts)
        keys.append(key)

    for i in range(4):
        add(f"good{i}", good(f"good{i}", i, seed=i, split=split))
    video = make_video("motion", MOTION_CLASSES[0], seed=99)
    ok_json = json.dumps(meta(0, split=split)).encode()
    add("nojson", [("nojson.mp4", video)])
    add("nomp4", [("nomp4.json", ok_json)])
    add("badjson", [("badjson.mp4", video), ("badjson.json", b"{not json")])
    add("deepjson", [("deepjson.mp4", video), ("deepjson.json", b"[" * 200_000)])
    add("listjson", [("listjson.mp4", video), ("listjson.json", b"[1, 2]")])
    for name, duration in (("nodur", ...), ("nandur", float("nan")), ("negdur", -5.0), ("hugedur", 1e9),
                           ("strdur", "2.0")):
        add(name, [(f"{name}.mp4", video), (f"{name}.json", json.dumps(meta(0, split=split, duration=duration))
                                                            .encode())])
    for name, label in (("label99", 99), ("labelfloat", 2.9), ("labelstr", "1"), ("labelbool", True),
                        ("nolabel", ...), ("unlabelled", -1)):
        add(name, [(f"{name}.mp4", video), (f"{name}.json", json.dumps(meta(0, split=split) | {"label": label})
                                                            .encode() if label is not ... else
                                            json.dumps(meta(..., split=split)).encode())])
    add("symlink", [("symlink.mp4", ("symlink", "/etc/passwd")), ("symlink.json", ok_json)])
    add("hardlink", [("hardlink.mp4", ("hardlink", "good0.mp4")), ("hardlink.json", ok_json)])
    add("adir", [("adir/", ("dir",))])
    add("undecodable", [("undecodable.mp4", b"\x00" * 300), ("undecodable.json", ok_json)])
    good_keys = {f"good{i}" for i in range(4)}
    expected = {"missing_json": 1, "missing_mp4": 1, "bad_json": 3, "bad_duration": 5, "bad_label": 6,
                "not_a_file": 3, "undecodable": 1}
    if split != "train":
        good_keys.add("unlabelled")
        expected["bad_label"] -= 1
    return tar_of(members), keys, good_keys, expected


@pytest.mark.parametrize("workers", [0, 1])
def test_broken_samples_are_skipped_and_counted_in_an_evaluation_pass(tmp_path, workers):
    """Each kind of broken sample is skipped with its reason, exactly once per pass; the counts cross the
    worker process boundary on the batches; unlabelled videos (-1) flow to evaluation as -1."""
    storage = open_storage(tmp_path / "ds")
    data, keys, good_keys, expected = hostile_shard("val")
    index = commit(storage, {"shards/val/000000.tar": (data, keys)}, split="val")
    uri = storage.uri("shards/val/000000.tar")
    for kind in ("batches", "views"):
        if kind == "batches":
            loader = make_loader(index, storage, "val", train=False, batch_size=2, num_workers=workers, clip=CLIP)
        else:
            loader = view_loader(index, storage, "val", clip=CLIP, protocol="multi_view", temporal_clips=2,
                                 spatial_crops=1, num_workers=workers)
        tally, seen, labels = FaultTally(), [], {}
        for item in loader:
            tally.add(item["faults"])
            if "video" in item or "views" in item:
                item_keys = item["key"] if kind == "batches" else [item["key"]]
                item_labels = item["label"].tolist() if kind == "batches" else [item["label"]]
                seen += item_keys
                labels.update(zip(item_keys, item_labels, strict=True))
        assert sorted(seen) == sorted(good_keys), kind
        assert labels["unlabelled"] == -1 and labels["good3"] == 3
        assert tally.by_reason == expected, kind
        assert tally.read == len(keys) and set(tally.by_shard) == {uri}


def test_broken_samples_are_skipped_in_training_and_labels_are_checked_against_num_classes(tmp_path):
    storage = open_storage(tmp_path / "ds")
    data, keys, good_keys, expected = hostile_shard("train")
    index = commit(storage, {"shards/train/000000.tar": (data, keys)})
    batches = take(make_loader(index, storage, "train", train=True, batch_size=2, num_workers=1, endless=True,
                               clip=CLIP, seed=5, shuffle_buffer=4), 12)
    tally = FaultTally()
    for b in batches:
        tally.add(b["faults"])
        assert set(b["key"]) <= good_keys and b["label"].dtype == torch.int64
        assert all(0 <= int(x) < len(MOTION_CLASSES) for x in b["label"])
    # 24 good clips came from >= 6 passes over the shard: every kind of fault was met and counted each time
    passes = tally.read // len(keys)
    assert passes >= 5 and set(tally.by_reason) == set(expected)
    assert all(tally.by_reason[r] >= (passes - 1) * n for r, n in expected.items())  # (the shuffle buffer lags)
    # with fewer classes, label 3 is out of range: good3 is skipped too
    narrow = take(make_loader(index, storage, "train", train=True, batch_size=2, num_workers=0, endless=True,
                              clip=ClipConfig(**{**CLIP.__dict__, "num_classes": 3}), seed=5), 6)
    assert "good3" not in {k for b in narrow for k in b["key"]}
    narrow_tally = FaultTally()
    for b in narrow:
        narrow_tally.add(b["faults"])
    passes = narrow_tally.read // len(keys)
    assert passes >= 1 and narrow_tally.by_reason["bad_label"] >= (expected["bad_label"] + 1) * passes


def test_skips_are_logged_at_a_limited_rate(tmp_path, caplog):
    storage = open_storage(tmp_path / "ds")
    members, keys = [], []
    for i in range(40):
        members.append((f"broken{i}.mp4", b"x"))
        keys.append(f"broken{i}")
    members += good("fine", 0, seed=1, split="val")
    keys.append("fine")
    index = commit(storage, {"shards/val/000000.tar": (tar_of(members), keys)}, split="val")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batches = list(make_loader(index, storage, "val", train=False, batch_size=1, num_workers=0, clip=CLIP))
    assert [b["key"] for b in batches] == [["fine"]] and batches[0]["faults"]["read"] == 41
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.data.loader"]
    assert 5 <= len(lines) <= 7  # the first five one by one, then summaries, not forty lines
    assert "broken0" in lines[0] and "missing_json" in lines[0] and storage.uri("shards/val/000000.tar") in lines[0]
    assert any("35 more" in line for line in lines)


def test_a_training_worker_that_reads_only_broken_samples_stops_with_a_clear_error(tmp_path):
    storage = open_storage(tmp_path / "ds")
    members = [m for i in range(4) for m in ((f"k{i}.mp4", make_video("motion", MOTION_CLASSES[i], seed=i)),
                                             (f"k{i}.json", json.dumps(meta(99)).encode()))]
    index = commit(storage, {"shards/train/000000.tar": (tar_of(members), [f"k{i}" for i in range(4)])})
    loader = make_loader(index, storage, "train", train=True, batch_size=2, num_workers=1, endless=True,
                         clip=CLIP, stall_samples=40)
    batches, error = drain(loader)
    assert batches == [] and isinstance(error, DataQualityError)
    assert "40 samples in a row were skipped" in str(error)
    assert storage.uri("shards/train/000000.tar") in str(error) and "bad_label" in str(error)


def test_the_stall_guard_counts_skips_in_a_row_not_skips_between_batches(tmp_path):
    """Two broken samples around each good one: never three in a row, but 8 skips per batch of 4 (the guard
    used to count since the last batch), and a resumed run drops consumed good samples without a batch."""
    storage = open_storage(tmp_path / "ds")
    members, keys = [], []
    for i in range(6):
        members += [(f"bad{i}a.json", b"{"), (f"bad{i}a.mp4", b"x")]  # bad JSON
        members += good(f"k{i}", i % 2, seed=i)
        keys.append(f"k{i}")
        members += [(f"bad{i}b.json", json.dumps(meta(99)).encode()), (f"bad{i}b.mp4", b"x")]  # a bad label
    index = commit(storage, {"shards/train/000000.tar": (tar_of(members), keys)})
    for skip_batches in (0, 2):
        loader = make_loader(index, storage, "train", train=True, batch_size=4, num_workers=0, endless=True,
                             clip=CLIP, stall_samples=3, shuffle_buffer=1, skip_batches=skip_batches)
        batches, error = drain(loader, limit=4)
        assert error is None and len(batches) == 4, error


# -- the ceiling ---------------------------------------------------------------------------------------


def faults(read: int, **by_shard: dict[str, int]) -> dict:
    return {"read": read, "skipped": {f"s3://b/ds/{k}.tar": v for k, v in by_shard.items()}}


def test_the_skip_ceiling_waits_for_enough_samples_and_names_the_worst_shards():
    tally = FaultTally()
    tally.add(faults(10, a={"bad_label": 1}))
    assert not tally.exceeds(0.01)  # 10% of the first 10 samples: too early to judge
    assert tally.exceeds(0.0)  # 0: any skip stops
    tally.add(faults(490, a={"undecodable": 3}))
    assert tally.skipped == 4 and tally.read == 500
    assert not tally.exceeds(0.01)  # 0.8% of 500
    tally.add(faults(100, b={"missing_json": 5}, c={"bad_duration": 1}))
    assert tally.exceeds(0.01)  # 10 of 600
    message = str(tally.error(0.01))
    assert "10 of 600 samples read were skipped (1.67%" in message
    assert "data.max_skip_fraction=0.01" in message
    assert message.index("s3://b/ds/b.tar (5: missing_json 5)") < message.index("s3://b/ds/c.tar")
    assert "s3://b/ds/a.tar (4: undecodable 3, bad_label 1)" in message
    tally.add(None)  # batches without counts (other loaders) change nothing
    assert tally.read == 600


def test_the_training_loop_logs_skips_and_stops_every_rank_at_the_ceiling(tmp_path, monkeypatch):
    from pipeline.config import batch_plan, load_recipe
    from pipeline.train import loop

    cfg = load_recipe("smoke", ["train.micro_batch=2", "train.global_batch=2", "train.log_every=1",
                                "train.ckpt_every=4", "train.val_every=0", "data.max_skip_fraction=0.01"])

    def stream(s, step):  # 200 samples read per batch; from step 5 on, 10 of them broken
        def batches():
            for i in range(step, 100):  # batch i makes step i + 1
                bad = {"s3://b/ds/shards/train/000007.tar": {"bad_label": 10}} if i >= 4 else {}
                yield {"video": torch.zeros(2, 3, 1, 1, 1), "label": torch.tensor([0, 1]),
                       "faults": {"read": 200, "skipped": bad}}
        return batches(), 100

    class Engine:
        global_step, lr = 0, 0.1

        def train_micro_batch(self, video, label):
            self.global_step += 1
            return torch.tensor(1.0)

        def grad_norm(self):
            return 1.0

        def grad_norm_tensor(self):
            return torch.tensor(1.0)

    logged = []
    monkeypatch.setattr(loop, "_interval_stream", stream)
    saved = []
    state = loop.LoopState(cfg=cfg, engine=Engine(), plan=batch_plan(cfg, 1), index=None, storage=None, clip=None,
                           rank=0, world_size=1, device=torch.device("cpu"), per_epoch=100, total=50,
                           run_dir=tmp_path,
                           sinks=SimpleNamespace(log_metrics=lambda m, step: logged.append((step, m))),
                           account=SimpleNamespace(exhausted=False, hours=0.0, save=lambda: None),
                           stop=SimpleNamespace(reason=None), save=saved.append, validate=dict)
    with pytest.raises(DataQualityError) as err:
        loop.train_loop(state)
    # steps 1-5 read 1,000 samples, 10 skipped (1%, at the ceiling); step 6 makes it 20 of 1,200
    assert "step 6, rank 0: 20 of 1200 samples read were skipped" in str(err.value)
    assert "000007.tar (20: bad_label 20)" in str(err.value) and "data.max_skip_fraction=0.01" in str(err.value)
    assert f"--resume {tmp_path}" in str(err.value)
    assert saved == [4]  # the step that crossed the ceiling saved nothing
    by_step = {step: m for step, m in logged}
    assert by_step[4]["data/skipped"] == 0 and by_step[5]["data/skipped"] == 10
    assert by_step[5]["data/skipped_fraction"] == pytest.approx(0.01) and by_step[5]["data/samples_read"] == 1000


# -- hostile indexes -------------------------------------------------------------------------------------


def valid_index() -> dict:
    return json.loads(DatasetIndex("d", 3, ["a", "b"], {"fps": 30}, [
        ShardInfo("shards/train/000000.tar", "train", 2, 2048, "ab" * 32, ["k0", "k1"])]).to_json())


def shard_change(**kw):
    return lambda d: d["shards"][0].update(kw)


HOSTILE_INDEXES = {
    "classes a string": (lambda d: d.update(classes="abcd"), "classes"),
    "classes not strings": (lambda d: d.update(classes=[1, 2]), r"classes\[0\]"),
    "a class named twice": (lambda d: d.update(classes=[*d["classes"], d["classes"][0]]), "already used"),
    "version a string": (lambda d: d.update(version="3"), "version"),
    "version a bool": (lambda d: d.update(version=True), "version"),
    "version zero": (lambda d: d.update(version=0), "positive"),
    "dataset empty": (lambda d: d.update(dataset=""), "dataset"),
    "negative samples": (shard_change(samples=-1, keys=[]), r"shards\[0\]\.samples"),
    "negative bytes": (shard_change(bytes=-5), r"shards\[0\]\.bytes"),
    "fractional samples": (shard_change(samples=1.5, keys=[]), r"shards\[0\]\.samples"),
    "samples not the keys": (shard_change(samples=3), "the number of its keys"),
    "short sha256": (shard_change(sha256="abc"), "64 lowercase hex"),
    "sha256 not hex": (shard_change(sha256="zz" * 32), "64 lowercase hex"),
    "url escapes": (shard_change(url="../../etc/passwd"), "relative"),
    "url escapes inside": (shard_change(url="shards/../../x.tar"), "relative"),
    "url absolute": (shard_change(url="/etc/passwd"), "relative"),
    "url another bucket": (shard_change(url="s3://other/x.tar"), "scheme"),
    "split not a string": (shard_change(split=5), "split"),
    "shard twice": (lambda d: d["shards"].append(dict(d["shards"][0])), "once"),
    "shards not a list": (lambda d: d.update(shards={"a": 1}), "shards"),
    "missing shard field": (lambda d: d["shards"][0].pop("sha256"), "sha256"),
    "unknown field": (lambda d: d.update(extra=1), "unexpected keyword"),
    "created not finite": (lambda d: d.update(created=float("inf")), "created"),
}


@pytest.mark.parametrize("name", list(HOSTILE_INDEXES))
def test_a_hostile_index_is_refused_by_field(name):
    change, field = HOSTILE_INDEXES[name]
    d = valid_index()
    assert DatasetIndex.from_json(json.dumps(d), "ok").version == 3  # the unchanged one is fine
    change(d)
    with pytest.raises(ShardError, match=field) as err:
        DatasetIndex.from_json(json.dumps(d), where="s3://b/ds/indexes/v000003.json")
    assert "s3://b/ds/indexes/v000003.json" in str(err.value)


@pytest.mark.parametrize("text", [b"[" * 200_000, b"{\"a\":" * 200_000, b"\xff\xfe not utf-8", b"[1, 2]", b""])
def test_deeply_nested_or_non_json_index_is_a_shard_error_not_a_crash(text):
    with pytest.raises(ShardError, match="not a dataset index"):
        DatasetIndex.from_json(text, where="idx")


def test_an_index_whose_version_differs_from_its_name_is_refused(tmp_path):
    storage = open_storage(tmp_path)
    d = valid_index()
    d["version"] = 2
    storage.put_bytes("shards/train/000000.tar", b"x")
    storage.put_bytes(index_key(3), json.dumps(d).encode())
    with pytest.raises(ShardError, match="says version 2 but is stored as version 3"):
        load_index(str(tmp_path))


# -- umask ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_local_objects_are_created_with_the_process_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        storage = open_storage(tmp_path / "ds")
        storage.put_bytes("shards/train/000000.tar", b"shard")
        storage.put_bytes(index_key(1), b"{}", if_absent=True)  # the create-if-absent path (indexes)
        src = tmp_path / "src.bin"
        src.write_bytes(b"file")
        storage.put_file("shards/train/000001.tar", src)
    finally:
        os.umask(old)
    for key in ("shards/train/000000.tar", index_key(1), "shards/train/000001.tar"):
        assert stat.S_IMODE((tmp_path / "ds" / key).stat().st_mode) == mode, key
    leftovers = [p.name for p in (tmp_path / "ds").rglob(".*")]
    assert leftovers == []  # the temporary files were renamed or removed
    assert storage.get_bytes("shards/train/000000.tar") == b"shard"


# -- reads that resume after transient errors ---------------------------------------------------------


class FlakyStorage(LocalStorage):
    """Local storage whose first read of each object fails with a connection reset after ``cut`` bytes."""

    def __init__(self, root, cut: int, always: bool = False, error: type[Exception] = ConnectionResetError) -> None:
        super().__init__(root)
        self.cut, self.always, self.error = cut, always, error
        self.failed: list[tuple[str, int]] = []
        self.opened: list[tuple[str, int]] = []

    def open(self, key: str, offset: int = 0):
        f = super().open(key, offset)
        self.opened.append((key, offset))
        outer, fail = self, self.always or not any(k == key for k, _ in self.failed)
        budget = [max(0, self.cut - offset)]  # fails at absolute byte ``cut``

        class Flaky(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, b):
                if fail and budget[0] <= 0:
                    outer.failed.append((key, offset))
                    raise outer.error(104, "Connection reset by peer")
                n = f.readinto(memoryview(b)[:budget[0]] if fail else b)
                budget[0] -= n
                return n

            def close(self):
                f.close()
                super().close()
        return Flaky()


def test_a_connection_reset_mid_shard_resumes_at_the_byte_reached_and_changes_nothing(tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(storage_mod.time, "sleep", sleeps.append)
    root = tmp_path / "ds"
    plain = open_storage(root)
    shards = {}
    for s in range(3):
        keys = [f"s{s}v{i}" for i in range(3)]
        shards[f"shards/val/{s:06d}.tar"] = (tar_of([m for i, k in enumerate(keys)
                                                     for m in good(k, i, seed=10 * s + i, split="val")]), keys)
    index = commit(plain, shards, split="val")
    flaky = FlakyStorage(root, cut=5000)
    expected = list(make_loader(index, plain, "val", train=False, batch_size=2, num_workers=0, clip=CLIP))
    got = list(make_loader(index, flaky, "val", train=False, batch_size=2, num_workers=0, clip=CLIP))
    assert len(flaky.failed) == 3 and all(offset == 0 for _, offset in flaky.failed)  # each shard cut once
    assert sorted(o for _, o in flaky.opened) == [0, 0, 0, 5000, 5000, 5000]  # and resumed where it stopped
    assert len(got) == len(expected) and sleeps and all(d > 0 for d in sleeps)
    for a, b in zip(expected, got, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["label"], b["label"]) and torch.equal(a["video"], b["video"])


def test_a_read_that_keeps_failing_gives_up_with_the_object_and_the_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_mod.time, "sleep", lambda s: None)
    storage = FlakyStorage(tmp_path, cut=100, always=True)
    storage.put_bytes("obj", b"y" * 1000)
    with pytest.raises(StorageError, match=r"obj: reading failed at byte 100 4 times in a row") as err, \
            open_resuming(storage, "obj", attempts=3, backoff=0.01) as f:
        f.read()
    assert "ConnectionResetError" in str(err.value)
    # an error that another try cannot fix is not retried
    storage = FlakyStorage(tmp_path, cut=100, error=lambda *a: PermissionError(13, "denied"))
    with pytest.raises(PermissionError), open_resuming(storage, "obj") as f:
        f.read()
    assert len(storage.opened) == 1


def test_the_decode_limits_an_ingest_ran_under_travel_with_the_index(tmp_path):
    """Readers decode with the index's limits: a dataset ingested with a limit raised (long sources) is not
    refused in training, and one with a limit lowered shows the limit is really the index's."""
    storage = LocalStorage(tmp_path / "ds")
    data, _, keys = shard_bytes([ShardSample(f"k{i}", make_video("motion", MOTION_CLASSES[i % 2], seed=i),
                                             meta(i % 2)) for i in range(2)])
    storage.put_bytes("s/0.tar", data)
    shard = ShardInfo("s/0.tar", "train", 2, len(data), sha256_of(data), keys)
    roomy = DatasetIndex("hostile", 1, list(MOTION_CLASSES), {}, [shard])
    assert index_limits(roomy) == DecodeLimits()  # written before the limits were recorded: the defaults
    tight = DatasetIndex("hostile", 2, list(MOTION_CLASSES), {}, [shard], decode_limits={"max_pixels": 32 * 32})
    assert index_limits(tight).max_pixels == 32 * 32
    batches, error = drain(make_loader(tight, storage, "train", train=False, batch_size=2, num_workers=0, clip=CLIP))
    tally = FaultTally()
    for b in batches:
        tally.add(b["faults"])
    assert error is None and tally.by_reason == {"undecodable": 2}  # 64x64 frames over the index's 32x32
    batches, _ = drain(make_loader(roomy, storage, "train", train=False, batch_size=2, num_workers=0, clip=CLIP))
    assert sum(len(b["key"]) for b in batches if "key" in b) == 2
    for hostile in ({"max_pixels": "lots"}, {"max_pixels": float("inf")}, {"allow_images": 1}, {"rm_rf": 1}):
        with pytest.raises(ShardError, match="decode_limits"):
            index_limits(DatasetIndex("hostile", 3, list(MOTION_CLASSES), {}, [shard], decode_limits=hostile))


def test_an_index_readers_would_refuse_is_never_committed(tmp_path):
    """A class list with a name twice (a task list with a duplicate) used to be committed, then refused by
    every reader, the next ingest included: the dataset was stuck. Now the commit refuses it."""
    storage = LocalStorage(tmp_path / "ds")
    storage.put_bytes("s/0.tar", b"x" * 10)
    shard = ShardInfo("s/0.tar", "train", 0, 10, sha256_of(b"x" * 10), [])
    with pytest.raises(ShardError, match=r"v000001\.json \(not committed\).*classes\[2\]"):
        commit_index(storage, DatasetIndex("d", 1, ["a", "b", "a"], {}, [shard]))
    assert not storage.exists(index_key(1))
