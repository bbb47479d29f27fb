"""An ingest run: annotations + sources -> manifest -> plan against the last version -> one Ray task per
shard -> commit a new immutable dataset index -> quarantine report.

Runs on a local Ray (``ray.init``, listening on 127.0.0.1 only) or an existing cluster (``address`` /
``RAY_ADDRESS``), with a bounded number of shards in flight and Ray's retries for workers that die; a
shard that still fails, or a source that cannot be read, is quarantined as transient and planned again
by the next run, while the rest is committed. Two runs on one dataset are
excluded by a lease object in the dataset root (created only if absent, with an expiry, so a crashed
run's lease does not block forever); the second run says who holds it and exits cleanly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, apply_layer, parse_overrides, read_yaml, settable
from pipeline.data.datasets import (
    Manifest,
    read_diving48,
    read_folder,
    read_howto100m,
    read_kinetics,
    read_manifest_files,
    read_ssv2,
)
from pipeline.data.shards import (
    DatasetIndex,
    ShardError,
    ShardInfo,
    commit_index,
    index_key,
    index_versions,
    load_index,
    sha256_of,
)
from pipeline.data.storage import ObjectChangedError, ObjectMissingError, Storage, StorageError, open_storage
from pipeline.data.video import DecodeLimits
from pipeline.ingest.plan import TRANSIENT, Plan, Source, entry_digest, is_permanent, make_plan
from pipeline.ingest.worker import (
    TranscodeConfig,
    build_shard,
    read_source,
    sha256_file,
    shard_failure,
    with_retries,
)
from pipeline.progress import ProgressLines

log = logging.getLogger(__name__)
LEASE_KEY = "lease.json"


LimitsConfig = settable(DecodeLimits)
FORMATS = ("kinetics", "ssv2", "diving48", "howto100m", "manifest", "folder")
REQUIRED = ("dataset", "format", "annotations", "source", "output")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")


@dataclass
class IngestConfig:
    """An ingest run: checked like a training recipe (unknown keys, types, ranges, with the file or the
    command line and the dotted field named). ``dataset``, ``format``, ``annotations``, ``source`` and
    ``output`` are required."""

    dataset: str = ""
    format: str = ""  # kinetics, ssv2, diving48, howto100m; your own: manifest (CSV/JSONL), folder (class folders)
    annotations: list[str] = field(default_factory=list)  # annotation files, as the format needs them
    source: str = ""  # source videos: a directory, an s3:// prefix, or a .txt file list
    output: str = ""  # dataset root: s3://bucket/prefix or a local directory
    split: str = "train"  # for formats whose files are per split (ssv2, diving48)
    # several labels per video (format manifest): also when every row happens to have one; a manifest row with
    # a list of labels (or a|b) makes the dataset multi-label without it
    multi_label: bool = False
    samples_per_shard: int = 64
    transcode: TranscodeConfig = field(default_factory=TranscodeConfig)
    # decode limits (pipeline.data.video.DecodeLimits): a video over one is quarantined with the limit named
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    max_in_flight: int = 0  # shards at once; 0 = twice the cluster's CPUs
    lease_seconds: float = 6 * 3600
    # a shard whose live samples (not dropped: deleted, changed or moved videos) fall below this fraction is
    # repacked by copying its survivors' transcoded bytes into a new shard (0: never)
    compact_below: float = 0.5
    # refuse to commit a version that removes more than this fraction of the last version's live videos (a
    # manifest or folder listing cut short by mistake); 1: never refuse. A video whose source is only missing
    # (still listed) is not removed: it stays as it was.
    max_removed_fraction: float = 0.5

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(**asdict(self.limits))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> IngestConfig:
        return cls._resolve([(where, d)])

    @classmethod
    def load(cls, path: str | None, overrides: list[str]) -> IngestConfig:
        """The config file (if any), then ``key=value`` overrides, checked; any problem is a one-line
        ConfigError naming the file (or "command line") and the field."""
        layers: list[tuple[str, Any]] = []
        if path:
            layers.append((path, _read_config_file(path)))
        if overrides:
            layers.append(("command line", parse_overrides(overrides)))
        return cls._resolve(layers)

    @classmethod
    def _resolve(cls, layers: list[tuple[str, Any]]) -> IngestConfig:
        cfg, origin = cls(), {}
        for where, layer in layers:
            if not isinstance(layer, dict):
                raise ConfigError(f"{where}: an ingest config is a mapping of keys, got {type(layer).__name__}")
            layer = dict(layer)
            if isinstance(layer.get("annotations"), str):  # one file may be given as a string
                layer["annotations"] = [layer["annotations"]]
            apply_layer(cfg, layer, where)
            origin.update(_origins(layer, where))
        validate_ingest(cfg, origin)
        return cfg


def _read_config_file(path: str) -> Any:
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such ingest config file")
    return read_yaml(Path(path), "ingest config") or {}  # as recipes: safe, and a key written twice is an error


def _origins(layer: dict[str, Any], where: str, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the layer that set it, so a range error names the file or the command line."""
    out: dict[str, str] = {}
    for key, value in layer.items():
        if isinstance(value, dict):
            out.update(_origins(value, where, f"{prefix}{key}."))
        out[f"{prefix}{key}"] = where
    return out


