"""The data layer against a real S3 server (SeaweedFS): shards, index, streaming, errors."""

from __future__ import annotations

import collections

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
    put_shard,
    sha256_of,
    shard_bytes,
    shard_url,
    verify_shard,
)
from pipeline.data.storage import StorageError, open_storage
from pipeline.data.synthetic import MOTION_CLASSES, make_video

pytestmark = pytest.mark.integration
CLIP = ClipConfig(num_frames=4, sampling_rate=8, crop=32, scale=(36, 44))
NUM_SHARDS, PER_SHARD = 8, 3


def build_dataset(uri: str, split: str = "val") -> DatasetIndex:
    """NUM_SHARDS shards of synthetic motion videos written to ``uri`` and committed as version 1."""
    storage = open_storage(uri)
    shards = []
    n = 0
    for s in range(NUM_SHARDS):
        samples = []
        for _ in range(PER_SHARD):
            label = n % len(MOTION_CLASSES)
            samples.append(ShardSample(f"vid{n:04d}", make_video("motion", MOTION_CLASSES[label], seed=n),
                                       {"label": label, "label_name": MOTION_CLASSES[label], "dataset": "synthetic",
                                        "split": split, "source": f"synthetic://{n}", "duration": 2.0, "fps": 16.0,
                                        "num_frames": 32, "source_sha256": "-"}))
            n += 1
        shards.append(put_shard(storage, shard_url(split, s), split, samples))
    index = DatasetIndex("synthetic", 1, list(MOTION_CLASSES), {"fps": 16}, shards)
    commit_index(storage, index)
    return index


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_every_sample_exactly_once_per_evaluation_pass_over_ranks_and_workers(s3_bucket):
    uri = f"s3://{s3_bucket}/datasets/synthetic"
    build_dataset(uri)
    index, storage = load_index(uri)  # as a reader does: the newest committed version
    assert index.version == 1 and index.num_samples("val") == NUM_SHARDS * PER_SHARD
    per_rank = []
    for rank in range(2):
        loader = make_loader(index, storage, "val", train=False, batch_size=4, num_workers=2, clip=CLIP,
                             rank=rank, world_size=2)
        batches = list(loader)
        assert all(b["video"].shape[1:] == (3, 4, 32, 32) for b in batches)
        per_rank.append([k for b in batches for k in b["key"]])
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == NUM_SHARDS * PER_SHARD == len(set(everything))  # once each, none missing
    assert not set(per_rank[0]) & set(per_rank[1])  # ranks disjoint
    assert set(everything) == {k for s in index.shards for k in s.keys}


def test_training_stream_is_deterministic_for_a_seed_and_step_and_moves_on_when_resumed(s3_bucket):
    uri = f"s3://{s3_bucket}/datasets/synthetic"
    index = build_dataset(uri, split="train")
    storage = open_storage(uri)

    def stream(seed: int, step: int, rank: int = 0):
        loader = make_loader(index, storage, "train", train=True, batch_size=3, num_workers=2, clip=CLIP,
                             seed=seed, start_step=step, rank=rank, world_size=2, epoch_samples=12)
        return list(loader)

    a, b = stream(seed=7, step=0), stream(seed=7, step=0)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(a, b, strict=True))
    assert sum(len(x["key"]) for x in a) == 12  # the epoch length
    resumed = stream(seed=7, step=100)
    assert [x["key"] for x in resumed] != [x["key"] for x in a]
    other_rank = stream(seed=7, step=0, rank=1)
    assert [x["key"] for x in other_rank] != [x["key"] for x in a]
    labels = collections.Counter(int(y) for x in a for y in x["label"])
    assert set(labels) <= set(range(len(MOTION_CLASSES)))


def test_shards_verify_and_a_changed_shard_is_caught(s3_bucket):
    uri = f"s3://{s3_bucket}/datasets/synthetic"
    index = build_dataset(uri)
    storage = open_storage(uri)
    for shard in index.shards:
        verify_shard(storage, shard)
    storage.put_bytes(index.shards[0].url, b"not the shard")
    with pytest.raises(ShardError, match="content differs from the index"):
        verify_shard(storage, index.shards[0])


def test_a_committed_index_is_never_rewritten(s3_bucket):
    uri = f"s3://{s3_bucket}/datasets/synthetic"
    index = build_dataset(uri)
    with pytest.raises(StorageError, match="already exists"):
        commit_index(open_storage(uri), index)
    assert load_index(uri)[0].created == index.created


def test_a_missing_bucket_says_which_and_what_to_do(seaweedfs):
    storage = open_storage("s3://no-such-bucket-here/ds")
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-here' does not exist at http://127.0.0.1:\d+; "
                                            r"create it"):
        storage.check()
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        storage.get_bytes("indexes/v000001.json")
    with pytest.raises(ShardError, match="no committed dataset index"):
        load_index(f"s3://{seaweedfs_bucket(seaweedfs)}/empty")


def seaweedfs_bucket(server) -> str:
    server.create_bucket("empty-bucket")
    return "empty-bucket"


def test_wrong_credentials_are_reported_without_the_secret(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    with pytest.raises(StorageError, match="access denied") as err:
        open_storage(f"s3://{s3_bucket}/x").get_bytes("y")
    assert "definitely-wrong-secret" not in str(err.value)


def test_a_sample_that_does_not_decode_is_skipped_and_counted_in_evaluation_with_its_shard(s3_bucket):
    """One undecodable clip no longer ends the pass: the good sample is evaluated, the broken one is
    counted under its shard (``faults``) for the evaluator to report."""
    storage = open_storage(f"s3://{s3_bucket}/bad")
    meta = {"label": 0, "label_name": "x", "dataset": "d", "split": "val", "source": "s", "duration": 2.0,
            "fps": 16.0, "num_frames": 32, "source_sha256": "-"}
    data, count, keys = shard_bytes([ShardSample("broken", b"\\x00" * 100, meta),
                                     ShardSample("fine", make_video("motion", MOTION_CLASSES[0], seed=1), meta)])
    storage.put_bytes("shards/val/000000.tar", data)
    index = DatasetIndex("d", 1, ["x"], {}, [ShardInfo("shards/val/000000.tar", "val", count, len(data),
                                                       sha256_of(data), keys)])
    batches = list(make_loader(index, storage, "val", train=False, batch_size=1, num_workers=0, clip=CLIP))
    assert [b["key"] for b in batches] == [["fine"]]
    assert batches[0]["faults"] == {"read": 2, "skipped": {storage.uri("shards/val/000000.tar"): {"undecodable": 1}}}
