"""Ingest never loses good videos: any failure of one video is quarantined with its reason and the shard
goes on; content failures stay until the file (or the limit that refused it) changes; transient ones are
retried in the run (reads) and by the next run; the ingest config is checked like a training recipe.

Shards are built in this process (build_shard, or run_ingest with Ray replaced by a serial loop over the
same build_shard); the real-Ray runs are in tests/integration/test_ingest.py."""

from __future__ import annotations

import dataclasses
import errno
import io
import json

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.data.datasets import ManifestEntry
from pipeline.data.shards import DatasetIndex, ShardInfo, load_index, read_shard, verify_shard
from pipeline.data.storage import StorageError, open_storage
from pipeline.data.video import DecodeLimits, decode_frames, encode_video
from pipeline.ingest import run as ingest_run
from pipeline.ingest import worker
from pipeline.ingest.plan import Source, is_permanent, make_plan, shard_name
from pipeline.ingest.run import IngestConfig, IngestError, run_ingest
from pipeline.ingest.worker import READ_ATTEMPTS, TranscodeConfig, build_shard, shard_failure

from .test_video import frame_numbers, numbered_frames

CFG = TranscodeConfig(short_side=32, fps=10, keyframe_interval=4, min_frames=1)
_real_read_source = worker.read_source


def good_video(n: int = 10) -> bytes:
    return encode_video(numbered_frames(n, 32, 48), fps=10)  # n / 10 seconds


def thin_video() -> bytes:
    """2x2048: at short side 32 it scales to 32x32768, which libx264 refuses to open (av.error.ExternalError);
    at short side 256, to 256x262144 (67 Mpx), over the pixel limit."""
    return encode_video(np.zeros((3, 2048, 2, 3), np.uint8), fps=10, codec="mpeg4", container="avi")


