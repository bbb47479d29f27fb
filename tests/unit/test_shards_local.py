"""Shards, indexes and the loader on local storage (the embedded default)."""

from __future__ import annotations

import io

import pytest
import torch

from pipeline.data.loader import ClipConfig, make_loader
from pipeline.data.shards import (
    DatasetIndex,
    ShardError,
    ShardInfo,
    ShardSample,
    commit_index,
    load_index,
    read_shard,
    sha256_of,
    shard_bytes,
)
from pipeline.data.storage import StorageError, open_storage, split_s3_uri
from pipeline.data.synthetic import COLOUR_CLASSES, make_video

META = {"label": 0, "label_name": "red", "dataset": "synthetic", "split": "val", "source": "-", "duration": 2.0,
        "fps": 16.0, "num_frames": 32, "source_sha256": "-"}


def test_shards_are_deterministic_and_complete():
    samples = [ShardSample(f"c{i}", make_video("colour", "red", seed=i), META) for i in range(3)]
    a, count, keys = shard_bytes(samples)
    assert shard_bytes(samples)[0] == a and count == 3 and keys == ["c0", "c1", "c2"]
    back = list(read_shard(io.BytesIO(a)))
    assert [s.key for s in back] == keys and back[1].video == samples[1].video and back[1].meta == META
    with pytest.raises(ShardError, match="metadata lacks"):
        shard_bytes([ShardSample("x", b"", {"label": 0})])
    with pytest.raises(ShardError, match="without '.'"):
        shard_bytes([ShardSample("a.b", b"", META)])


def test_local_dataset_commit_and_an_exact_evaluation_pass(tmp_path):
    storage = open_storage(tmp_path / "ds")
    shards = []
    for s in range(3):
        samples = [ShardSample(f"s{s}v{i}", make_video("colour", COLOUR_CLASSES[i], seed=10 * s + i),
                               {**META, "label": i, "label_name": COLOUR_CLASSES[i]}) for i in range(2)]
        data, count, keys = shard_bytes(samples)
        storage.put_bytes(f"shards/val/{s:06d}.tar", data)
        shards.append(ShardInfo(f"shards/val/{s:06d}.tar", "val", count, len(data), sha256_of(data), keys))
    with pytest.raises(ShardError, match="no committed dataset index"):
        load_index(str(tmp_path / "ds"))
    commit_index(storage, DatasetIndex("synthetic", 1, list(COLOUR_CLASSES), {}, shards))
    with pytest.raises(StorageError, match="already exists"):
        commit_index(storage, DatasetIndex("synthetic", 1, list(COLOUR_CLASSES), {}, shards))
    index, store = load_index(str(tmp_path / "ds"))
    loader = make_loader(index, store, "val", train=False, batch_size=4, num_workers=0,
                         clip=ClipConfig(num_frames=2, sampling_rate=8, crop=32, scale=(32, 40)))
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(k for s in shards for k in s.keys)
    assert batches[0]["video"].shape == (4, 3, 2, 32, 32) and batches[-1]["video"].shape[0] == 2
    with pytest.raises(ValueError, match="no shards for split 'train'"):
        make_loader(index, store, "train", train=True, batch_size=1, epoch_samples=4)


def test_a_shard_listed_but_not_stored_cannot_be_committed(tmp_path):
    storage = open_storage(tmp_path)
    ghost = ShardInfo("shards/val/000009.tar", "val", 1, 10, "0" * 64, ["x"])
    with pytest.raises(ShardError, match="000009.tar: listed by index v1 but not stored"):
        commit_index(storage, DatasetIndex("d", 1, ["a"], {}, [ghost]))
    with pytest.raises(StorageError, match="escapes the storage root"):
        storage.put_bytes("../outside", b"1")


def test_s3_uris_are_taken_apart_in_one_place_and_malformed_ones_refused():
    assert split_s3_uri("s3://bucket/videos/a.mp4") == ("bucket", "videos/a.mp4")
    assert split_s3_uri("s3://bucket") == ("bucket", "")  # a storage root
    assert split_s3_uri("s3://bucket/a.mp4", need_key=True) == ("bucket", "a.mp4")
    with pytest.raises(StorageError, match=r"^s3:///k: no bucket name"):
        split_s3_uri("s3:///k")
    with pytest.raises(StorageError, match=r"^s3://bucket/: no object key"):
        split_s3_uri("s3://bucket/", need_key=True)
    with pytest.raises(StorageError, match=r"^/data/a.mp4: not an S3 URI"):
        split_s3_uri("/data/a.mp4")
    with pytest.raises(StorageError, match=r"^s3://: no bucket name; expected s3://bucket/prefix"):
        open_storage("s3://")
    from pipeline.ingest.worker import read_source

    with pytest.raises(StorageError, match=r"^s3://bucket: no object key"):  # refused before any request
        read_source("s3://bucket")


def test_segment_sampling_training_stream_on_local_storage(tmp_path):
    """The SSv2 recipe's path: segment sampling, no flip, a seeded endless stream cut to an epoch."""
    storage = open_storage(tmp_path / "ssv2")
    samples = [ShardSample(f"v{i}", make_video("motion", "moving_left", seed=i), {**META, "split": "train"})
               for i in range(4)]
    data, count, keys = shard_bytes(samples)
    storage.put_bytes("shards/train/000000.tar", data)
    index = DatasetIndex("ssv2", 1, ["x"], {}, [ShardInfo("shards/train/000000.tar", "train", count, len(data),
                                                         sha256_of(data), keys)])
    clip = ClipConfig(num_frames=8, sampler="segment", flip=False, crop=32, scale=(32, 40), output="uint8")
    loader = make_loader(index, storage, "train", train=True, batch_size=2, num_workers=0, clip=clip,
                         epoch_samples=6, seed=3)
    batches = list(loader)
    assert len(batches) == 3 and all(b["video"].shape == (2, 3, 8, 32, 32) for b in batches)
    assert batches[0]["video"].dtype == torch.uint8
    again = list(make_loader(index, storage, "train", train=True, batch_size=2, num_workers=0, clip=clip,
                             epoch_samples=6, seed=3))
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(batches, again, strict=True))