def validate_ingest(cfg: IngestConfig, origin: dict[str, str] | None = None) -> None:
    """Refuse values no worker could run with (before anything is planned or started): required keys,
    choices, positive counts, a usable frame rate, an encoder this PyAV has, sane decode limits."""
    origin = origin or {}

    def fail(key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{origin.get(key, 'ingest config')}: {key}={value!r}: expected {expected}")

    missing = [k for k in REQUIRED if not getattr(cfg, k) and not (k == "annotations" and cfg.format == "folder")]
    if missing:
        where = " + ".join(dict.fromkeys(origin.values())) or "ingest config"
        raise ConfigError(f"{where}: missing required key(s) {missing} (give them in the file or as key=value)")
    if cfg.format not in FORMATS:
        raise fail("format", cfg.format, f"one of {', '.join(FORMATS)}")
    if not cfg.split:
        raise fail("split", cfg.split, "a split name (train, validation, ...)")
    if cfg.multi_label and cfg.format != "manifest":
        raise fail("multi_label", cfg.multi_label, f"false for format {cfg.format} (one label per video); label "
                   f"sets are read from a manifest (format manifest: a JSON list of labels, or a|b in a CSV cell)")
    counts = {"samples_per_shard": (cfg.samples_per_shard, 1), "max_in_flight": (cfg.max_in_flight, 0),
              "transcode.short_side": (cfg.transcode.short_side, 2), "transcode.crf": (cfg.transcode.crf, 0),
              "transcode.keyframe_interval": (cfg.transcode.keyframe_interval, 1),
              "transcode.min_frames": (cfg.transcode.min_frames, 1)}
    for key, (value, least) in counts.items():
        if value < least:
            raise fail(key, value, f"an integer >= {least}")
    if not (math.isfinite(cfg.lease_seconds) and cfg.lease_seconds > 0):
        raise fail("lease_seconds", cfg.lease_seconds, "a positive number of seconds")
    if not (math.isfinite(cfg.compact_below) and 0 <= cfg.compact_below <= 1):
        raise fail("compact_below", cfg.compact_below, "a fraction in [0, 1] (0: never compact)")
    if not (math.isfinite(cfg.max_removed_fraction) and 0 <= cfg.max_removed_fraction <= 1):
        raise fail("max_removed_fraction", cfg.max_removed_fraction, "a fraction in [0, 1] (1: never refuse)")
    fps = cfg.transcode.fps
    if not (math.isfinite(fps) and 0 < fps <= 1000):
        raise fail("transcode.fps", fps, "a frame rate > 0 and <= 1000 frames per second")
    t = cfg.transcode
    try:
        import av

        encoder = av.codec.Codec(t.codec, "w")
    except Exception:
        raise fail("transcode.codec", t.codec, "a video encoder of this PyAV/FFmpeg build (libx264, ...)") from None
    if encoder.type != "video":
        raise fail("transcode.codec", t.codec, f"a video encoder, not a {encoder.type} one")
    if t.codec == "libx264":
        if t.preset not in X264_PRESETS:
            raise fail("transcode.preset", t.preset, f"an x264 preset: {', '.join(X264_PRESETS)}")
        if t.crf > 51:
            raise fail("transcode.crf", t.crf, "0..51 for libx264 (lower is better quality)")
    for problem in cfg.decode_limits().problems():
        key = f"limits.{problem.partition('=')[0]}"
        raise ConfigError(f"{origin.get(key, 'ingest config')}: limits.{problem}")


def read_manifest(cfg: IngestConfig) -> Manifest:
    if cfg.format == "folder":  # the classes are the source's folders: its listing is the annotation
        return read_folder(_source_index(cfg.source)[2], cfg.dataset, cfg.split, where=f"source {cfg.source}")
    a = cfg.annotations
    missing = [f for f in a if not Path(f).is_file()]
    if missing:
        raise ValueError(f"annotation file(s) not found: {missing} (config key 'annotations', or --annotations)")
    if cfg.format == "kinetics":
        return read_kinetics(a, dataset=cfg.dataset)
    if cfg.format == "ssv2":
        return read_ssv2(a[0], a[1], cfg.split)
    if cfg.format == "diving48":
        return read_diving48(a[0], cfg.split, a[1] if len(a) > 1 else None)
    if cfg.format == "howto100m":
        return read_howto100m(a[0], a[1], a[2] if len(a) > 2 else None)
    if cfg.format == "manifest":
        return read_manifest_files(a, cfg.dataset, cfg.split, multi_label=cfg.multi_label)
    raise ValueError(f"format={cfg.format!r}: expected one of {', '.join(FORMATS)}")


def _source_index(source: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Name -> location, location -> checksum when the listing gives one without reading the bytes (S3 ETag
    and size), and every file's path relative to the source, for a local directory (walked), an ``s3://``
    prefix or a file list (``.txt``: one local path or ``s3://`` URI per line). A file is found by its path
    relative to the source and, directly under it, by its name (a file list: by name)."""
    if source.startswith("s3://"):
        storage = open_storage(source)
        storage.check()
        names, sums, rels = {}, {}, []
        for obj in storage.list():
            uri = storage.uri(obj.key)
            names[obj.key] = uri
            names.setdefault(Path(obj.key).name, uri)
            sums[uri] = f"s3:{obj.etag}:{obj.size}" if obj.etag else ""
            rels.append(obj.key)
        return names, sums, rels
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        names: dict[str, str] = {}
        ambiguous: set[str] = set()
        for ln in lines:  # by name (as before) and by each trailing path (cats/a.mp4 for a manifest's path)
            parts = ln.split("://", 1)[-1].split("/")
            for i in range(len(parts) - 1, 0, -1):
                key = "/".join(parts[i:])
                if key in names and names[key] != ln and i < len(parts) - 1:
                    ambiguous.add(key)
                names.setdefault(key, ln)
            names[parts[-1]] = ln  # a file name: the last listed wins, as before
        for key in ambiguous:  # two listed files end in the same path: it names neither
            del names[key]
        return names, {}, [Path(ln).name for ln in lines]
    if path.is_dir():
        base = str(path)
        rels = sorted(_walk_files(base), key=lambda r: r.split("/"))  # the order of sorted Paths
        names = {r: f"{base}/{r}" for r in rels}
        names.update({r: f"{base}/{r}" for r in rels if "/" not in r})  # directly under it: the name
        return names, {}, rels
    raise ValueError(f"source {source}: expected a directory, an s3:// prefix or a .txt file list")


SOURCES_CACHE_KEY = "sources-cache.json.gz"


class SourceCache:
    """The checksums of local source files, keyed by path and checked against the file's size, modification
    time (``mtime_ns``), inode number and status change time (``ctime_ns``): a file whose four are those
    recorded is not read again; a new file, or one where any of them changed, is hashed in full
    (``sha256_file``) and recorded. Size and mtime alone are what object stores use, but a program can set
    mtime: a file replaced by other bytes of the same size with its times preserved (``cp -p``, ``rsync -t``,
    ``tar x``, ``touch -r``) would keep its old checksum. ctime cannot be set (every write, ``utime``, rename
    sets it to now) and a replacement by rename is another inode. Entries written before (size, mtime and
    checksum only) never match: such a file is hashed once more. The file must also be as it was after it
    was hashed (all four) to be recorded. A same-size replacement with its mtime restored within the same
    ctime tick right after it was hashed could still go unseen. S3 sources need none of it (their listing's
    ETag and size are the checksum).

    Kept in the dataset root (``sources-cache.json.gz``, next to the indexes) so every host that runs the
    schedule shares it, and written under the lease at the end of a run, with the files this run saw (a
    source deleted since drops out). It is a cache: unreadable or missing, every file is hashed once more. A
    file modified less than ``RACY_S`` seconds before it was hashed is not recorded (a write in the same
    mtime tick could follow unseen); it is hashed again by the next run. It assumes, as the ingest config
    does, that one path names the same file on every host running the schedule (on a shared file system the
    inode and ctime are the server's; separate copies of the sources per host would be hashed again whenever
    the host changes)."""

    RACY_S = 2.0

    def __init__(self, files: dict[str, list] | None = None) -> None:
        self.old: dict[str, list] = files or {}  # path -> [size, mtime_ns, checksum, ino, ctime_ns], as loaded
        self.new: dict[str, list] = {}  # what this run saw
        self.hits = 0
        self.hashed = 0

    @classmethod
    def load(cls, storage: Storage) -> SourceCache:
        try:
            data = storage.get_bytes(SOURCES_CACHE_KEY)
        except ObjectMissingError:
            return cls()
        except StorageError as e:
            log.warning("%s: cannot read the source checksum cache (%s); local sources are hashed again",
                        storage.uri(SOURCES_CACHE_KEY), e)
            return cls()
        try:
            import gc
            import gzip

            gc.disable()  # a million small lists: the cyclic collector would rescan them while they are made
            try:
                doc = json.loads(gzip.decompress(data))
            finally:
                gc.enable()
            files = doc["files"]
            if doc.get("format") != 1 or not isinstance(files, dict):
                raise ValueError(f"format {doc.get('format')!r}")
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("%s: not a source checksum cache this pipeline can read (%s); ignored, local sources "
                        "are hashed again and the cache rewritten", storage.uri(SOURCES_CACHE_KEY), e)
            return cls()
        return cls(files)

    def checksum(self, path: str) -> str:
        st = os.stat(path)
        known = self.old.get(path)
        if (known is not None and len(known) == 5 and known[0] == st.st_size and known[1] == st.st_mtime_ns
                and known[3] == st.st_ino and known[4] == st.st_ctime_ns):
            self.new[path] = known
            self.hits += 1
            return known[2]
        started = time.time_ns()
        digest = sha256_file(path)
        self.hashed += 1
        after = os.stat(path)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        if (after.st_size, after.st_mtime_ns, after.st_ino, after.st_ctime_ns) == stamp \
                and st.st_mtime_ns < started - int(self.RACY_S * 1e9):
            self.new[path] = [st.st_size, st.st_mtime_ns, digest, st.st_ino, st.st_ctime_ns]
        return digest

    def save(self, storage: Storage) -> None:
        """Write the cache if this run's view differs from the loaded one; a failure is a warning (the next
        run hashes what it cannot look up)."""
        if self.new == self.old:
            return
        import gzip

        try:
            doc = json.dumps({"format": 1, "files": self.new}, separators=(",", ":")).encode()
            storage.put_bytes(SOURCES_CACHE_KEY, gzip.compress(doc, compresslevel=1, mtime=0))
        except StorageError as e:
            log.warning("could not write the source checksum cache: %s", e)


def _walk_files(base: str, prefix: str = ""):
    """Relative paths of the files under ``base`` (symbolic links to files included, linked folders not
    entered), hidden files and folders left out: ``os.scandir``, which knows most entries' types without a
    stat per file (a source of a million files is walked by every scheduled run)."""
    with os.scandir(base if not prefix else f"{base}/{prefix}") as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from _walk_files(base, f"{prefix}{entry.name}/")
            elif entry.is_file():
                yield f"{prefix}{entry.name}"


def _checksum(location: str, listed: dict[str, str], cache: SourceCache | None = None) -> str:
    if listed.get(location):
        return listed[location]  # S3: ETag + size change whenever the object does
    if location.startswith("s3://"):
        return "sha256:" + sha256_of(read_source(location))
    if cache is not None:
        return cache.checksum(location)  # size + mtime unchanged: the recorded checksum, no bytes read
    return sha256_file(location)


def resolve_sources(manifest: Manifest, source: str,
                    cache: SourceCache | None = None) -> tuple[list[Source], dict[str, dict[str, str]]]:
    """Each manifest entry's file and checksum; entries without a file go to the quarantine. With a
    ``cache``, a local file whose size and mtime are unchanged is not read (``SourceCache``)."""
    names, listed, _ = _source_index(source)
    sources, missing = [], {}
    for e in manifest.entries:
        location = next((names[n] for n in e.filenames if n in names), None)
        if location is None:
            tried = ", ".join(e.filenames)
            missing[e.video_id] = {"sha256": "", "reason": f"source file not found in {source} (tried {tried})",
                                   "kind": TRANSIENT}
            continue
        if not location.startswith("s3://") and not os.path.exists(location):
            missing[e.video_id] = {"sha256": "", "reason": f"{location}: listed but does not exist", "kind": TRANSIENT}
            continue
        try:
            checksum = with_retries(lambda loc=location: _checksum(loc, listed, cache))
        except (OSError, StorageError) as err:  # one unreadable source must not stop the run: retried next time
            reason = f"{location}: cannot read it for its checksum ({type(err).__name__}: {err})"
            missing[e.video_id] = {"sha256": "", "kind": TRANSIENT, "reason": reason}
            continue
        sources.append(Source(e, location, checksum))
    return sources, missing


# -- the lease -------------------------------------------------------------------------------------


def lease_clock() -> float:
    """The lease's clock, seconds since the epoch (a lease is read on other hosts). A seam for tests, which
    replace it (``monkeypatch.setattr(run, "lease_clock", ...)``) to move time by hand instead of sleeping."""
    return time.time()


def acquire_lease(storage: Storage, seconds: float) -> dict[str, Any]:
    """Take the dataset's lease (``lease.json``, created only if absent) for ``seconds``, or raise
    ``LeaseHeldError`` naming who holds it since when. A lease past its expiry, or taken on this host by a
    process that is gone, is removed (only if it is still the one that was read) and taken over. The
    returned dict carries the stored version for ``renew_lease`` and ``release_lease``."""
    now = lease_clock()
    lease = {"owner": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", "started": now,
             "expires": now + seconds}
    for _ in range(3):
        try:
            lease["version"] = storage.put_bytes(LEASE_KEY, _lease_doc(lease), if_absent=True)
            return lease
        except StorageError as e:
            if "already exists" not in str(e):
                raise
        try:
            data, version = storage.get_versioned(LEASE_KEY)
        except ObjectMissingError:
            continue  # released in between: try again
        held = _parse_lease(data, storage.uri(LEASE_KEY))
        if held.get("expires", 0) > lease_clock() and not _holder_is_dead(held):
            raise LeaseHeldError(
                f"skipped: another ingest run holds the dataset lease {storage.uri(LEASE_KEY)} since "
                f"{_when(held.get('started', 0))} ({held.get('owner')}; last renewed "
                f"{_when(held.get('renewed', held.get('started', 0)))}, expires {_when(held['expires'])}); this run "
                f"exits without changes (exit code 3). Delete the lease only if that run is dead.")
        log.warning("taking over the lease of %s (%s)", held.get("owner"),
                    "expired" if held.get("expires", 0) <= lease_clock() else "its process is gone")
        with contextlib.suppress(ObjectChangedError):  # changed meanwhile (renewed, taken): look again
            storage.delete(LEASE_KEY, if_match=version)
    raise LeaseHeldError(f"skipped: {storage.uri(LEASE_KEY)}: could not take the dataset lease (other runs are "
                         f"taking it at the same time); this run exits without changes (exit code 3)")


class LeaseHeldError(RuntimeError):
    """Another run holds the dataset's lease: this run is skipped (the CLI's exit code 3)."""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _lease_doc(lease: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in lease.items() if k != "version"}).encode()


def _parse_lease(data: bytes, where: str) -> dict[str, Any]:
    try:
        held = json.loads(data)
        float(held["expires"])
        return held
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{where}: not a lease this pipeline wrote ({data[:80]!r}); if no ingest is running, "
                         f"delete it") from None


def _holder_is_dead(held: dict[str, Any]) -> bool:
    """A lease taken on this host by a process that no longer exists (killed, crashed) is stale."""
    host, _, rest = str(held.get("owner", "")).partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host: only the expiry can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def renew_lease(storage: Storage, lease: dict[str, Any], seconds: float) -> None:
    """Push the lease's expiry to ``seconds`` from now, by a conditional write: only if the stored lease is
    still the version this run wrote. ``LeaseLostError`` when it is not (another run took it over after it
    expired, or someone deleted it): the caller must not commit."""
    now = lease_clock()
    renewed = {**lease, "renewed": now, "expires": now + seconds}
    try:
        version = storage.put_bytes(LEASE_KEY, _lease_doc(renewed), if_match=lease["version"])
    except ObjectChangedError:
        try:
            other = json.loads(storage.get_bytes(LEASE_KEY)).get("owner", "?")
            by = f"it is now held by {other}"
        except (StorageError, ValueError, AttributeError):
            by = "it was removed"
        raise LeaseLostError(f"{storage.uri(LEASE_KEY)}: this run ({lease['owner']}) lost the dataset lease, "
                             f"{by}; nothing is committed by this run (the shards it uploaded are reused by the "
                             f"next one)") from None
    lease.update(renewed, version=version)


class LeaseKeeper:
    """Renews a held lease every ``seconds / 3`` in a background thread while the run works, so a run longer
    than the lease keeps it (the lease still expires ``seconds`` after a run dies). A lease found taken over
    stops the renewals and is reported by ``confirm``, which the run calls (and which renews once more)
    right before it commits; a renewal that fails for a passing storage error is tried again at the next
    tick, and counts as lost once the lease has expired."""

    def __init__(self, storage: Storage, lease: dict[str, Any], seconds: float) -> None:
        import threading

        self.storage, self.lease, self.seconds = storage, lease, seconds
        self.lost: LeaseLostError | None = None
        self.renewals = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest-lease", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _renew(self) -> None:
        with self._lock:
            if self.lost is not None:
                raise self.lost
            try:
                renew_lease(self.storage, self.lease, self.seconds)
                self.renewals += 1
            except LeaseLostError as e:
                self.lost = e
                raise
            except StorageError as e:
                if lease_clock() >= self.lease["expires"]:
                    self.lost = LeaseLostError(f"{self.storage.uri(LEASE_KEY)}: the dataset lease expired before "
                                               f"it could be renewed ({e}); nothing is committed by this run")
                    raise self.lost from e
                raise

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self._renew()
            except LeaseLostError as e:
                log.error("%s", e)
                return
            except StorageError as e:
                log.warning("could not renew the dataset lease (tried again in %.0fs): %s", self.seconds / 3, e)

    def confirm(self) -> None:
        """Raise ``LeaseLostError`` unless this run still holds the lease (renewing it once more)."""
        self._renew()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def release_lease(storage: Storage, lease: dict[str, Any]) -> None:
    """Remove the lease if it is still this run's (a lease another run took over is left to that run)."""
    try:
        data, version = storage.get_versioned(LEASE_KEY)
        held = json.loads(data)
    except (StorageError, ValueError):
        return
    if isinstance(held, dict) and held.get("owner") == lease["owner"]:
        try:
            storage.delete(LEASE_KEY, if_match=version)
        except ObjectChangedError:
            pass  # taken over in between: that run's now
        except StorageError as e:  # a server without conditional DELETE: the lease was ours a moment ago
            log.warning("conditional delete of the lease refused (%s); deleting it unconditionally", e)
            storage.delete(LEASE_KEY)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class IngestResult:
    version: int | None  # the committed version; None when nothing changed or a dry run
    plan: dict[str, Any]
    videos_in: int = 0
    videos_out: int = 0
    failed: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    quarantine: dict[str, dict[str, str]] = field(default_factory=dict)
    message: str = ""
    mlflow_run_id: str | None = None
    transient: int = 0  # quarantined for a passing reason (read error, dead worker): retried by the next run


class IngestError(RuntimeError):
    """The run could not commit anything (every shard task failed): the message says why."""


class LeaseLostError(IngestError):
    """This run's lease was taken over (or could not be renewed before it expired): it commits nothing."""


def start_local_ray(**kwargs: Any) -> None:
    """``ray.init`` of a local Ray that listens on 127.0.0.1 only (GCS, raylet, workers, agents).

    Ray binds its node IP, and replaces 127.0.0.1 given as ``_node_ip_address`` by the host's routable
    address, unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; Ray reads that variable once, when it is
    imported, so setting it later (as this module once did) changes nothing. Set it before the import,
    correct Ray's copy if Ray was imported earlier, and refuse to run if the node still is not loopback.
    """
    saved_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # also for the processes the node starts
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray._private import ray_constants  # no public switch: the value Ray read at import time

    saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **kwargs)
    finally:  # a later ray.init(address=<cluster>) in this process must advertise a reachable address again
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env
    ip = ray.util.get_node_ip_address()
    if ip not in ("127.0.0.1", "::1"):
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {ip}, not 127.0.0.1: refusing to run it on a reachable "
                           "interface (give --ray-address for a cluster)")


