"""``model.init`` from S3 (a real SeaweedFS server): downloaded once through the storage layer into a cache,
each version of the object in its own folder; a folder of model files (a run's export); launch hands the
ranks the cached path, under the runs directory, and names the reference beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_recipe
from pipeline.data.storage import open_storage
from pipeline.models.convert import load_checkpoint, save_hf, save_safetensors
from pipeline.models.hub import SourceError, resolve_source
from pipeline.models.timesformer import TimeSformer
from pipeline.train.launch import check_init, init_cache_dir
from tests.hub_cache import tiny_cfg

pytestmark = pytest.mark.integration


def test_an_s3_checkpoint_is_downloaded_once_and_a_new_version_gets_its_own_folder(s3_bucket, tmp_path):
    torch.manual_seed(0)
    first, second = TimeSformer(tiny_cfg()), TimeSformer(tiny_cfg())
    storage = open_storage(f"s3://{s3_bucket}")
    storage.put_file("models/tiny/model.safetensors", save_safetensors(first, tmp_path / "a" / "model.safetensors"))
    uri = f"s3://{s3_bucket}/models/tiny/model.safetensors"
    cache = tmp_path / "cache"
    path = resolve_source(uri, cache_dir=cache)
    assert path.is_file() and cache in path.parents and path.name == "model.safetensors"
    loaded = load_checkpoint(TimeSformer(tiny_cfg()), path)
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in loaded.state_dict().items())
    stamp = path.stat().st_mtime_ns
    assert resolve_source(uri, cache_dir=cache) == path and path.stat().st_mtime_ns == stamp  # not downloaded again
    storage.put_file("models/tiny/model.safetensors", save_safetensors(second, tmp_path / "b" / "model.safetensors"))
    newer = resolve_source(uri, cache_dir=cache)
    assert newer != path and path.is_file()  # a path handed out before still holds what it held
    assert torch.equal(load_checkpoint(TimeSformer(tiny_cfg()), newer).head.weight, second.head.weight)
    with pytest.raises(SourceError, match="no such object, and no model files"):
        resolve_source(f"s3://{s3_bucket}/models/none.safetensors", cache_dir=cache)
    with pytest.raises(SourceError, match=r"cannot be listed.*does not exist"):
        resolve_source("s3://no-such-bucket-here/model.safetensors", cache_dir=cache)


def test_an_s3_folder_of_model_files_and_launch_hands_the_ranks_a_path_beside_the_runs(s3_bucket, tmp_path):
    model = TimeSformer(tiny_cfg(mean=[0.5] * 3, std=[0.5] * 3))
    export = save_hf(model, tmp_path / "export", labels=["a", "b", "c"])
    storage = open_storage(f"s3://{s3_bucket}/runs/r1/export")
    for f in export.iterdir():
        storage.put_file(f.name, f)
    storage.put_bytes("notes.txt", b"not a model file")
    cfg = load_recipe("smoke", ["data.num_frames=2", "data.crop=16", "model.patch_size=8", "model.embed_dim=32",
                                "model.num_heads=2", "model.num_classes=3", f"runs_dir={tmp_path / 'runs'}",
                                f"model.init=s3://{s3_bucket}/runs/r1/export"])
    with pytest.raises(ConfigError, match=r"normalised with mean \[0.5, 0.5, 0.5\].*set model.mean=\[0.5,0.5,0.5\]"):
        check_init(cfg)  # the export records 0.5/0.5; the recipe says 0.45/0.225
    cfg.model.mean, cfg.model.std = (0.5,) * 3, (0.5,) * 3
    cfg.model.init, cfg.model.init_source = f"s3://{s3_bucket}/runs/r1/export", ""
    line = check_init(cfg)
    assert line.startswith(f"s3://{s3_bucket}/runs/r1/export -> ")
    folder = cfg.model.init
    assert init_cache_dir(cfg) in Path(folder).parents
    assert sorted(p.name for p in Path(folder).iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    assert cfg.model.init_source == f"s3://{s3_bucket}/runs/r1/export"
    loaded = load_checkpoint(TimeSformer(tiny_cfg()), folder)
    assert torch.equal(loaded.head.weight, model.head.weight)
