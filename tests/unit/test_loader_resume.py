"""A training stream resumed k batches in gives exactly the batches the uninterrupted stream gave from k
on (what an exact resume from a mid-interval checkpoint needs), with several DataLoader workers."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.loader import ClipConfig, make_loader
from pipeline.data.shards import (
    DatasetIndex,
    ShardSample,
    commit_index,
    load_index,
    put_shard,
    shard_url,
)
from pipeline.data.storage import open_storage
from pipeline.data.synthetic import MOTION_CLASSES, make_video

CLIP = ClipConfig(num_frames=2, sampling_rate=8, crop=32, scale=(32, 48), flip=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    storage = open_storage(root)
    shards = []
    for s in range(3):
        samples = []
        for i in range(4):
            label = MOTION_CLASSES[i]
            meta = {"label": i, "label_name": label, "dataset": "t", "split": "train", "source": "-",
                    "duration": 2.0, "fps": 16.0, "num_frames": 32, "source_sha256": "-"}
            samples.append(ShardSample(f"s{s}v{i}", make_video("motion", label, seed=10 * s + i), meta))
        shards.append(put_shard(storage, shard_url("train", s), "train", samples))
    commit_index(storage, DatasetIndex("t", 1, list(MOTION_CLASSES), {}, shards))
    return load_index(str(root))


def take(index, storage, n: int, skip: int, workers: int) -> list[dict]:
    loader = make_loader(index, storage, "train", train=True, batch_size=2, num_workers=workers, endless=True,
                         clip=CLIP, seed=3, rank=1, world_size=2, start_step=40, shuffle_buffer=4, skip_batches=skip)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers,skip", [(0, 3), (2, 3), (2, 4), (3, 5)])
def test_a_resumed_stream_continues_exactly(dataset, workers, skip):
    index, storage = dataset
    full = take(index, storage, skip + 4, 0, workers)
    resumed = take(index, storage, 4, skip, workers)
    for a, b in zip(full[skip:], resumed, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["video"], b["video"])  # same clip positions, crops and flips too
    # and the stream is not the same from the start (the skip is real)
    assert [b["key"] for b in full[:4]] != [b["key"] for b in resumed] or not torch.equal(full[0]["video"],
                                                                                           resumed[0]["video"])