def build_shard_task(*args: Any) -> dict[str, Any]:
    """``build_shard`` as a Ray task; its stats say where Ray ran it (``ray_node``): the node id Ray gives the
    executing worker, that node's labels (``slurm_node`` under infra/slurm/ray-cluster.sbatch), host and pid.
    Ray's own record, per shard, at no cost: a multi-node run shows where its work went (reports/v*-tasks.json)."""
    import ray

    result = build_shard(*args)
    ctx = ray.get_runtime_context()
    labels = {k: v for k, v in ctx.get_node_labels().items() if not k.startswith("ray.io/")}
    result["stats"]["ray_node"] = {"node_id": ctx.get_node_id(), "labels": labels, "host": socket.gethostname(),
                                   "pid": os.getpid()}
    return result


def task_report(built: list[dict[str, Any]]) -> dict[str, Any]:
    """Where each built shard ran (from its task's ``ray_node``) and how many shards each Ray node built;
    shards whose task failed after Ray's retries are listed apart."""
    shards, per_node, failed = {}, {}, []
    for r in built:
        if r["stats"].get("task_failed"):
            failed.extend(sorted(r["quarantine"]))
            continue
        where = r["stats"].get("ray_node") or {"node_id": "", "labels": {}}  # none: built outside Ray
        name = where["labels"].get("slurm_node") or where["node_id"][:12] or "unknown"
        per_node[name] = per_node.get(name, 0) + 1
        if r["shard"] is not None:
            shards[r["shard"].url] = {"videos": r["shard"].samples, "reused": bool(r["stats"].get("reused")), **where}
    return {"shards_per_node": per_node, "shards": shards, "videos_of_failed_tasks": failed}


