"""Small committed datasets for tests: real encoded synthetic videos in real shards, written directly
(no Ray) so a test pays a second, not an ingest run."""

from __future__ import annotations

from pipeline.data.shards import (
    DatasetIndex,
    ShardSample,
    commit_index,
    put_shard,
    shard_url,
)
from pipeline.data.storage import open_storage
from pipeline.data.synthetic import SyntheticSpec, classes, make_video


def write_dataset(uri: str, kind: str = "colour", per_class: dict[str, int] | None = None,
                  samples_per_shard: int = 8, seed: int = 0) -> DatasetIndex:
    storage = open_storage(uri)
    spec = SyntheticSpec()
    names = list(classes(kind))
    shards, n = [], 0
    for split, count in (per_class or {"train": 8, "val": 2}).items():
        samples = []
        for _ in range(count):  # classes interleaved, as ingest mixes them: no shard holds one class
            for label_index, label in enumerate(names):
                meta = {"label": label_index, "label_name": label, "dataset": f"test-{kind}", "split": split,
                        "source": "synthetic", "duration": spec.num_frames / spec.fps, "fps": spec.fps,
                        "num_frames": spec.num_frames, "source_sha256": "-"}
                samples.append(ShardSample(f"{kind}{n:05d}", make_video(kind, label, seed * 100003 + n, spec), meta))
                n += 1
        for i in range(0, len(samples), samples_per_shard):
            shards.append(put_shard(storage, shard_url(split, i // samples_per_shard), split,
                                    samples[i:i + samples_per_shard]))
    index = DatasetIndex(f"test-{kind}", 1, names, {}, shards)
    commit_index(storage, index)
    return index