def png_bytes() -> bytes:
    import av
    from av.video.frame import VideoFrame

    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "rgb24"
        frame = VideoFrame.from_ndarray(numbered_frames(4, 32, 48)[3], format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    return buf.getvalue()


def shard_plan(tmp_path, videos: dict[str, bytes]) -> tuple[worker.ShardPlan, dict[str, str]]:
    """Files for ``videos`` (id -> bytes) and one shard plan holding them all; also id -> path."""
    (tmp_path / "src").mkdir(exist_ok=True)
    sources, paths = [], {}
    for vid, data in videos.items():
        path = tmp_path / "src" / f"{vid}.mp4"
        path.write_bytes(data)
        paths[vid] = str(path)
        sources.append(Source(ManifestEntry(vid, (path.name,), 0, "c", "train", 0.0, 1.0), str(path), f"sha-{vid}"))
    return worker.ShardPlan(shard_name(sources, {}), "train", sources), paths


def stored_keys(output, shard) -> list[str]:
    storage = open_storage(output)
    return [s.key for s in read_shard(io.BytesIO(storage.get_bytes(shard.url)))]


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(worker, "READ_BACKOFF_S", 0.0)


# -- one bad video in a shard --------------------------------------------------------------------


def test_six_good_videos_and_one_the_encoder_refuses_make_a_shard_of_six(tmp_path):
    videos = {f"good{i}": good_video() for i in range(6)} | {"thin": thin_video()}
    plan, paths = shard_plan(tmp_path, videos)
    out = tmp_path / "out"
    result = build_shard(plan, str(out), "d", CFG)  # used to raise ExternalError out of the whole shard
    good = sorted(k for k in videos if k != "thin")
    assert sorted(result["shard"].keys) == good == sorted(stored_keys(out, result["shard"]))
    q = result["quarantine"]["thin"]
    assert set(result["quarantine"]) == {"thin"} and q["kind"] == "content" and q["sha256"] == "sha-thin"
    assert q["reason"].startswith(f"{paths['thin']}: the libx264 encoder refused the 32x32768 output")
    assert "limit" not in q

    # at the usual short side the pixel limit refuses it first, before anything is encoded
    (out / plan.url).unlink()
    limited = build_shard(plan, str(out), "d", TranscodeConfig(short_side=256, fps=10, min_frames=1))
    assert sorted(limited["shard"].keys) == good
    q = limited["quarantine"]["thin"]
    assert q["kind"] == "content" and q["limit"] == "max_pixels" and q["limit_value"] == "16777216"
    assert q["reason"].startswith(f"{paths['thin']}: 2x2048 scales to 256x262144 at short_side=256, over the "
                                  "decode limit max_pixels")


@pytest.mark.parametrize("error,kind", [
    (lambda: __import__("av").error.ExternalError(542398533, "Generic error in an external library"), "content"),
    (lambda: __import__("av").error.InvalidDataError(1094995529, "Invalid data found"), "content"),
    (lambda: RuntimeError("a bug in our code"), "transient"),
    (lambda: MemoryError(), "transient"),
])
def test_any_exception_of_one_video_is_quarantined_with_the_file_named(tmp_path, monkeypatch, error, kind):
    plan, paths = shard_plan(tmp_path, {"a": good_video(), "b": good_video(), "c": good_video()})
    real = worker.transcode

    def transcode(data, name, *args, **kwargs):
        if name == paths["b"]:
            raise error()
        return real(data, name, *args, **kwargs)

    monkeypatch.setattr(worker, "transcode", transcode)
    result = build_shard(plan, str(tmp_path / "out"), "d", CFG)
    assert sorted(result["shard"].keys) == ["a", "c"]
    q = result["quarantine"]["b"]
    assert q["kind"] == kind and q["reason"].startswith(f"{paths['b']}: ") and q["sha256"] == "sha-b"


# -- transient failures ------------------------------------------------------------------------


def flaky_reads(monkeypatch, failing: dict[str, int], exc=lambda: OSError(errno.EIO, "Input/output error")):
    """Make read_source fail ``failing[path]`` times for each path (-1: always); returns the call counts."""
    calls: dict[str, int] = {}
    real = worker.read_source

    def read_source(location: str) -> bytes:
        calls[location] = calls.get(location, 0) + 1
        left = failing.get(location, 0)
        if left:
            failing[location] = left - 1 if left > 0 else left
            raise exc()
        return real(location)

    monkeypatch.setattr(worker, "read_source", read_source)
    return calls


def test_a_one_off_read_error_is_retried_within_the_run(tmp_path, monkeypatch):
    plan, paths = shard_plan(tmp_path, {"a": good_video(), "b": good_video()})
    calls = flaky_reads(monkeypatch, {paths["b"]: 1})
    result = build_shard(plan, str(tmp_path / "out"), "d", CFG)
    assert sorted(result["shard"].keys) == ["a", "b"] and not result["quarantine"]
    assert calls[paths["b"]] == 2


@pytest.mark.parametrize("exc,attempts", [
    (lambda: OSError(errno.EIO, "Input/output error"), READ_ATTEMPTS),
    (lambda: StorageError("s3://b/k: connection reset after 8 attempts"), READ_ATTEMPTS),
    (lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), READ_ATTEMPTS),
    (lambda: PermissionError(errno.EACCES, "Permission denied"), 1),  # retrying now would not help
])
def test_a_read_that_keeps_failing_is_quarantined_as_transient(tmp_path, monkeypatch, exc, attempts):
    plan, paths = shard_plan(tmp_path, {"a": good_video(), "b": good_video()})
    calls = flaky_reads(monkeypatch, {paths["b"]: -1}, exc)
    result = build_shard(plan, str(tmp_path / "out"), "d", CFG)
    assert result["shard"].keys == ["a"] and calls[paths["b"]] == attempts
    q = result["quarantine"]["b"]
    assert q["kind"] == "transient" and q["reason"].startswith(f"{paths['b']}: {type(exc()).__name__}")


def kinetics(root, videos: dict[str, bytes], *extra: str) -> IngestConfig:
    """A Kinetics-format source tree (one file per id, 1 s clips) and its ingest config."""
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rows = ["label,youtube_id,time_start,time_end,split"]
    for i, (yid, data) in enumerate(videos.items()):
        (root / "videos" / f"{yid}.mp4").write_bytes(data)
        rows.append(f"c{i % 2},{yid},0,1,train")
    (root / "ann.csv").write_text("\n".join(rows) + "\n")
    return config(root, *extra)


def config(root, *extra: str) -> IngestConfig:
    return IngestConfig.load(None, ["dataset=d", "format=kinetics", f"annotations={root / 'ann.csv'}",
                                    f"source={root / 'videos'}", f"output={root / 'out'}", "samples_per_shard=4",
                                    "transcode.short_side=32", "transcode.fps=10", "transcode.keyframe_interval=4",
                                    "transcode.min_frames=1", *extra])


def vid(yid: str) -> str:
    return f"{yid}_000000_000001"


@pytest.fixture
def serial(monkeypatch):
    """run_ingest with its Ray fan-out replaced by the same build_shard calls in this process."""
    def build_all(plan, cfg, ray_address, progress):
        return [build_shard(p, cfg.output, cfg.dataset, cfg.transcode, cfg.decode_limits()) for p in plan.build]

    monkeypatch.setattr(ingest_run, "_build_all", build_all)