def _build_all(plan: Plan, cfg: IngestConfig, ray_address: str | None, progress: bool) -> list[dict[str, Any]]:
    """Every planned shard, on Ray. A shard task that fails after Ray's retries (a worker killed each time,
    an upload that keeps failing) becomes a result with its videos quarantined as transient; the run
    commits the other shards and the next run plans those videos again."""
    import ray
    from tqdm import tqdm

    started_here = not ray.is_initialized()
    if started_here:
        address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":
            start_local_ray()
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        # a worker that dies is retried by Ray; so is a task that hit a storage error (network, throttling)
        task = ray.remote(max_retries=3, retry_exceptions=[StorageError])(build_shard_task)
        limit = cfg.max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
        limits = cfg.decode_limits()
        todo, running, results = list(plan.build), {}, []
        bar = tqdm(total=len(todo), unit="shard", desc="ingest", disable=not progress)
        lines = None if progress else ProgressLines(log, "ingest", len(todo), "shards")  # a log, not a terminal
        videos = 0
        while todo or running:
            while todo and len(running) < limit:
                p = todo.pop(0)
                running[task.remote(p, cfg.output, cfg.dataset, cfg.transcode, limits)] = p
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                shard = running.pop(ref)
                videos += len(shard.sources)
                try:
                    results.append(ray.get(ref))
                except Exception as err:  # RayTaskError, WorkerCrashedError, ...: after Ray's own retries
                    log.warning("shard %s failed; its %d video(s) are retried by the next run: %s", shard.url,
                                len(shard.sources), (str(err).strip().splitlines() or [""])[-1])
                    results.append(shard_failure(shard, err))
            bar.update(len(done))
            if lines is not None:
                lines.update(len(done), f"{videos} videos")
        bar.close()
        if results:
            log.info("ingest: shards per Ray node: %s", task_report(results)["shards_per_node"])
        return results
    finally:
        if started_here:
            ray.shutdown()


