"""Change detection of local sources by size and modification time: a scheduled run with nothing new reads no
source bytes (the hash function is counted), a new or changed file is hashed (and only it), a touched file with
the same bytes is hashed again but not rebuilt, and the checksum cache in the dataset root is shared, pruned,
and never trusted for a file written while it was hashed.

Shards are built in this process (run_ingest with Ray replaced by a serial loop over build_shard); the videos
are real H.264 files encoded here."""

from __future__ import annotations

import gzip
import json
import os
import time

import pytest

from pipeline.data.storage import open_storage
from pipeline.data.video import encode_video
from pipeline.ingest import run as ingest_run
from pipeline.ingest.run import SOURCES_CACHE_KEY, IngestConfig, SourceCache, _checksum, run_ingest
from pipeline.ingest.worker import build_shard, sha256_file

from .test_video import numbered_frames

PAST = time.time() - 3600  # sources written an hour ago (not "racily" recent)


@pytest.fixture
def serial(monkeypatch):
    def build_all(plan, cfg, ray_address, progress):
        return [build_shard(p, cfg.output, cfg.dataset, cfg.transcode, cfg.decode_limits()) for p in plan.build]

    monkeypatch.setattr(ingest_run, "_build_all", build_all)


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Every file the run hashes in full (the only place it reads a local source's bytes before the build)."""
    calls: list[str] = []

    def counting(path):
        calls.append(os.path.basename(path))
        return sha256_file(path)

    monkeypatch.setattr(ingest_run, "sha256_file", counting)
    return calls


def add_video(root, name: str, frames: int = 6, mtime: float | None = PAST) -> None:
    path = root / "videos" / "walk" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_video(numbered_frames(frames, 32, 48), fps=10))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def config(root) -> IngestConfig:
    return IngestConfig.load(None, ["dataset=mine", "format=folder", f"source={root / 'videos'}",
                                    f"output={root / 'out'}", "samples_per_shard=4", "transcode.short_side=32",
                                    "transcode.fps=10", "transcode.keyframe_interval=4", "transcode.min_frames=1"])


def cached(cfg) -> dict:
    return json.loads(gzip.decompress(open_storage(cfg.output).get_bytes(SOURCES_CACHE_KEY)))["files"]


def test_a_noop_run_reads_no_source_bytes_and_only_new_or_changed_files_are_hashed(tmp_path, serial, hashed):
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        add_video(tmp_path, name)
    cfg = config(tmp_path)
    assert run_ingest(cfg, progress=False).version == 1
    assert sorted(hashed) == ["a.mp4", "b.mp4", "c.mp4"]
    assert sorted(os.path.basename(p) for p in cached(cfg)) == ["a.mp4", "b.mp4", "c.mp4"]

    hashed.clear()
    noop = run_ingest(cfg, progress=False)
    assert noop.version is None and noop.message.startswith("nothing to do")
    assert hashed == []  # no source read: sizes and mtimes matched the cache

    add_video(tmp_path, "d.mp4")  # new
    add_video(tmp_path, "b.mp4", frames=9)  # changed: other bytes, other size
    os.utime(tmp_path / "videos" / "walk" / "c.mp4", (PAST + 60, PAST + 60))  # touched: same bytes
    (tmp_path / "videos" / "walk" / "a.mp4").unlink()  # deleted
    hashed.clear()
    second = run_ingest(cfg, progress=False)
    assert sorted(hashed) == ["b.mp4", "c.mp4", "d.mp4"]
    assert second.version == 2 and second.plan["build_videos"] == 2  # b and d; c's checksum did not change
    assert sorted(os.path.basename(p) for p in cached(cfg)) == ["b.mp4", "c.mp4", "d.mp4"]  # a pruned

    hashed.clear()
    assert run_ingest(cfg, progress=False).version is None and hashed == []


def test_a_file_written_just_before_it_was_hashed_is_hashed_again_next_time(tmp_path, serial, hashed):
    add_video(tmp_path, "a.mp4")
    add_video(tmp_path, "fresh.mp4", mtime=None)  # mtime now: a write in the same tick could follow unseen
    cfg = config(tmp_path)
    run_ingest(cfg, progress=False)
    assert [os.path.basename(p) for p in cached(cfg)] == ["a.mp4"]
    hashed.clear()
    assert run_ingest(cfg, progress=False).version is None
    assert hashed == ["fresh.mp4"]