def test_a_transient_failure_is_ingested_by_the_next_run(tmp_path, monkeypatch, serial):
    cfg = kinetics(tmp_path, {f"v{i}": good_video() for i in range(5)})
    path = str(tmp_path / "videos" / "v3.mp4")
    calls = flaky_reads(monkeypatch, {path: -1})
    first = run_ingest(cfg, progress=False)
    assert first.version == 1 and first.videos_out == 4 and calls[path] == READ_ATTEMPTS
    assert first.transient == 1 and first.quarantine[vid("v3")]["kind"] == "transient"
    assert "next run tries them again" in first.message
    report = json.loads(open_storage(cfg.output).get_bytes("reports/v000001-quarantine.json"))
    assert report[vid("v3")]["reason"].startswith(f"{path}: OSError: [Errno 5]")

    monkeypatch.setattr(worker, "read_source", _real_read_source)  # the storage has recovered
    assert run_ingest(cfg, dry_run=True, progress=False).plan["build_videos"] == 1  # only v3, nothing else
    second = run_ingest(cfg, progress=False)
    assert second.version == 2 and second.videos_out == 5 and not second.quarantine
    index, storage = load_index(cfg.output)
    assert vid("v3") in {k for s in index.shards for k in s.keys} and not index.quarantine
    assert index.decode_limits == dataclasses.asdict(cfg.decode_limits())  # the readers decode with the same
    for shard in index.shards:
        verify_shard(storage, shard)


def test_content_failures_stay_until_the_file_or_the_limit_changes(tmp_path, serial):
    truncated = good_video(30)[:700]
    cfg = kinetics(tmp_path, {"ok": good_video(), "cut": truncated, "still": png_bytes()})
    first = run_ingest(cfg, progress=False)
    assert first.videos_out == 1 and {k: q["kind"] for k, q in first.quarantine.items()} == {
        vid("cut"): "content", vid("still"): "content"}
    assert first.quarantine[vid("still")]["limit"] == "allow_images"

    again = run_ingest(cfg, progress=False)  # nothing changed: not retried
    assert again.version is None and "nothing to do" in again.message
    other_limit = config(tmp_path, "limits.max_seconds=7200")  # a limit that refused neither
    assert run_ingest(other_limit, dry_run=True, progress=False).plan["build_videos"] == 0

    images = config(tmp_path, "limits.allow_images=true")  # the limit that refused the PNG changed
    assert run_ingest(images, dry_run=True, progress=False).plan["build_videos"] == 1
    third = run_ingest(images, progress=False)
    assert third.version == 2 and set(third.quarantine) == {vid("cut")}  # the PNG is in, as one frame

    (tmp_path / "videos" / "cut.mp4").write_bytes(good_video())  # the source was fixed: a new checksum
    fourth = run_ingest(images, progress=False)
    assert fourth.version == 3 and fourth.videos_out == 3 and not fourth.quarantine
    index, storage = load_index(cfg.output)
    sample = next(s for sh in index.shards for s in read_shard(io.BytesIO(storage.get_bytes(sh.url)))
                  if s.key == vid("cut"))
    assert frame_numbers(decode_frames(sample.video, [0.0, 0.55]).frames) == [0, 5]


def test_a_shard_task_that_fails_leaves_its_videos_to_the_next_run(tmp_path, monkeypatch):
    cfg = kinetics(tmp_path, {f"v{i}": good_video() for i in range(8)})  # two shards of four

    def build_all(plan, cfg, ray_address, progress):  # the second shard's worker dies every time
        first, second = plan.build
        return [build_shard(first, cfg.output, cfg.dataset, cfg.transcode),
                shard_failure(second, RuntimeError("ray.exceptions.WorkerCrashedError: the worker died"))]

    monkeypatch.setattr(ingest_run, "_build_all", build_all)
    first = run_ingest(cfg, progress=False)
    assert first.version == 1 and first.videos_out == 4 and first.transient == 4
    assert all(q["reason"].endswith("failed (RuntimeError: ray.exceptions.WorkerCrashedError: the worker died)")
               and "the shard task for shards/train/" in q["reason"] for q in first.quarantine.values())

    monkeypatch.setattr(ingest_run, "_build_all", lambda plan, cfg, a, p: [
        build_shard(s, cfg.output, cfg.dataset, cfg.transcode) for s in plan.build])
    second = run_ingest(cfg, progress=False)
    assert second.version == 2 and second.videos_out == 8 and not second.quarantine
    assert second.plan["build_videos"] == 4 and second.plan["keep_shards"] == 1