def log_to_mlflow(cfg: IngestConfig, result: IngestResult, tracking_uri: str) -> str | None:
    """Params, metrics and the quarantine report of a committed ingest, as an MLflow run in the experiment
    ``ingest/<dataset>``, set up as a training run's is (``pipeline.tracking.sink``): a client that fails
    fast, credentials from the environment, and with an sqlite store the artifacts in ``mlartifacts/``
    next to the database, not in ``./mlruns``. An unreachable tracking server is a warning, never an
    ingest failure."""
    from pipeline.secrets import redact, redact_text
    from pipeline.tracking.sink import experiment_id, mlflow_client

    try:
        from mlflow.entities import Metric, Param

        client = mlflow_client(tracking_uri)
        exp = experiment_id(client, tracking_uri, f"ingest/{cfg.dataset}")
        run = client.create_run(exp, run_name=f"{cfg.dataset}-v{result.version}",
                                tags={"kind": "ingest", "dataset": cfg.dataset, "version": str(result.version)})
        run_id = run.info.run_id
        params = redact({"dataset": cfg.dataset, "version": result.version, "output": cfg.output,
                         "samples_per_shard": cfg.samples_per_shard,
                         **{f"transcode.{k}": v for k, v in asdict(cfg.transcode).items()},
                         **{f"limits.{k}": v for k, v in asdict(cfg.limits).items()}})
        metrics = {"videos_in": result.videos_in, "videos_out": result.videos_out, "videos_failed": result.failed,
                   "videos_transient": result.transient, "bytes_in": result.bytes_in, "seconds": result.seconds,
                   "videos_per_s": result.videos_in / result.seconds if result.seconds else 0.0,
                   **{f"plan.{k}": v for k, v in result.plan.items()}}
        now = int(time.time() * 1000)
        try:
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                             params=[Param(k, str(v)[:6000]) for k, v in params.items()])
            client.log_dict(run_id, result.quarantine, "quarantine.json")
        except Exception:
            with contextlib.suppress(Exception):  # not left RUNNING for ever; the first error is the one to report
                client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        return run_id
    except Exception as e:  # tracking must not undo a committed dataset version
        log.warning("could not log the ingest to MLflow at %s: %s", redact_text(tracking_uri), redact_text(str(e)))
        return None


