"""The shard sample and dataset index formats (shared/DESIGN.md, "Contracts worth keeping stable").

A shard is a WebDataset tar: for each sample ``<key>.mp4`` (the clip) and ``<key>.json`` (label index
and name, dataset, split, source uri, duration, fps, frame count, source checksum). Tars are written
deterministically (sorted by nothing but the order given, zero mtimes, fixed owner), so the same
samples make the same bytes and the same sha256.

A dataset index is one JSON object per committed version: dataset, version, classes, preprocessing
parameters and every shard with its url (relative to the dataset root), split, sample count, bytes,
sha256 and sample keys. Index objects are written once, create-if-absent, and never rewritten; the
newest version under ``indexes/`` is the dataset. Readers only ever see committed indexes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from pipeline.data.storage import ObjectMissingError, Storage, open_storage

INDEX_DIR = "indexes"
_INDEX_RE = re.compile(r"^indexes/v(\d{6})\.json$")
REQUIRED_META = ("label", "label_name", "dataset", "split", "source", "duration", "fps", "num_frames",
                 "source_sha256")


class ShardError(ValueError):
    """A shard or index that is not what it claims to be (names the object and the problem)."""


@dataclass
class ShardSample:
    key: str
    video: bytes
    meta: dict[str, Any]


def write_shard(samples: Iterable[ShardSample], fileobj: BinaryIO) -> tuple[int, list[str]]:
    """Write samples as a deterministic tar; returns (count, keys)."""
    keys: list[str] = []
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            if not s.key or "." in s.key or "/" in s.key:
                raise ShardError(f"sample key {s.key!r}: must be non-empty, without '.' or '/' (WebDataset splits "
                                 f"member names at the first dot)")
            missing = [m for m in REQUIRED_META if m not in s.meta]
            if missing:
                raise ShardError(f"sample {s.key}: metadata lacks {missing}")
            for ext, payload in (("mp4", s.video), ("json", json.dumps(s.meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(payload))
            keys.append(s.key)
    return len(keys), keys


def shard_bytes(samples: Iterable[ShardSample]) -> tuple[bytes, int, list[str]]:
    buf = io.BytesIO()
    count, keys = write_shard(samples, buf)
    return buf.getvalue(), count, keys


def read_shard(fileobj: BinaryIO, name: str = "shard") -> Iterator[ShardSample]:
    """The samples of a shard, checking that each has its clip and its metadata."""
    pending: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                pending.setdefault(key, {})[ext] = data
                if {"mp4", "json"} <= pending[key].keys():
                    parts = pending.pop(key)
                    yield ShardSample(key, parts["mp4"], json.loads(parts["json"]))
    except tarfile.TarError as e:
        raise ShardError(f"{name}: not a readable tar ({e})") from e
    if pending:
        raise ShardError(f"{name}: samples without both .mp4 and .json: {sorted(pending)[:5]}")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ShardInfo:
    url: str  # relative to the dataset root
    split: str
    samples: int
    bytes: int
    sha256: str
    keys: list[str] = field(default_factory=list)


@dataclass
class DatasetIndex:
    dataset: str
    version: int
    classes: list[str]
    preprocessing: dict[str, Any]
    shards: list[ShardInfo]
    created: float = field(default_factory=time.time)
    format: str = "pipeline.dataset_index/1"
    source_checksums: dict[str, str] = field(default_factory=dict)  # video id -> source sha256 (incremental)
    quarantine: dict[str, dict[str, str]] = field(default_factory=dict)  # video id -> {sha256, reason}

    def split(self, name: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == name]

    def num_samples(self, split: str | None = None) -> int:
        return sum(s.samples for s in self.shards if split is None or s.split == split)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "index") -> DatasetIndex:
        try:
            d = json.loads(text)
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{where}: not a dataset index ({type(e).__name__}: {e})") from e


def index_key(version: int) -> str:
    return f"{INDEX_DIR}/v{version:06d}.json"


def index_versions(storage: Storage) -> list[int]:
    return sorted(int(m.group(1)) for o in storage.list(INDEX_DIR + "/") if (m := _INDEX_RE.match(o.key)))


def commit_index(storage: Storage, index: DatasetIndex) -> str:
    """Write ``index`` as its version, once; fails if that version exists (never rewritten)."""
    for shard in index.shards:
        if not storage.exists(shard.url):
            raise ShardError(f"{storage.uri(shard.url)}: listed by index v{index.version} but not stored")
    key = index_key(index.version)
    storage.put_bytes(key, index.to_json().encode(), if_absent=True)
    return storage.uri(key)


def load_index(uri: str, version: int | None = None) -> tuple[DatasetIndex, Storage]:
    """The index at ``uri`` (a dataset root: its newest version, or ``version``) and the dataset's storage."""
    if uri.endswith(".json"):
        root, _, rel = uri.rpartition(f"/{INDEX_DIR}/")
        storage = open_storage(root)
        key = f"{INDEX_DIR}/{rel}"
    else:
        storage = open_storage(uri)
        versions = index_versions(storage)
        if not versions:
            raise ShardError(f"{uri}: no committed dataset index under {INDEX_DIR}/ (run the ingest job first)")
        if version is not None and version not in versions:
            raise ShardError(f"{uri}: no index version {version}; committed: {versions}")
        key = index_key(version if version is not None else versions[-1])
    try:
        text = storage.get_bytes(key)
    except ObjectMissingError as e:
        raise ShardError(str(e)) from e
    return DatasetIndex.from_json(text, where=storage.uri(key)), storage


def verify_shard(storage: Storage, shard: ShardInfo) -> None:
    """Raise ``ShardError`` unless the stored shard has the index's sha256, size and sample count."""
    data = storage.get_bytes(shard.url)
    where = storage.uri(shard.url)
    if len(data) != shard.bytes or sha256_of(data) != shard.sha256:
        raise ShardError(f"{where}: content differs from the index (bytes {len(data)} vs {shard.bytes}, "
                         f"sha256 {sha256_of(data)[:12]} vs {shard.sha256[:12]}); the object was changed or damaged")
    keys = [s.key for s in read_shard(io.BytesIO(data), where)]
    if len(keys) != shard.samples or (shard.keys and keys != shard.keys):
        raise ShardError(f"{where}: holds {len(keys)} samples, the index says {shard.samples}")