def test_an_unreadable_cache_is_ignored_and_rewritten(tmp_path, serial, hashed, caplog):
    add_video(tmp_path, "a.mp4")
    cfg = config(tmp_path)
    run_ingest(cfg, progress=False)
    open_storage(cfg.output).put_bytes(SOURCES_CACHE_KEY, b"not gzip")
    hashed.clear()
    assert run_ingest(cfg, progress=False).version is None  # the same checksum: nothing to rebuild
    assert hashed == ["a.mp4"] and "not a source checksum cache this pipeline can read" in caplog.text
    assert len(cached(cfg)) == 1


def test_the_cache_is_shared_through_the_dataset_root(tmp_path, hashed):
    add_video(tmp_path, "a.mp4")
    path = str(tmp_path / "videos" / "walk" / "a.mp4")
    storage = open_storage(tmp_path / "out")
    first = SourceCache.load(storage)  # one host
    digest = first.checksum(path)
    first.save(storage)
    other = SourceCache.load(open_storage(tmp_path / "out"))  # another host, the same dataset root
    assert other.checksum(path) == digest == sha256_file(path) and (other.hits, other.hashed) == (1, 0)
    assert hashed == ["a.mp4"]


def test_s3_sources_keep_their_listing_checksum(tmp_path, hashed):
    cache = SourceCache()
    uri = "s3://bucket/videos/a.mp4"
    assert _checksum(uri, {uri: "s3:etag:123"}, cache) == "s3:etag:123"
    assert hashed == [] and cache.new == {}


def rewrite_keeping_times(path, data: bytes, before: os.stat_result) -> None:
    """Other bytes of the same size, written in place with the old mtime restored (``cp -p``, ``touch -r``);
    repeated until the file system's ctime tick moved on (a few milliseconds), which no program can prevent."""
    for _ in range(200):
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if os.stat(path).st_ctime_ns != before.st_ctime_ns:
            return
        time.sleep(0.01)
    raise AssertionError("the file's ctime never changed")


def test_a_same_size_replacement_with_its_times_restored_is_hashed_again(tmp_path, hashed):
    path = tmp_path / "a.mp4"
    path.write_bytes(b"A" * 1000)
    os.utime(path, (PAST, PAST))
    first = SourceCache()
    assert first.checksum(str(path)) == sha256_file(path)
    before = os.stat(path)
    # in place (the same inode), other bytes of the same size, mtime restored: only the ctime tells
    rewrite_keeping_times(path, b"B" * 1000, before)
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    second = SourceCache(first.new)
    assert second.checksum(str(path)) == sha256_file(path) and (second.hits, second.hashed) == (0, 1)
    # replaced by rename (rsync -t: a new file moved over the old one): another inode
    other = tmp_path / "tmp.mp4"
    other.write_bytes(b"C" * 1000)
    os.utime(other, (PAST, PAST))
    os.replace(other, path)
    third = SourceCache(second.new)
    assert third.checksum(str(path)) == sha256_file(path) and (third.hits, third.hashed) == (0, 1)
    # unchanged: a hit, no bytes read
    fourth = SourceCache(third.new)
    assert fourth.checksum(str(path)) == sha256_file(path) and (fourth.hits, fourth.hashed) == (1, 0)


def test_a_cache_entry_written_before_inode_and_ctime_is_hashed_once_more(tmp_path, hashed):
    path = tmp_path / "a.mp4"
    path.write_bytes(b"A" * 1000)
    os.utime(path, (PAST, PAST))
    st = os.stat(path)
    stale = SourceCache({str(path): [st.st_size, st.st_mtime_ns, "0" * 64]})  # the old format: 3 fields
    assert stale.checksum(str(path)) == sha256_file(path) and stale.hashed == 1
    assert stale.new[str(path)][3:] == [st.st_ino, st.st_ctime_ns]
    again = SourceCache(stale.new)
    assert again.checksum(str(path)) == sha256_file(path) and (again.hits, again.hashed) == (1, 0)
