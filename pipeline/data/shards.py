"""The shard sample and dataset index formats (shared/DESIGN.md, "Contracts worth keeping stable").

A shard is a WebDataset tar: for each sample ``<key>.mp4`` (the clip) and ``<key>.json`` (label index
and name, dataset, split, source uri, duration, fps, frame count, source checksum). In a multi-label dataset
``label`` is the list of the video's class indices (possibly empty) and ``label_name`` the list of their names;
-1 (an integer) still means unlabelled. Single-label samples are written exactly as before. Tars are written
deterministically (sorted by nothing but the order given, zero mtimes, fixed owner), so the same
samples make the same bytes and the same sha256.

A dataset index is one JSON object per committed version: dataset, version, classes, preprocessing
parameters and every shard with its url (relative to the dataset root), split, sample count, bytes,
sha256 and sample keys; ``multi_label: true`` for a dataset with several labels per video (absent, as in
every index written before, for one label per video). A shard's ``dropped`` lists the keys of its samples
that left the dataset after it was written (their videos were deleted, changed or moved; shards are never
rewritten, so the tar still holds them): readers skip them and every count leaves them out. It is written
only when not empty, so an index without tombstones is the same JSON as before. ``entry_digests`` maps each
live video to a digest of its manifest entry (clip bounds and labels, ``pipeline.ingest.plan.entry_digest``), so
the next ingest sees a relabel or new bounds; absent in indexes written before (every entry then counts as
unchanged) and, like ``dropped``, written only when not empty. Index objects are written
once, create-if-absent, and never rewritten; the newest version under ``indexes/`` is the dataset. Readers
only ever see committed indexes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
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
                if member.issparse():  # its declared size is filled with zeros on reading: unbounded memory
                    raise ShardError(f"{name}: member {member.name} is a sparse file, which no shard holds")
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


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB blocks (a source video, a weights file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def shard_url(split: str, number: int) -> str:
    """Where shard ``number`` of ``split`` lives under a dataset root."""
    return f"shards/{split}/{number:06d}.tar"


def put_shard(storage: Storage, url: str, split: str, samples: Iterable[ShardSample]) -> ShardInfo:
    """Write ``samples`` as one shard at ``url`` and describe it for the index (count, size, sha256, keys)."""
    data, count, keys = shard_bytes(samples)
    storage.put_bytes(url, data)
    return ShardInfo(url, split, count, len(data), sha256_of(data), keys)


@dataclass
class ShardInfo:
    url: str  # relative to the dataset root
    split: str
    samples: int  # what the tar holds (verified against it), tombstoned samples included
    bytes: int
    sha256: str
    keys: list[str] = field(default_factory=list)
    # tombstones: keys of samples that are no longer part of the dataset (readers skip them, counts leave them
    # out); a subset of ``keys``, in their order
    dropped: list[str] = field(default_factory=list)

    @property
    def live(self) -> int:
        """The samples of this shard that are part of the dataset: what every count uses."""
        return self.samples - len(self.dropped)

    def live_keys(self) -> list[str]:
        if not self.dropped:
            return self.keys
        gone = set(self.dropped)
        return [k for k in self.keys if k not in gone]

    def to_dict(self) -> dict[str, Any]:
        d = {"url": self.url, "split": self.split, "samples": self.samples, "bytes": self.bytes,
             "sha256": self.sha256, "keys": self.keys}
        if self.dropped:
            d["dropped"] = self.dropped
        return d


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
    # the decode limits the ingest ran under (video.DecodeLimits fields); readers decode with the same, so a
    # video an ingest was allowed to keep (limits.max_seconds raised for long sources) is not refused in
    # training. Empty in indexes written before: the defaults.
    decode_limits: dict[str, Any] = field(default_factory=dict)
    # several labels per video (samples' ``label`` is a list of class indices); written only when true, so a
    # single-label index is the same JSON as before and older readers still load it
    multi_label: bool = False
    # video id -> digest of its manifest entry (split, start, end | label, label name: 24 hex digits), compared
    # by the next ingest; empty in indexes written before (their entries count as unchanged) and then not written
    entry_digests: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == name]

    def split_digest(self, name: str) -> str:
        """A split's identity: the sha256 of its shards' sha256s, 16 hex digits (the MLflow dataset input's
        digest, the model card's and the registry's). The same shards give the same digest wherever they are.
        The tombstones of a shard count too (its sha256 and the dropped keys): another set of live samples is
        another split; a split without tombstones has the digest it had before they existed."""
        parts = (s.sha256 + ("-" + ",".join(s.dropped) if s.dropped else "") for s in self.split(name))
        return sha256_of("".join(parts).encode())[:16]

    def num_samples(self, split: str | None = None) -> int:
        """Samples of the dataset (of ``split``): tombstoned ones left out."""
        return sum(s.live for s in self.shards if split is None or s.split == split)

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["shards"] = [s.to_dict() for s in self.shards]
        if not self.multi_label:
            del d["multi_label"]
        if not self.entry_digests:
            del d["entry_digests"]
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "index", *, expected_version: int | None = None) -> DatasetIndex:
        """Parse and validate a committed index; ``expected_version`` is the version its object name says.
        Anything that is not a well-formed index is a ``ShardError`` naming ``where`` and the field."""
        try:
            d = json.loads(text)
        except RecursionError:  # json recurses per nesting level: 200k brackets exhaust the stack
            raise ShardError(f"{where}: not a dataset index (JSON nested too deeply)") from None
        except (ValueError, TypeError) as e:  # includes UnicodeDecodeError
            raise ShardError(f"{where}: not a dataset index (invalid JSON: {e})") from e
        _check_index(d, where)
        if expected_version is not None and d["version"] != expected_version:
            raise ShardError(f"{where}: says version {d['version']} but is stored as version {expected_version}; "
                             f"the index object was changed or copied to the wrong name: restore it or re-ingest")
        try:
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            return cls(**d)
        except TypeError as e:  # an unknown or missing field
            raise ShardError(f"{where}: not a dataset index ({e})") from e


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{24}$")
_INDEX_FIELDS = {"dataset": str, "version": int, "classes": list, "preprocessing": dict, "shards": list,
                 "created": (int, float), "format": str, "source_checksums": dict, "quarantine": dict,
                 "decode_limits": dict, "multi_label": bool, "entry_digests": dict}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _safe_relative_key(url: Any) -> bool:
    """A key below the dataset root: relative, no scheme, no '..' or empty parts, no backslashes."""
    if not isinstance(url, str) or not url or url.startswith("/") or "\\" in url or "://" in url or "\x00" in url:
        return False
    return all(part not in ("", ".", "..") for part in url.split("/"))


def _check_index(d: Any, where: str) -> None:
    """The index schema, field by field: the loader trusts these values (sizes it reads, digests it
    compares, keys it opens), so a hostile or damaged index must fail here, by name."""
    def bad(field_: str, value: Any, expected: str) -> ShardError:
        shown = repr(value)
        return ShardError(f"{where}: field {field_}={shown[:80]}{'...' if len(shown) > 80 else ''}: expected "
                          f"{expected}; the index is damaged or was not written by the ingest job (re-ingest)")

    if not isinstance(d, dict):
        raise ShardError(f"{where}: not a dataset index (a JSON {type(d).__name__}, expected an object)")
    missing = [k for k in ("dataset", "version", "classes", "preprocessing", "shards") if k not in d]
    if missing:
        raise ShardError(f"{where}: not a dataset index (missing fields {missing})")
    for name, types in _INDEX_FIELDS.items():
        if name in d and (not isinstance(d[name], types) or (isinstance(d[name], bool) and types is not bool)):
            raise bad(name, d[name], {str: "a string", int: "an integer", list: "a list", dict: "an object",
                                      bool: "true or false"}.get(types, "a number"))
    if not d["dataset"]:
        raise bad("dataset", d["dataset"], "a non-empty name")
    if d["version"] < 1:
        raise bad("version", d["version"], "a positive integer")
    seen_classes: dict[str, int] = {}
    for i, c in enumerate(d["classes"]):
        if not isinstance(c, str):
            raise bad(f"classes[{i}]", c, "a class name (string)")
        if c in seen_classes:  # two label indices with one name: predictions could not be told apart
            raise bad(f"classes[{i}]", c, f"a name not already used (classes[{seen_classes[c]}])")
        seen_classes[c] = i
    if "created" in d and not math.isfinite(d["created"]):
        raise bad("created", d["created"], "a finite time stamp")
    for k, v in d.get("source_checksums", {}).items():
        if not isinstance(v, str):
            raise bad(f"source_checksums[{k!r}]", v, "a checksum string")
    for k, v in d.get("entry_digests", {}).items():
        if not isinstance(v, str) or not _DIGEST_RE.match(v):
            raise bad(f"entry_digests[{k!r}]", v, "24 lowercase hex digits")
    for k, v in d.get("quarantine", {}).items():
        if not isinstance(v, dict):
            raise bad(f"quarantine[{k!r}]", v, "an object")
    urls = set()
    for i, s in enumerate(d["shards"]):
        f = f"shards[{i}]"
        if not isinstance(s, dict):
            raise bad(f, s, "an object")
        for name in ("url", "split", "samples", "bytes", "sha256"):
            if name not in s:
                raise ShardError(f"{where}: {f} lacks the field {name!r}")
        if not _safe_relative_key(s["url"]):
            raise bad(f"{f}.url", s["url"], "a key relative to the dataset root, without '..' or a scheme")
        if s["url"] in urls:
            raise bad(f"{f}.url", s["url"], "each shard listed once")
        urls.add(s["url"])
        if not isinstance(s["split"], str) or not s["split"]:
            raise bad(f"{f}.split", s["split"], "a split name (string)")
        for name in ("samples", "bytes"):
            if not _is_int(s[name]) or s[name] < 0:
                raise bad(f"{f}.{name}", s[name], "a non-negative integer")
        if not isinstance(s["sha256"], str) or not _SHA256_RE.match(s["sha256"]):
            raise bad(f"{f}.sha256", s["sha256"], "64 lowercase hex digits")
        keys = s.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise bad(f"{f}.keys", keys, "a list of sample keys (strings)")
        if keys and len(keys) != s["samples"]:
            raise bad(f"{f}.samples", s["samples"], f"the number of its keys ({len(keys)})")
        if "dropped" in s:
            dropped = s["dropped"]
            if not isinstance(dropped, list) or not all(isinstance(k, str) for k in dropped):
                raise bad(f"{f}.dropped", dropped, "a list of sample keys (strings)")
            members = set(keys)
            if dropped and (not keys or len(set(dropped)) != len(dropped) or not members.issuperset(dropped)):
                raise bad(f"{f}.dropped", dropped, "distinct keys of the shard's own samples (its keys)")


def settle_multi_label(requested: bool | None, index: DatasetIndex) -> bool:
    """The ``model.multi_label`` a run on ``index`` trains with: the index's when ``requested`` is None (left
    to the dataset); a request that contradicts the dataset is a ``ValueError`` saying what to set: a softmax
    head cannot learn label sets, nor a sigmoid head be scored by top-1 against one class per video."""
    if requested is None or requested == index.multi_label:
        return index.multi_label
    kind = "several labels per video (multi-label)" if index.multi_label else "one label per video"
    raise ValueError(f"model.multi_label={str(requested).lower()} but dataset {index.dataset} v{index.version} "
                     f"has {kind}: set model.multi_label={str(index.multi_label).lower()}, or leave it out (null: "
                     f"the dataset's)")


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
    text = index.to_json()
    # what readers will refuse is never committed (a dataset stuck at an index no one can load): the same
    # schema check as at load, with the object it would have become named
    DatasetIndex.from_json(text, where=f"{storage.uri(key)} (not committed)")
    storage.put_bytes(key, text.encode(), if_absent=True)
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
    m = _INDEX_RE.match(key)
    return DatasetIndex.from_json(text, where=storage.uri(key),
                                  expected_version=int(m.group(1)) if m else None), storage


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