def assemble_index(dataset: str, manifest: Manifest, preprocessing: dict[str, Any], limits: DecodeLimits,
                   sources: list[Source], missing: dict[str, dict[str, str]], last: DatasetIndex | None, plan: Plan,
                   built: list[dict[str, Any]]) -> DatasetIndex:
    """The next version's index (not yet committed): the kept shards (with their tombstones) and the shards
    the tasks made (transcoded or copied), the checksums and entry digests of the videos they hold, and the
    quarantine: this run's failures and missing sources, plus the last version's content failures that were
    not retried. A video is live in at most one shard and never both in a shard and in the quarantine.

    A copy shard whose task failed (compaction: its old shard was to leave the index) does not cost its
    survivors: the old shards it copies from that are not kept anyway go back into the index with those
    survivors live (every other member tombstoned, as planned), and the next run plans the copy again. A
    relabelled video it held stays out (quarantined as transient: its old sample has the old labels), and so
    does every video of a copy that failed because an old shard is not what its index entry says (a
    ``ShardError``: damaged or replaced since; the next run transcodes them from their sources)."""
    quarantine = dict(missing)
    if last is not None:  # content failures of unchanged sources that were not retried stay quarantined
        by_id = {s.entry.video_id: s for s in sources}
        planned = {s.entry.video_id for p in plan.build for s in p.sources}
        quarantine.update({k: q for k, q in last.quarantine.items() if k in by_id and k not in planned
                           and is_permanent(q, by_id[k].sha256, limits)})
    shards = list(plan.keep)
    planned_shards = {p.url: p for p in plan.build}
    restore: dict[str, tuple[ShardInfo, set[str]]] = {}  # old shards of failed copies -> survivors to put back
    relabelled = set(plan.relabelled)
    for r in built:
        quarantine.update(r["quarantine"])
        if r["shard"] is not None:
            shards.append(r["shard"])
        elif (r["stats"].get("task_failed") and not r["stats"].get("shard_error")
              and (failed := planned_shards.get(r.get("url", ""))) is not None):
            for old, keys in failed.copy_from:
                restore.setdefault(old.url, (old, set()))[1].update(k for k in keys if k not in relabelled)
    kept_urls = {s.url for s in shards}
    for url, (old, alive) in restore.items():
        if url not in kept_urls and alive:
            shards.append(replace(old, dropped=[k for k in old.keys if k not in alive]))
            log.warning("the copy of %s failed: it stays in the index with its %d survivor(s); the next run "
                        "copies them again", url, len(alive))
    live = [k for s in shards for k in s.live_keys()]
    in_shards = set(live)
    if len(in_shards) != len(live):  # a planning bug: a video would be trained on twice
        seen: set[str] = set()
        twice = sorted({k for k in live if k in seen or seen.add(k)})[:5]
        raise IngestError(f"videos {twice} would be live in two shards of the next version; nothing committed")
    quarantine = {k: q for k, q in quarantine.items() if k not in in_shards}  # never both
    checksums = {s.entry.video_id: s.sha256 for s in sources if s.entry.video_id in in_shards}
    digests = {k: plan.entry_digests.get(k) or entry_digest(s.entry) for s in sources
               if (k := s.entry.video_id) in in_shards}
    if last is not None:  # held as they were (source missing now): their checksums and digests as they were
        for k in plan.held:
            if k in in_shards:
                if k in last.source_checksums:
                    checksums[k] = last.source_checksums[k]
                if k in last.entry_digests:
                    digests[k] = last.entry_digests[k]
                else:
                    digests.pop(k, None)
    version = (last.version + 1) if last is not None else 1
    return DatasetIndex(dataset, version, manifest.classes, preprocessing, shards, source_checksums=checksums,
                        quarantine=quarantine, decode_limits=asdict(limits), multi_label=manifest.multi_label,
                        entry_digests=digests)