def test_when_every_shard_task_fails_nothing_is_committed(tmp_path, monkeypatch):
    cfg = kinetics(tmp_path, {"v0": good_video()})
    monkeypatch.setattr(ingest_run, "_build_all", lambda plan, cfg, a, p: [
        shard_failure(s, RuntimeError("cannot reach the workers")) for s in plan.build])
    with pytest.raises(IngestError, match="every shard task failed .*cannot reach the workers"):
        run_ingest(cfg, progress=False)
    assert not open_storage(cfg.output).list("indexes/")
    assert not open_storage(cfg.output).exists(ingest_run.LEASE_KEY)


def test_an_unreadable_source_at_planning_time_does_not_stop_the_run(tmp_path, monkeypatch, serial):
    cfg = kinetics(tmp_path, {"a": good_video(), "b": good_video()})
    bad = str(tmp_path / "videos" / "b.mp4")
    real = ingest_run.sha256_file

    def sha256_file(path):
        if str(path) == bad:
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(ingest_run, "sha256_file", sha256_file)
    first = run_ingest(cfg, progress=False)
    assert first.videos_out == 1 and first.quarantine[vid("b")]["kind"] == "transient"
    assert first.quarantine[vid("b")]["reason"].startswith(f"{bad}: cannot read it for its checksum")
    monkeypatch.setattr(ingest_run, "sha256_file", real)
    assert run_ingest(cfg, progress=False).videos_out == 2


def test_a_shard_reused_from_an_interrupted_run_leaves_out_videos_for_retry(tmp_path, monkeypatch):
    plan, paths = shard_plan(tmp_path, {"a": good_video(), "b": good_video()})
    flaky_reads(monkeypatch, {paths["b"]: -1})
    build_shard(plan, str(tmp_path / "out"), "d", CFG)  # stored with "a" only; the run then died
    monkeypatch.setattr(worker, "read_source", _real_read_source)
    reused = build_shard(plan, str(tmp_path / "out"), "d", CFG)
    assert reused["stats"]["reused"] == 1 and reused["shard"].keys == ["a"]
    assert reused["quarantine"]["b"]["kind"] == "transient"
    last = DatasetIndex("d", 1, ["c"], {}, [reused["shard"]], source_checksums={"a": "sha-a"},
                        quarantine=reused["quarantine"])
    again = make_plan(plan.sources, {}, 4, last)
    assert [s.entry.video_id for p in again.build for s in p.sources] == ["b"]


# -- what the plan retries ---------------------------------------------------------------------


def test_the_plan_retries_transient_and_unclassified_entries_and_keeps_content_ones():
    assert is_permanent({"sha256": "x", "kind": "content"}, "x")
    assert not is_permanent({"sha256": "x", "kind": "content"}, "y")  # the source changed
    assert not is_permanent({"sha256": "x", "kind": "transient"}, "x")
    assert not is_permanent({"sha256": "x", "reason": "Input/output error"}, "x")  # written before kinds
    limited = {"sha256": "x", "kind": "content", "limit": "max_pixels", "limit_value": "16777216"}
    assert is_permanent(limited, "x") and is_permanent(limited, "x", DecodeLimits(max_seconds=60))
    assert not is_permanent(limited, "x", DecodeLimits(max_pixels=33_177_600))  # raised for 8K sources


def test_a_content_entry_does_not_stay_quarantined_when_preprocessing_rebuilds_it():
    src = Source(ManifestEntry("v", ("v.mp4",), 0, "c", "train"), "/v.mp4", "x")
    last = DatasetIndex("d", 1, ["c"], {"transcode": {"fps": 10}}, [ShardInfo("s", "train", 0, 0, "0", [])],
                        quarantine={"v": {"sha256": "x", "kind": "content", "reason": "too short"}})
    assert make_plan([src], {"transcode": {"fps": 10}}, 4, last).is_noop
    assert len(make_plan([src], {"transcode": {"fps": 30}}, 4, last).build) == 1


# -- the ingest config -------------------------------------------------------------------------

REQUIRED = ["dataset=d", "format=kinetics", "annotations=a.csv", "source=s", "output=o"]


