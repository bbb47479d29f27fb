"""A model carries its input normalisation: the run config sets it (model.mean/std), the loader, both engines,
validation, the test protocol and the exports read it from the model, and a checkpoint trained on other
constants is refused at launch with the values to set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, batch_plan, load_recipe
from pipeline.data.loader import clip_config
from pipeline.data.transforms import TrainTransform, finish_clip
from pipeline.models.config import DEFAULT_MEAN, DEFAULT_STD, normalization_of
from pipeline.models.convert import checkpoint_normalization, load_safetensors, save_hf, save_safetensors
from pipeline.models.timesformer import TimeSformer, model_config
from pipeline.train.engine import TorchEngine, _Autocast
from pipeline.train.evaluate import validate

HALF = (0.5, 0.5, 0.5)
CPU = torch.device("cpu")


def half_recipe(*extra: str):
    return load_recipe("smoke", ["model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]", "train.engine=torch",
                                 "train.zero_stage=0", "train.micro_batch=2", "train.global_batch=2",
                                 "data.num_frames=2", *extra])


def seen_inputs(model: TimeSformer) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.patch_embed.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    return seen


def test_the_run_config_sets_the_models_normalisation_and_every_path_uses_it():
    cfg = half_recipe()
    assert model_config(cfg).mean == HALF and clip_config(cfg).mean == HALF and clip_config(cfg).std == HALF
    assert load_recipe("smoke").model.mean == DEFAULT_MEAN  # the original's unless the recipe says otherwise
    white = torch.full((2, 3, 2, 32, 32), 255, dtype=torch.uint8)  # uint8 clips, as GPU loaders hand them over
    model = TimeSformer(model_config(cfg))
    seen = seen_inputs(model)
    engine = TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=10, device=CPU)
    engine.train_micro_batch(white, torch.tensor([0, 1]))
    assert torch.allclose(seen[-1], torch.ones_like(seen[-1]))  # (1 - 0.5) / 0.5, not (1 - 0.45) / 0.225
    with engine.eval_module() as (module, dtype):
        assert normalization_of(module) == (HALF, HALF)
        validate(module, dtype, [{"video": white, "label": torch.tensor([0, 1])}], CPU)
    assert torch.allclose(seen[-1], torch.ones_like(seen[-1]))
    # through wrappers (autocast, DDP and DeepSpeed keep the model as .module) and for models of other kinds
    assert normalization_of(_Autocast(model, torch.bfloat16)) == (HALF, HALF)
    assert normalization_of(torch.nn.Linear(2, 2)) == (DEFAULT_MEAN, DEFAULT_STD)


def test_a_cpu_loader_normalises_with_the_clip_configs_constants():
    frames = torch.full((2, 40, 40, 3), 255, dtype=torch.uint8).numpy()
    clip = clip_config(half_recipe())
    out = TrainTransform(crop=32, scale=(32, 40), flip=False, mean=clip.mean, std=clip.std)(
        frames, np.random.default_rng(0))
    assert torch.allclose(out, torch.ones_like(out))
    assert torch.allclose(finish_clip(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), HALF, HALF),
                          torch.ones(3, 2, 4, 4))


def test_exports_carry_the_normalisation_and_a_checkpoint_on_other_constants_is_refused_at_launch(tmp_path):
    from pipeline.train.launch import check_init

    cfg = half_recipe()
    model = TimeSformer(model_config(cfg))
    path = save_safetensors(model, tmp_path / "model.safetensors", classes=["a", "b", "c", "d"])
    assert load_safetensors(path).cfg.mean == HALF and checkpoint_normalization(path) == (HALF, HALF)
    hf = save_hf(model, tmp_path / "hf", labels=["a", "b", "c", "d"])
    pre = json.loads((hf / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == list(HALF) and pre["crop_size"] == {"height": 32, "width": 32}
    assert checkpoint_normalization(hf) == (HALF, HALF)
    assert checkpoint_normalization(tmp_path / "missing.pth") is None  # a format that does not record it
    check_init(half_recipe(f"model.init={path}"))  # the same constants: fine
    with pytest.raises(ConfigError, match=r"trained on inputs normalised with mean \[0.5, 0.5, 0.5\].*set "
                                          r"model.mean=\[0.5,0.5,0.5\] model.std=\[0.5,0.5,0.5\]"):
        check_init(load_recipe("smoke", [f"model.init={path}", "data.num_frames=2"]))