def check_removals(last: DatasetIndex | None, plan: Plan, max_fraction: float) -> str | None:
    """Why this plan must not be committed, or None: it removes more than ``max_fraction`` of the last
    version's live videos (their entries are gone from the manifest: annotations, or a folder dataset's
    listing), which is what a source cut short by mistake looks like (a folder half mounted, a manifest
    truncated). Sources that are only missing (still listed) are held, not removed, and do not count."""
    if last is None or not plan.removed:
        return None
    total = last.num_samples()
    if not total or len(plan.removed) <= max_fraction * total:
        return None
    shown = ", ".join(plan.removed[:5]) + (", ..." if len(plan.removed) > 5 else "")
    return (f"refusing to commit: this run would remove {len(plan.removed)} of the {total} videos of version "
            f"{last.version} ({len(plan.removed) / total:.0%} > max_removed_fraction={max_fraction:g}): {shown}; "
            f"they are no longer in the manifest (the annotations, or a folder dataset's listing). If the "
            f"source is only unavailable or cut short, fix it and run again; if the deletion is intended, run "
            f"with max_removed_fraction=1 (or set it in the ingest config). Nothing was changed (exit code 2)")


class RemovalRefusedError(ValueError):
    """The plan removes more of the last version than ``max_removed_fraction`` allows (the CLI's exit code 2,
    bad input: a source or manifest that is cut short); nothing is built or committed."""


