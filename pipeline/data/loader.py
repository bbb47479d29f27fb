"""Streaming clips from a committed dataset index (S3 or local) with a WebDataset pipeline.

The pipeline is a flat list of named stages (open_clip's style):

training    resampled shards (seeded) -> open, verify -> samples -> metadata -> shuffle (seeded) -> clip
            (random position) -> transform -> batch -> fault counts -> epoch length
evaluation  this rank's shards -> this worker's shards -> open, verify -> samples -> metadata -> clip
            (centre) -> transform -> batch (last one partial) -> fault counts: every good sample
            exactly once per pass

Trust: every shard is checked against the dataset index (size and sha256, in the one pass that reads
it) before anything from it moves on; a mismatch is a ``ShardError`` that stops the run. A sample the index
marks as dropped (a tombstone: its video left the dataset after the shard was written) is passed over,
neither read nor counted as a fault. A broken sample
(no clip or metadata, bad JSON, a label or duration out of range, a link or directory in the tar, a clip
that does not decode) is skipped and counted per shard and reason, and logged at a limited rate. Every
batch (or evaluation item) carries ``"faults"``: what its DataLoader worker read and skipped since its
previous batch, ``{"read": int, "skipped": {shard_uri: {reason: count}}}``, so the counts cross the worker
process boundary; ``FaultTally`` sums them and holds the ceiling (``DataQualityError``). Evaluation
pipelines hold their last item back so the counts of a pass's end travel on it; a worker that has counts
but no item left to carry them ends with a marker, ``{"faults": ...}`` alone (no ``video``/``views``).

Labels: a class index per clip (batch ``label`` ``(B,)``, int64), or in a multi-label dataset
(``DatasetIndex.multi_label``) a multi-hot float vector over the classes (batch ``label`` ``(B, classes)``;
an unlabelled video's row is all -1). A label that is not what the dataset's kind needs (an index out of
range, a list in a single-label dataset, a bare index in a multi-label one) is a counted ``bad_label`` skip.

Node and worker splitting are explicit (rank and world size are arguments, not environment guesses).
Every random choice in training comes from a generator seeded by (seed, rank, worker, start step), so
a run resumed at step s draws new data instead of replaying the first epoch, and a given
(seed, rank, worker, step) always gives the same stream. Batches are ``(B, C, T, H, W)``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset import tariterators

from pipeline.data.shards import DatasetIndex, ShardError, ShardInfo
from pipeline.data.storage import Storage, open_resuming
from pipeline.data.transforms import MEAN, STD, TestTransform, TrainTransform
from pipeline.data.video import DecodeLimits, FixedRateSampler, SegmentSampler, VideoDecodeError, decode_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipConfig:
    """How a sample becomes a clip: temporal sampling and spatial transform."""

    num_frames: int = 8
    sampling_rate: int = 32  # frames of a ref_fps timeline between sampled frames (fixed-rate sampling)
    ref_fps: float = 30.0
    sampler: str = "fixed_rate"  # fixed_rate or segment (SSv2)
    crop: int = 224
    scale: tuple[int, int] = (256, 320)
    flip: bool = True
    short_video: str = "loop"
    output: str = "float"  # float: normalised; uint8: normalise on the device (transforms.normalize_on_device)
    num_classes: int = 0  # training labels must lie in [0, num_classes); 0: the dataset index's class count
    mean: tuple[float, ...] = MEAN  # the model's input normalisation (TimeSformerConfig.mean/std)
    std: tuple[float, ...] = STD
    randaugment: tuple[int, int] = (0, 0)  # training clips: (ops, magnitude) of RandAugment; 0 ops = off


MAX_DURATION_S = 86_400.0  # a sample's metadata claiming more than a day is broken, not a long video
STALL_SAMPLES = 1000  # a training worker that skips this many samples in a row without a batch gives up
MIN_READ_FOR_CEILING = 500  # samples read before data.max_skip_fraction applies (one bad first sample
# must not stop a run at 0.01)
MAX_SHARD_BYTES = 16 << 30  # a shard is held in memory while it is verified (see open_shards)
_LOG_FIRST = 5  # skipped samples logged one by one per worker pass, then summaries ...
_LOG_EVERY_S = 60.0  # ... at most this often


class DataQualityError(RuntimeError):
    """Too many broken samples: names the counts, the shards most affected and the knob
    (``data.max_skip_fraction``). One message argument, so a DataLoader worker can re-raise it."""


DEFAULT_LIMITS = DecodeLimits()


def index_limits(index: DatasetIndex) -> DecodeLimits:
    """The decode limits the dataset was ingested under (``DatasetIndex.decode_limits``; the defaults for
    indexes written before they were recorded): training and evaluation decode what the ingest kept."""
    known = [f.name for f in dataclasses.fields(DecodeLimits)]
    for name, value in index.decode_limits.items():
        if name == "allow_images":
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if name not in known or not ok:
            raise ShardError(f"dataset {index.dataset} index v{index.version}: decode_limits.{name}={value!r} is "
                             f"not a decode limit (fields: {', '.join(known)}); the index is damaged (re-ingest)")
    return DecodeLimits(**index.decode_limits)


# -- fault counting -------------------------------------------------------------------------------


class FaultCounter:
    """The producer side, one per DataLoader worker process (the pipeline's copy in that process):
    samples read and skipped since the worker's previous batch, and the rate-limited log of skips."""

    def __init__(self, stall_samples: int = 0) -> None:
        self.stall_samples = stall_samples  # 0: never give up (evaluation passes are finite)
        self.reset()

    def reset(self) -> None:
        self._read = 0
        self._skipped: dict[str, collections.Counter] = {}
        self._in_a_row = 0  # skipped since the last good sample
        self._logged = 0
        self._unlogged: collections.Counter = collections.Counter()
        self._latest = ""
        self._last_log = time.monotonic()

    def read(self) -> None:
        self._read += 1

    def good(self) -> None:
        """A sample made it through (a clip, or one a resumed run skips as consumed): the run of skips ends."""
        self._in_a_row = 0

    def skip(self, uri: str, key: str, reason: str, detail: str) -> None:
        self._skipped.setdefault(uri, collections.Counter())[reason] += 1
        self._in_a_row += 1
        if self._logged < _LOG_FIRST:
            self._logged += 1
            log.warning("skipping sample %s of %s: %s: %s%s", key, uri, reason, detail,
                        "" if self._logged < _LOG_FIRST else
                        f" (further skips in this worker are summarised at most every {_LOG_EVERY_S:.0f}s)")
        else:
            self._unlogged[reason] += 1
            self._latest = f"{uri}/{key}: {reason}: {detail}"
            if time.monotonic() - self._last_log >= _LOG_EVERY_S:
                self.flush_log()
        if self.stall_samples and self._in_a_row >= self.stall_samples:
            raise DataQualityError(
                f"{self._in_a_row} samples in a row were skipped without one good sample between them (this "
                f"DataLoader worker's skips by shard: {_describe_shards(self._skipped, 5)}); the data is broken: "
                f"re-ingest or fix those shards (data.max_skip_fraction cannot help a stream with nothing to train on)")

    def flush_log(self) -> None:
        if self._unlogged:
            log.warning("skipped %d more samples in the last %.0fs (%s); latest: %s", sum(self._unlogged.values()),
                        time.monotonic() - self._last_log, _fmt_counts(self._unlogged), self._latest)
            self._unlogged.clear()
        self._last_log = time.monotonic()

    def pending(self) -> bool:
        return bool(self._read or self._skipped)

    def take(self) -> dict[str, Any]:
        """The counts since the previous ``take`` (the ``"faults"`` field of a batch), and a fresh start."""
        out = {"read": self._read, "skipped": {uri: dict(c) for uri, c in self._skipped.items()}}
        self._read, self._skipped = 0, {}
        return out


class FaultTally:
    """The consumer side: the sum of the ``"faults"`` of every batch (or evaluation item) seen, over all
    DataLoader workers; the training loop holds the ceiling with it, evaluation reports it."""

    def __init__(self) -> None:
        self.read = 0
        self.by_shard: dict[str, collections.Counter] = {}

    def add(self, faults: dict[str, Any] | None) -> None:
        if not faults:
            return
        self.read += int(faults.get("read", 0))
        for uri, reasons in faults.get("skipped", {}).items():
            self.by_shard.setdefault(uri, collections.Counter()).update(reasons)

    @property
    def skipped(self) -> int:
        return sum(sum(c.values()) for c in self.by_shard.values())

    @property
    def by_reason(self) -> dict[str, int]:
        total: collections.Counter = collections.Counter()
        for c in self.by_shard.values():
            total.update(c)
        return dict(total)

    @property
    def fraction(self) -> float:
        return self.skipped / self.read if self.read else 0.0

    def exceeds(self, max_fraction: float, min_read: int = MIN_READ_FOR_CEILING) -> bool:
        """More skipped than ``max_fraction`` of the samples read, once ``min_read`` have been read
        (``max_fraction`` 0: any skip)."""
        skipped = self.skipped
        if skipped == 0:
            return False
        if max_fraction <= 0:
            return True
        return self.read >= min_read and skipped > max_fraction * self.read

    def describe(self, top: int = 5) -> str:
        return (f"{self.skipped} of {self.read} samples read were skipped ({100 * self.fraction:.2f}%; "
                f"{_fmt_counts(self.by_reason) or 'none'}); most from: {_describe_shards(self.by_shard, top)}")

    def error(self, max_fraction: float, who: str = "") -> DataQualityError:
        return DataQualityError(
            f"{who}{self.describe()}: above data.max_skip_fraction={max_fraction:g}. The samples are broken in "
            f"storage: fix or re-ingest those shards (the ingest job quarantines videos it cannot use), or, if "
            f"this rate is expected, raise data.max_skip_fraction")


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _describe_shards(by_shard: dict[str, collections.Counter], top: int) -> str:
    worst = sorted(by_shard.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:top]
    return "; ".join(f"{uri} ({sum(c.values())}: {_fmt_counts(c)})" for uri, c in worst) or "none"


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _role(skip_batches: int = 0) -> tuple[int, int]:
    """(role, workers): the stream this worker plays. A DataLoader hands out batches from its workers in
    turn, starting with worker 0; when a stream is resumed ``skip_batches`` batches in, worker j plays
    the stream of worker ``(j + skip_batches) % workers`` so the batches come out in the original order."""
    worker, workers = _worker()
    return (worker + skip_batches) % workers, workers


def _rng(seed: int, rank: int, start_step: int, stream: int, skip_batches: int = 0, *extra: int) -> np.random.Generator:
    role, _ = _role(skip_batches)
    return np.random.default_rng(np.random.SeedSequence([seed, rank, role, start_step, stream, *extra]))


# -- stages ---------------------------------------------------------------------------------------


def resampled_shards(urls: list[str], seed: int, rank: int, start_step: int, skip_batches: int = 0):
    """Stage: shard urls drawn with replacement, forever, from this (seed, rank, worker, step) stream."""
    def stage():
        rng = _rng(seed, rank, start_step, 0, skip_batches)
        while True:
            yield {"url": urls[int(rng.integers(len(urls)))]}
    return stage


def my_shards(urls: list[str], rank: int, world_size: int):
    """Stage: the shards of this rank, then of this worker: a partition of all shards."""
    def stage():
        worker, workers = _worker()
        for url in urls[rank::world_size][worker::workers]:
            yield {"url": url}
    return stage


def open_shards(storage: Storage, index: DatasetIndex, counter: FaultCounter, verify: bool = True):
    """Stage: open each shard, verified against the index, with a resuming reader (a connection reset
    mid-shard resumes at the byte reached; see storage.open_resuming).

    Verification holds the shard back: its bytes are read (and hashed in the same pass) into memory, and
    nothing of it moves on until the last byte matched the index's size and sha256. Memory: one shard per
    DataLoader worker (K400 at 256 samples of ~2 MB per shard: ~0.5 GB; 4-5 GB for a rank's 8-10 workers),
    briefly alongside the samples just cut from it. Each worker's shuffle buffer already holds as much
    (data.shuffle_buffer = 256 samples of clip bytes), so this at most doubles the loader's raw bytes, on
    nodes with hundreds of GB; in return a shard swapped or damaged after ingest is refused whole, before
    one of its samples is trained on or evaluated. CPU: sha256 and the copy are a small fraction of a
    clip's decode (measured by ``benchmarks/bench_loader.py --verify-cost``: docs/performance.md "Shard verification",
    benchmarks/results/loader-verify-cpu-2core.log).
    ``verify=False`` streams unchecked; it exists only for benchmarks/bench_loader.py's measurement of the cost."""
    infos = {s.url: s for s in index.shards}

    def stage(src):
        counter.reset()  # a new pass (in this worker process)
        for item in src:
            url = item["url"]
            if verify:
                stream = _MemoryStream(read_verified(storage, infos[url], index))
            else:  # tarfile reads in 10 KiB blocks: a large buffer turns that into few big reads
                stream = io.BufferedReader(open_resuming(storage, url), buffer_size=4 << 20)
            try:  # with the shard's tombstones: samples that left the dataset (shard_samples passes over them)
                yield {**item, "uri": storage.uri(url), "stream": stream, "dropped": infos[url].dropped}
            finally:
                stream.close()
    return stage


def read_verified(storage: Storage, shard: ShardInfo, index: DatasetIndex) -> bytearray:
    """The shard's bytes, read once and hashed as they arrive; ``ShardError`` unless they are exactly the
    index's size and sha256. Stops at one byte past the index's size (a longer object is not read on)."""
    uri = storage.uri(shard.url)
    what = f"shard {uri} of dataset {index.dataset} (index v{index.version})"
    if shard.bytes > MAX_SHARD_BYTES:
        raise ShardError(f"{what}: the index says {shard.bytes} bytes, more than the loader holds to verify a "
                         f"shard ({MAX_SHARD_BYTES} bytes); re-ingest with fewer samples per shard")
    buf = bytearray(shard.bytes)
    digest = hashlib.sha256()
    pos, extra = 0, b""
    with open_resuming(storage, shard.url) as f, memoryview(buf) as view:
        while pos < shard.bytes:
            n = f.readinto(view[pos:pos + (4 << 20)])
            if not n:
                break
            digest.update(view[pos:pos + n])
            pos += n
        if pos == shard.bytes:
            extra = f.read(1)
    if pos != shard.bytes or extra:
        size = f"{pos} bytes" if not extra else f"more than {shard.bytes} bytes"
        raise ShardError(f"{what}: holds {size}, the index says {shard.bytes}; the object was changed or damaged "
                         f"after ingest, and nothing from it was used. Re-ingest the dataset (a new index version) "
                         f"or restore the object")
    if digest.hexdigest() != shard.sha256:
        raise ShardError(f"{what}: sha256 {digest.hexdigest()[:16]}... differs from the index's "
                         f"{shard.sha256[:16]}...; the object was changed or damaged after ingest, and nothing from "
                         f"it was used. Re-ingest the dataset (a new index version) or restore the object")
    return buf


class _MemoryStream:
    """A read-only file over a verified shard in memory (no copy of the whole buffer, as BytesIO makes)."""

    def __init__(self, buf: bytearray) -> None:
        self.view, self.pos = memoryview(buf), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        out = bytes(self.view[self.pos:end])
        self.pos = end
        return out

    def close(self) -> None:
        self.view.release()


_NAME_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's split: key, then extensions


def _member_kind(member: tarfile.TarInfo) -> str:
    return ("sparse file" if member.issparse() else "symbolic link" if member.issym() else
            "hard link" if member.islnk() else "directory" if member.isdir() else "device or fifo")


def _plain_file(member: tarfile.TarInfo) -> bool:
    """A regular member whose bytes are all in the tar. A sparse member (GNU or pax) is "regular" to tarfile
    but declares a size of its own, filled with zeros as it is read: 10 KB of tar became 1 GiB in memory,
    and the declared size has no bound. The ingest never writes one."""
    return member.isreg() and not member.issparse()


def shard_samples(counter: FaultCounter):
    """Stage: the samples of each shard (consecutive tar members sharing a key), each counted as read.
    A sample with a member that is not a regular file (a link, a directory), without its .mp4 or its
    .json, or with a member twice, is skipped and counted; a shard that is not a tar is a ShardError.
    A sample the index lists in the shard's ``dropped`` (``item["dropped"]``: its video left the dataset
    after the shard was written) is passed over: neither read nor skipped, as if the tar did not hold it."""
    def finish(uri: str, key: str, parts: dict[str, bytes], problems: list[str], dropped: frozenset[str]):
        if key in dropped:
            return None
        counter.read()
        if problems:
            counter.skip(uri, key, "not_a_file", "; ".join(problems))
        elif "json" not in parts or "mp4" not in parts:
            missing = "json" if "json" not in parts else "mp4"
            counter.skip(uri, key, f"missing_{missing}", f"no {key}.{missing} (members: {sorted(parts)})")
        else:
            return {"__key__": key, "__url__": uri, "mp4": parts["mp4"], "json": parts["json"]}
        return None

    def stage(src):
        for item in src:
            uri = item["uri"]
            dropped = frozenset(item.get("dropped") or ())
            key, parts, problems = None, {}, []
            try:
                with tarfile.open(fileobj=item["stream"], mode="r|") as tar:
                    for member in tar:
                        m = _NAME_RE.match(member.name)
                        name_key, ext = (m.group(1), m.group(2)) if m else (member.name, "")
                        if name_key != key:
                            if key is not None and (sample := finish(uri, key, parts, problems, dropped)) is not None:
                                yield sample
                            key, parts, problems = name_key, {}, []
                        if not _plain_file(member):
                            problems.append(f"{member.name} is a {_member_kind(member)}, not a regular file")
                        elif ext in parts:
                            problems.append(f"{member.name} appears twice")
                        elif name_key not in dropped:  # a tombstoned sample's bytes are not even copied
                            parts[ext] = tar.extractfile(member).read()
                        tar.members = []  # a stream has no random access: keep no list of members
                if key is not None and (sample := finish(uri, key, parts, problems, dropped)) is not None:
                    yield sample
            except tarfile.TarError as e:
                raise ShardError(f"shard {uri}: not a readable tar ({e}) although it matches its index: the "
                                 f"ingest wrote a broken shard; re-ingest the dataset") from e
    return stage


def check_meta(raw: bytes, num_classes: int, train: bool,
               multi_label: bool = False) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """A sample's metadata, or the reason and detail why it cannot be used. Labels are integers in
    [0, num_classes) (``multi_label``: lists of distinct such integers, possibly empty); -1 (unlabelled, as
    ingest writes for test rows) only in evaluation. Durations are finite seconds in (0, MAX_DURATION_S]."""
    try:
        meta = json.loads(raw)
    except RecursionError:
        return None, ("bad_json", "nested too deeply")
    except ValueError as e:  # includes UnicodeDecodeError
        return None, ("bad_json", str(e)[:120])
    if not isinstance(meta, dict):
        return None, ("bad_json", f"a JSON {type(meta).__name__}, not an object")
    label = meta.get("label")
    low = 0 if train else -1
    if multi_label:
        if not (label == -1 and not train and _is_index(label)) and not (
                isinstance(label, list) and all(_is_index(i) and 0 <= i < num_classes for i in label)
                and len(set(label)) == len(label)):
            return None, ("bad_label", f"label {label!r}: expected a list of distinct class indices in "
                          f"[0, {num_classes}) (a multi-label dataset)" + ("" if train else ", or -1 (unlabelled)"))
    elif not _is_index(label) or not low <= label < num_classes:
        return None, ("bad_label", f"label {label!r}: expected an integer in [{low}, {num_classes})"
                      + (" (-1, unlabelled, is for evaluation only)" if train and label == -1 else ""))
    duration = meta.get("duration")
    if (not isinstance(duration, (int, float)) or isinstance(duration, bool) or not math.isfinite(duration)
            or not 0 < duration <= MAX_DURATION_S):
        return None, ("bad_duration", f"duration {duration!r}: expected seconds in (0, {MAX_DURATION_S:g}]")
    return meta, None


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def multi_hot(label: list[int] | int, num_classes: int) -> torch.Tensor:
    """A multi-label sample's label as the float vector the loss and the metric take: 1 at its classes, 0
    elsewhere; all -1 for an unlabelled video (label -1)."""
    if isinstance(label, int):
        return torch.full((num_classes,), -1.0)
    out = torch.zeros(num_classes)
    out[list(label)] = 1.0
    return out


def parse_meta(counter: FaultCounter, num_classes: int, train: bool, multi_label: bool = False):
    """Stage: parse and check each sample's metadata (cheap, before the shuffle buffer and the resume
    skip, so a broken one never takes a place in a batch's numbering). ``multi_label``: the label becomes
    its multi-hot vector (``multi_hot``)."""
    def stage(src):
        for sample in src:
            meta, problem = check_meta(sample["json"], num_classes, train, multi_label)
            if problem is not None:
                counter.skip(sample["__url__"], sample["__key__"], *problem)
                continue
            if multi_label:
                meta = {**meta, "label": multi_hot(meta["label"], num_classes)}
            yield {"__key__": sample["__key__"], "__url__": sample["__url__"], "mp4": sample["mp4"], "meta": meta}
    return stage


def attach_faults(counter: FaultCounter, hold_last: bool):
    """Stage: each batch (or evaluation item) gets ``"faults"``, its worker's counts since its previous one.
    Evaluation holds one item back so the counts of a pass's end still travel on its last item; a worker
    that yields nothing else but has counts ends with a marker ``{"faults": ...}`` (no video)."""
    def stage(src):
        if not hold_last:
            for item in src:
                yield {**item, "faults": counter.take()}
            return
        pending = None
        for item in src:
            if pending is not None:
                yield {**pending, "faults": counter.take()}
            pending = item
        counter.flush_log()
        if pending is not None:
            yield {**pending, "faults": counter.take()}
        elif counter.pending():
            yield {"faults": counter.take()}
    return stage


def seeded_shuffle(bufsize: int, seed: int, rank: int, start_step: int, skip_batches: int = 0):
    """Stage: a shuffle buffer whose order is fixed by (seed, rank, worker, step)."""
    def stage(src):
        rng = _rng(seed, rank, start_step, 1, skip_batches)
        buf: list = []
        for sample in src:
            buf.append(sample)
            if len(buf) >= bufsize:
                yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))
    return stage