@pytest.mark.parametrize("override,message", [
    ("transcode.fps=0", r"^command line: transcode.fps=0.0: expected a frame rate > 0"),
    ("transcode.fps=abc", r"^command line: transcode.fps='abc' \(str\): expected a number"),
    ("transcode.fps=.nan", r"^command line: transcode.fps="),
    ("transcode.fps=-30", r"^command line: transcode.fps=-30.0: expected a frame rate > 0"),
    ("samples_per_shard=zero", r"^command line: samples_per_shard='zero' \(str\): expected an integer"),
    ("samples_per_shard=0", r"^command line: samples_per_shard=0: expected an integer >= 1"),
    ("transcode.short_side=-64", r"^command line: transcode.short_side=-64: expected an integer >= 2"),
    ("transcode.keyframe_interval=0", r"^command line: transcode.keyframe_interval=0: expected an integer >= 1"),
    ("transcode.codec=h265x", r"^command line: transcode.codec='h265x': expected a video encoder"),
    ("transcode.codec=aac", r"^command line: transcode.codec='aac': expected a video encoder, not a audio one"),
    ("transcode.preset=warp", r"^command line: transcode.preset='warp': expected an x264 preset"),
    ("format=avi", r"^command line: format='avi': expected one of kinetics, ssv2"),
    ("max_in_flight=-1", r"^command line: max_in_flight=-1: expected an integer >= 0"),
    ("limits.max_pixels=0", r"^command line: limits.max_pixels=0: expected a positive integer"),
    ("limits.max_frame_gap=-1", r"^command line: limits.max_frame_gap=-1.0: expected a positive number"),
    ("limits.allow_images=maybe", r"^command line: limits.allow_images='maybe' \(str\): expected true or false"),
    ("limits.max_size=3", r"^command line: unknown key 'limits.max_size'"),
    ("transcode.fps=[", r"^command line: 'transcode.fps=\[': the value is not valid YAML"),
])
def test_bad_ingest_values_are_refused_at_load_with_the_field_named(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        IngestConfig.load(None, [*REQUIRED, override])
    assert "\n" not in str(err.value)


def test_the_file_or_the_command_line_is_named_where_the_value_came_from(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("dataset: d\nformat: kinetics\nannotations: a.csv\nsource: s\noutput: o\n"
                    "transcode: {fps: 0}\nlimits: {max_seconds: 600}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: transcode.fps=0.0: expected a frame rate"):
        IngestConfig.load(str(path), [])
    ok = IngestConfig.load(str(path), ["transcode.fps=25"])  # a bad file value fixed on the command line
    assert ok.transcode.fps == 25.0 and ok.decode_limits() == DecodeLimits(max_seconds=600)
    path.write_text("dataset: d\ntranscode: {fps: 30\n")
    not_yaml = rf"^{path}: this ingest config is not valid YAML \("
    with pytest.raises(ConfigError, match=not_yaml + r".* at line \d+, column \d+\)$"):
        IngestConfig.load(str(path), [])
    path.write_text("dataset: d\nsamples_per_shard: 8\nsamples_per_shard: 64\n")  # the second used to win
    with pytest.raises(ConfigError, match=not_yaml + r".*'samples_per_shard' appears twice"):
        IngestConfig.load(str(path), [])
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match=rf"^{path}: an ingest config is a mapping of keys, got list"):
        IngestConfig.load(str(path), [])
    with pytest.raises(ConfigError, match=r"^command line: missing required key\(s\) \['source', 'output'\]"):
        IngestConfig.load(None, REQUIRED[:3])


def test_a_config_built_in_code_is_checked_when_the_run_starts(tmp_path):
    cfg = IngestConfig(dataset="d", format="kinetics", annotations=["a.csv"], source="s", output=str(tmp_path),
                       transcode=TranscodeConfig(fps=0))
    with pytest.raises(ConfigError, match=r"transcode.fps=0: expected a frame rate"):
        run_ingest(cfg, dry_run=True, progress=False)


@pytest.mark.parametrize("args,message", [
    (["transcode.fps=0"], "transcode.fps=0.0: expected a frame rate"),
    (["samples_per_shard=zero"], "samples_per_shard='zero' (str): expected an integer"),
    (["transcode.fps={"], "is not valid YAML"),
])
def test_the_ingest_job_prints_one_line_and_exits_2_on_a_bad_config(tmp_path, capsys, args, message):
    from jobs.ingest import main

    (tmp_path / "a.csv").write_text("label,youtube_id,time_start,time_end,split\n")
    rc = main(["--dry-run", "--no-progress", "dataset=d", "format=kinetics", f"annotations={tmp_path / 'a.csv'}",
               f"source={tmp_path}", f"output={tmp_path / 'out'}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_fractional_frame_rates_are_encoded_at_that_rate():
    video, info = worker.transcode(good_video(30), "v.mp4", TranscodeConfig(short_side=32, fps=12.5))
    assert info["num_frames"] == 38 and info["duration"] == pytest.approx(3.04)
    clip = decode_frames(video, [0.0, 0.8, 2.4])  # output frame n shows the source at n / 12.5 s
    assert frame_numbers(clip.frames) == [0, 8, 24]