def run_ingest(cfg: IngestConfig, *, ray_address: str | None = None, dry_run: bool = False,
               progress: bool = True, tracking_uri: str | None = None) -> IngestResult:
    t0 = time.time()
    validate_ingest(cfg)  # a config built in code is checked as strictly as a loaded one
    limits = cfg.decode_limits()
    storage = open_storage(cfg.output)
    storage.check()
    manifest = read_manifest(cfg)
    checksum_cache = SourceCache.load(storage)  # checksums of unchanged local sources: not read again
    sources, missing = resolve_sources(manifest, cfg.source, checksum_cache)
    preprocessing = {"transcode": asdict(cfg.transcode)}

    def plan_now() -> tuple[DatasetIndex | None, Plan]:
        last = load_index(cfg.output)[0] if index_versions(storage) else None
        return last, make_plan(sources, preprocessing, cfg.samples_per_shard, last, limits=limits,
                               labels=(manifest.classes, manifest.multi_label), compact_below=cfg.compact_below,
                               missing=missing)

    if dry_run:
        last, plan = plan_now()
        refused = check_removals(last, plan, cfg.max_removed_fraction)
        return IngestResult(None, plan.summary(), videos_in=len(manifest.entries),
                            message=f"dry run: {plan.summary()}; {len(missing)} source file(s) missing"
                                    + (f"; a run would be refused: {refused}" if refused else ""))
    lease = acquire_lease(storage, cfg.lease_seconds)
    keeper = LeaseKeeper(storage, lease, cfg.lease_seconds).start()  # renewed while the run works
    result = IngestResult(None, {}, videos_in=len(manifest.entries))
    try:
        last, plan = plan_now()  # under the lease: no other run can commit in between
        result.plan = plan.summary()
        if plan.held:
            log.warning("%d video(s) of version %d are listed but their source is missing or unreadable now "
                        "(e.g. %s): kept as they were, not deleted", len(plan.held), last.version,
                        ", ".join(plan.held[:5]))
        refused = check_removals(last, plan, cfg.max_removed_fraction)
        if refused:
            raise RemovalRefusedError(refused)
        held = set(plan.held)
        new_missing = {k: v for k, v in missing.items()
                       if k not in held and (last is None or k not in last.quarantine)}
        if plan.is_noop and not new_missing:
            result.message = (f"nothing to do: version {last.version} is up to date ({last.num_samples()} videos)"
                              if last is not None else "nothing to do: the manifest lists no videos")
            if plan.held:
                result.message += (f"; {len(plan.held)} listed video(s) whose source is missing now are kept "
                                   f"as they were")
            return result
        built = _build_all(plan, cfg, ray_address, progress)
        failed_tasks = [r for r in built if r["stats"].get("task_failed")]
        if failed_tasks and len(failed_tasks) == len(built):
            first = next(iter(failed_tasks[0]["quarantine"].values()))["reason"]
            raise IngestError(f"every shard task failed ({len(built)}), nothing to commit; the first: {first}")
        index = assemble_index(cfg.dataset, manifest, preprocessing, limits, sources, missing, last, plan, built)
        result.bytes_in += sum(r["stats"]["bytes_in"] for r in built)
        shards, quarantine, version = index.shards, index.quarantine, index.version
        keeper.confirm()  # never commit under another run's lease
        commit_index(storage, index)  # last: readers see the new version only now
        storage.put_bytes(f"reports/v{version:06d}-quarantine.json", json.dumps(quarantine, indent=1).encode())
        storage.put_bytes(f"reports/v{version:06d}-tasks.json", json.dumps(task_report(built), indent=1).encode())
        result.version, result.quarantine = version, quarantine
        result.videos_out, result.failed = index.num_samples(), len(quarantine)
        result.transient = sum(1 for q in quarantine.values() if q.get("kind") == TRANSIENT)
        result.message = (f"committed {storage.uri(index_key(version))}: {result.videos_out} videos in {len(shards)} "
                          f"shards ({len(plan.keep)} kept, {len(plan.compacted)} compacted), "
                          f"{len(quarantine)} quarantined")
        if plan.held:
            result.message += f"; {len(plan.held)} listed video(s) whose source is missing now kept as they were"
        if result.transient:
            result.message += (f" ({result.transient} for a passing reason: the next run tries them again; "
                               f"see reports/v{version:06d}-quarantine.json)")
        return result
    finally:
        keeper.stop()
        if keeper.lost is None:
            checksum_cache.save(storage)
        release_lease(storage, lease)
        result.seconds = time.time() - t0
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if tracking_uri and result.version is not None:
            result.mlflow_run_id = log_to_mlflow(cfg, result, tracking_uri)


__all__ = ["ConfigError", "IngestConfig", "IngestError", "IngestResult", "LeaseHeldError", "RemovalRefusedError",
           "run_ingest",
           "start_local_ray", "ShardError", "validate_ingest"]