def skip_consumed(skip_batches: int, batch_size: int, counter: FaultCounter | None = None):
    """Stage: number the samples of this worker's stream, and drop those that made the batches a
    resumed run already consumed, without decoding them (reading is cheap, decoding is not). A dropped
    sample was a good one in the run that consumed it: it ends a run of skips (the stall guard)."""
    def stage(src):
        role, workers = _role(skip_batches)
        drop = max(0, -(-(skip_batches - role) // workers)) * batch_size  # ceil((n - role) / workers) batches
        for i, sample in enumerate(src):
            if i >= drop:
                yield {**sample, "__n__": i}
            elif counter is not None:
                counter.good()
    return stage


def to_clip(cfg: ClipConfig, train: bool, seed: int, rank: int, start_step: int, skip_batches: int = 0,
            counter: FaultCounter | None = None, limits: DecodeLimits = DEFAULT_LIMITS):
    """Stage: decode the sampled frames of each sample and transform them; a sample that does not decode
    is skipped and counted (in evaluation too: the pass goes on, and reports the count). Each sample's
    random choices come from its own generator (seed, rank, worker, step, sample number), so skipping
    samples on resume leaves the following ones unchanged. (A clip that fails to decode inside the part of
    an interval a resumed run skips shifts that resumed stream by one sample: decoding is what the skip
    avoids, so it cannot know.)"""
    counter = counter if counter is not None else FaultCounter()

    def stage(src):
        temporal = (SegmentSampler(cfg.num_frames) if cfg.sampler == "segment"
                    else FixedRateSampler(cfg.num_frames, cfg.sampling_rate, cfg.ref_fps, cfg.short_video))
        spatial_train = TrainTransform(crop=cfg.crop, scale=cfg.scale, flip=cfg.flip, mean=cfg.mean, std=cfg.std,
                                       output=cfg.output, randaugment=cfg.randaugment)
        spatial_test = TestTransform(crop=cfg.crop, num_crops=1, mean=cfg.mean, std=cfg.std, output=cfg.output)
        for sample in src:
            meta = sample["meta"]
            rng = _rng(seed, rank, start_step, 2, skip_batches, sample.get("__n__", 0))
            name = f"{sample['__url__']}/{sample['__key__']}.mp4"
            if isinstance(temporal, SegmentSampler):
                spec = temporal.sample(meta["duration"], rng, train=train)
            else:
                spec = temporal.sample(meta["duration"], rng, position="random" if train else "center")
            try:
                frames = decode_frames(sample["mp4"], spec.times, name=name, limits=limits).frame_list
            except VideoDecodeError as e:
                counter.skip(sample["__url__"], sample["__key__"], "undecodable", str(e))
                continue
            video = spatial_train(frames, rng) if train else spatial_test(frames)[0]
            counter.good()
            yield {"video": video, "label": meta["label"], "key": sample["__key__"], "short": spec.short}
    return stage


def to_views(cfg: ClipConfig, protocol: str, temporal_clips: int, spatial_crops: int,
             counter: FaultCounter | None = None, limits: DecodeLimits = DEFAULT_LIMITS):
    """Stage (test protocol): every view of a video as one ``(V, C, T, H, W)`` tensor: ``temporal_clips``
    uniformly spaced clips x ``spatial_crops`` crops (``multi_view``), or every non-overlapping clip
    covering the video x crops (``long_video``). SSv2-style segment sampling has one clip (the middle
    frame of each segment). A video that does not decode is skipped and counted."""
    counter = counter if counter is not None else FaultCounter()

    def stage(src):
        spatial = TestTransform(crop=cfg.crop, num_crops=spatial_crops, mean=cfg.mean, std=cfg.std, output=cfg.output)
        for sample in src:
            meta = sample["meta"]
            name = f"{sample['__url__']}/{sample['__key__']}.mp4"
            if cfg.sampler == "segment":
                specs = [SegmentSampler(cfg.num_frames).sample(meta["duration"], train=False)]
            else:
                temporal = FixedRateSampler(cfg.num_frames, cfg.sampling_rate, cfg.ref_fps, cfg.short_video)
                specs = (temporal.covering_clips(meta["duration"]) if protocol == "long_video"
                         else temporal.uniform_clips(meta["duration"], temporal_clips))
            try:
                views = [spatial(decode_frames(sample["mp4"], spec.times, name=name, limits=limits).frame_list)
                         for spec in specs]
            except VideoDecodeError as e:
                counter.skip(sample["__url__"], sample["__key__"], "undecodable", str(e))
                continue
            yield {"views": torch.cat(views), "label": meta["label"], "key": sample["__key__"],
                   "clips": len(specs)}
    return stage


def loading_view(index: DatasetIndex, split: str) -> DatasetIndex:
    """What a pipeline's stages (and so every DataLoader worker) hold of the index: ``split``'s shards with
    their size, sha256 and tombstones, without their member lists, and none of the per-video checksums and
    quarantine the ingest keeps. At HowTo100M's 1.2M videos the full index is ~330 MB in memory; this view is
    a few MB (benchmarks/bench_plan_scale.py, docs/performance.md "Planning and indexes at scale")."""
    shards = [ShardInfo(s.url, s.split, s.samples, s.bytes, s.sha256, [], s.dropped) for s in index.split(split)]
    return dataclasses.replace(index, shards=shards, source_checksums={}, quarantine={}, entry_digests={})


def view_loader(index: DatasetIndex, storage: Storage, split: str, *, clip: ClipConfig, protocol: str,
                temporal_clips: int, spatial_crops: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 2) -> torch.utils.data.DataLoader:
    """Videos of this rank's shards, one at a time, with all their test views (an exact pass over the
    good videos). Each item also has ``"faults"`` (see the module docstring); an item with only
    ``"faults"`` (no ``"views"``) is a worker's final count, not a video."""
    shards = index.split(split)
    if not shards:
        raise ValueError(f"dataset {index.dataset} v{index.version} has no shards for split {split!r}")
    index = loading_view(index, split)
    counter = FaultCounter()
    pipeline = wds.DataPipeline(my_shards([s.url for s in shards], rank, world_size),
                                open_shards(storage, index, counter), shard_samples(counter),
                                parse_meta(counter, clip.num_classes or len(index.classes), train=False,
                                           multi_label=index.multi_label),
                                to_views(clip, protocol, temporal_clips, spatial_crops, counter, index_limits(index)),
                                attach_faults(counter, hold_last=True))
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available())


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    labels = [s["label"] for s in samples]
    return {"video": torch.stack([s["video"] for s in samples]),  # (B, C, T, H, W)
            # (B,) class indices, or (B, classes) multi-hot vectors in a multi-label dataset
            "label": torch.stack(labels) if labels and isinstance(labels[0], torch.Tensor) else torch.tensor(labels),
            "key": [s["key"] for s in samples],
            "short": torch.tensor([s["short"] for s in samples])}


# -- pipelines ------------------------------------------------------------------------------------


def clip_pipeline(index: DatasetIndex, storage: Storage, split: str, *, train: bool, batch_size: int,
                  clip: ClipConfig = ClipConfig(), rank: int = 0, world_size: int = 1, seed: int = 0,
                  start_step: int = 0, shuffle_buffer: int = 64,
                  batches_per_worker: int | None = None, skip_batches: int = 0,
                  stall_samples: int = STALL_SAMPLES, verify: bool = True) -> wds.DataPipeline:
    """The WebDataset pipeline for one rank (iterate it directly, or through ``make_loader``).

    Training streams are endless unless ``batches_per_worker`` gives an epoch length. ``skip_batches``
    resumes the stream of (seed, rank, start_step) that many batches in: the same batches follow as if
    it had never stopped (with the same number of DataLoader workers). Batches are dicts: ``video``
    ``(B, C, T, H, W)``, ``label`` ``(B,)`` (-1: unlabelled, evaluation only; a multi-label dataset:
    ``(B, classes)`` multi-hot, an unlabelled row all -1), ``key``, ``short`` and
    ``faults`` (module docstring; in evaluation a dict with only ``faults`` is a worker's final count).
    A training worker that skips ``stall_samples`` samples in a row raises ``DataQualityError``.
    ``verify=False`` is for benchmarks/bench_loader.py only."""
    shards = index.split(split)
    if not shards:
        raise ValueError(f"dataset {index.dataset} v{index.version} has no shards for split {split!r} "
                         f"(splits: {sorted({s.split for s in index.shards})})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    index = loading_view(index, split)
    urls = [s.url for s in shards]
    num_classes = clip.num_classes or len(index.classes)
    limits = index_limits(index)
    counter = FaultCounter(stall_samples if train else 0)
    read = [open_shards(storage, index, counter, verify), shard_samples(counter),
            parse_meta(counter, num_classes, train, index.multi_label)]
    if train:
        stages = [resampled_shards(urls, seed, rank, start_step, skip_batches), *read,
                  seeded_shuffle(shuffle_buffer, seed, rank, start_step, skip_batches),
                  skip_consumed(skip_batches, batch_size, counter),
                  to_clip(clip, True, seed, rank, start_step, skip_batches, counter, limits),
                  wds.batched(batch_size, collation_fn=collate), attach_faults(counter, hold_last=False)]
        pipeline = wds.DataPipeline(*stages)
        return pipeline if batches_per_worker is None else pipeline.with_epoch(batches_per_worker)
    stages = [my_shards(urls, rank, world_size), *read,
              to_clip(clip, False, seed, rank, start_step, counter=counter, limits=limits),
              wds.batched(batch_size, collation_fn=collate, partial=True), attach_faults(counter, hold_last=True)]
    return wds.DataPipeline(*stages)


def make_loader(index: DatasetIndex, storage: Storage, split: str, *, train: bool, batch_size: int,
                num_workers: int = 2, epoch_samples: int | None = None, endless: bool = False,
                **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader over ``clip_pipeline``: ``num_workers`` processes, pinned memory on GPU machines.
    For training, ``epoch_samples`` is the number of clips this rank sees per epoch (or ``endless``:
    the caller stops)."""
    per_worker = None
    if train and not endless:
        if not epoch_samples:
            raise ValueError("training needs epoch_samples (clips per rank per epoch) or endless=True")
        per_worker = max(1, epoch_samples // (batch_size * max(1, num_workers)))
    pipeline = clip_pipeline(index, storage, split, train=train, batch_size=batch_size,
                             batches_per_worker=per_worker, **kwargs)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False)


def iterate_samples(storage: Storage, url: str) -> Iterator[dict]:
    """The raw samples of one shard, read unverified and unchecked (for tools and the benchmark; training and
    evaluation read through the verifying pipeline)."""
    with storage.open(url) as f:
        data = f.read()
    yield from tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url,
                                                                             "stream": io.BytesIO(data)}]))


def test_clip_config(cfg: Any) -> ClipConfig:
    """The clips of the test protocol: the training clip at the test views' size (``test.crop``, 0: data.crop)."""
    return dataclasses.replace(clip_config(cfg), crop=cfg.test.crop or cfg.data.crop)


def clip_config(cfg: Any) -> ClipConfig:
    """The loader's clips for a run config (``pipeline.config.RunConfig``). On GPUs they stay uint8 and are
    normalised on the device (normalize_on_device): less work for the loader's cores (benchmarks/bench_loader.py)
    and a quarter of the host-to-device bytes."""
    d = cfg.data
    return ClipConfig(num_frames=d.num_frames, sampling_rate=d.sampling_rate, ref_fps=d.ref_fps, sampler=d.sampler,
                      crop=d.crop, scale=(d.scale[0], d.scale[1]), flip=d.flip,
                      output="uint8" if cfg.cluster.accelerator == "gpu" else "float",
                      num_classes=cfg.model.num_classes,  # labels outside [0, num_classes) are skipped, counted
                      mean=tuple(cfg.model.mean), std=tuple(cfg.model.std),
                      randaugment=(d.randaugment_n, d.randaugment_m))
