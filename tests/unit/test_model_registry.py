"""The model registry (pipeline.models.registry): every family's model goes through the same config, training
wiring, checkpoint files, tracking and prediction paths; another family's fields and TimeSformer-only features are
refused with the reason."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.config import ConfigError, dump, from_dict, load_recipe, yaml_load
from pipeline.models import registry
from pipeline.models.registry import FAMILIES, MODELS, build, family_of, model_config_of, register_model


def test_every_model_builds_and_its_counts_are_its_familys(monkeypatch):
    for name, entry in MODELS.items():
        cfg = model_config_of(name)
        assert family_of(name).name == entry.family and isinstance(cfg, FAMILIES[entry.family].config)
        with torch.device("meta"):
            model = build(cfg)
        assert sum(p.numel() for p in model.parameters()) == registry.parameter_count(cfg), name
        assert registry.flops_per_view(cfg) > 0 and model.cfg is cfg
        assert len(model.checkpoint_units()) >= 1 and model.num_layers == len(model.checkpoint_units()) + 1
    lines = registry.model_table()
    assert len(lines) == len(MODELS) + 1 and all(any(line.startswith(n + " ") for line in lines) for n in MODELS)


def test_registering_checks_the_entry_now(monkeypatch):
    monkeypatch.setattr(registry, "MODELS", dict(MODELS))

    @register_model(family="resnet3d")
    def i3d_small():
        """a narrower I3D"""
        return dict(num_classes=7, stem_width=16, bottleneck_width=16)

    assert registry.MODELS["i3d_small"].description == "a narrower I3D"
    assert model_config_of("i3d_small").num_classes == 7
    with pytest.raises(ValueError, match="registered twice"):
        register_model("i3d_small", family="resnet3d")(lambda: {})
    with pytest.raises(ValueError, match="unknown family 'cnn'"):
        register_model("x", family="cnn")(lambda: {})
    with pytest.raises(ValueError, match="unknown model field.*embed_dim"):  # a TimeSformer field on a CNN
        register_model("y", family="resnet3d")(lambda: dict(embed_dim=32))
    with pytest.raises(ValueError, match="unknown model variant 'nope'"):
        model_config_of("nope")


def test_a_family_whose_shared_field_means_something_else_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", dict(FAMILIES))

    @dataclasses.dataclass(frozen=True)
    class Odd:
        num_classes: str = "400"  # the same name as every family's int

    with pytest.raises(ValueError, match=r"num_classes.*another type"):
        registry.register_family(registry.Family("odd", "", Odd, model="m:M", flops="m:f", params="m:p", load="m:l"))


# -- the run config --------------------------------------------------------------------------------------------


def test_a_recipe_switching_family_drops_the_old_familys_fields_and_keeps_the_datasets():
    base = load_recipe("k400_base")  # a TimeSformer from the ImageNet ViT at 0.5 / 0.5, 400 classes
    cfg = load_recipe("k400_base", ["model.variant=i3d_tiny"])
    m = cfg.model
    assert m.init == "" and m.init_source == ""  # the ViT's weights were the other family's start
    assert m.num_classes == base.model.num_classes == 400  # the dataset's
    assert (m.mean, m.std) == (model_config_of("i3d_tiny").mean, model_config_of("i3d_tiny").std)  # the model's own
    assert m.embed_dim is None and m.attention_type is None and m.stage_blocks == (1, 1, 1, 1)
    assert "embed_dim" not in cfg.to_dict()["model"] and "stage_blocks" not in base.to_dict()["model"]
    # the resolved config reads back to the same run (config.yaml, a requeue)
    again = from_dict(yaml_load(dump(cfg)))
    assert again.to_dict() == cfg.to_dict()


def test_a_field_of_another_family_is_refused_with_the_family_named():
    with pytest.raises(ConfigError, match=r"i3d_tiny is a resnet3d model, and model\.embed_dim belongs to "
                                          r"timesformer: remove it"):
        load_recipe("smoke_i3d", ["model.embed_dim=32"])
    with pytest.raises(ConfigError, match=r"model\.stage_blocks belongs to resnet3d"):
        load_recipe("smoke", ["model.stage_blocks=[1,1,1,1]"])
    with pytest.raises(ConfigError, match=r"model\.stem_width=0: expected a positive number of channels"):
        load_recipe("smoke_i3d", ["model.stem_width=0"])
    with pytest.raises(ConfigError, match=r"test\.crop=36: expected a multiple of model\.patch_size=8"):
        load_recipe("smoke", ["test.crop=36"])


def test_the_i3d_recipe_is_pyslowfasts_and_tests_at_256():
    from pipeline.data.loader import clip_config, test_clip_config
    from pipeline.train.export import recipe_protocol

    cfg = load_recipe("k400_i3d_r50")
    assert (cfg.data.num_frames, cfg.data.sampling_rate, cfg.data.crop, cfg.data.scale) == (8, 8, 224, [256, 320])
    assert (cfg.optim.lr, cfg.optim.lr_steps, cfg.train.epochs, cfg.train.global_batch) == (0.01, [44.0, 88.0],
                                                                                            118.0, 64)
    assert (cfg.test.temporal_clips, cfg.test.spatial_crops, cfg.test.crop) == (10, 3, 256)
    assert clip_config(cfg).crop == 224 and test_clip_config(cfg).crop == 256
    assert recipe_protocol(cfg)["crop"] == 256  # what an export records, what predict uses
    assert recipe_protocol(load_recipe("k400_base"))["crop"] == 224  # test.crop 0: the training size


def test_the_tracking_tags_name_the_family_and_the_test_views_cost():
    from pipeline.models.resnet3d import flops_per_view
    from pipeline.tracking.sink import mlflow_tags

    tags = mlflow_tags(load_recipe("k400_i3d_r50"), nodes=1, git={})
    assert (tags["family"], tags["attention_type"], tags["variant"]) == ("resnet3d", "resnet3d", "i3d_r50")
    # Table 2's 1.11 TFLOPs are 30 views of 8x256: the tag is the test view's, not the 224 training crop's
    test_view = flops_per_view(model_config_of("i3d_r50"), img_size=256) / 1e9
    assert float(tags["gflops_per_view"]) == pytest.approx(test_view, rel=1e-3)
    assert 30 * float(tags["gflops_per_view"]) / 1e3 == pytest.approx(1.11, abs=0.005)
    assert round(int(tags["params"]) / 1e6, 1) == 28.0
    base = mlflow_tags(load_recipe("k400_base"), nodes=1, git={})
    assert (base["family"], base["attention_type"]) == ("timesformer", "divided_space_time")


# -- training wiring ---------------------------------------------------------------------------------------------


def test_layer_decay_follows_each_familys_layers():
    from pipeline.train.engine import build_optimizer

    for recipe in ("smoke", "smoke_i3d"):
        cfg = load_recipe(recipe, ["optim.layer_decay=0.5", "optim.lr=1.0"])
        model = build(model_config_of(cfg.model.variant, num_classes=4))
        opt = build_optimizer(model, cfg)
        top = model.num_layers
        rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            assert rate[id(p)] == pytest.approx(0.5 ** (top - model.layer_of(name))), (recipe, name)
        assert rate[id(model.head.weight)] == 1.0  # the top layer at the full rate
        first = next(iter(model.checkpoint_units()))
        assert all(rate[id(p)] == 0.5 ** (top - 1) for p in first.parameters())


def test_checkpointing_policies_apply_to_any_family_and_change_nothing():
    from pipeline.models.checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    model = build(model_config_of("i3d_tiny")).train()
    x = torch.randn(2, 3, 4, 32, 32)
    ref = model(x).sum()
    ref.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for policy in ("full", "every_2", "selective"):
        chosen = apply_activation_checkpointing(model, policy)
        assert chosen == list(range(0, len(model.checkpoint_units()), 2 if policy == "every_2" else 1))
        model.zero_grad()
        out = model(x).sum()
        out.backward()
        assert torch.allclose(out, ref, atol=1e-6)
        assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, model.parameters(), strict=True))


# -- files and the paths that read them --------------------------------------------------------------------------


def test_safetensors_files_and_ray_payloads_rebuild_any_family(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from pipeline.models.convert import load_safetensors, save_safetensors
    from pipeline.predict.scale import model_from_payload, model_payload

    x = torch.randn(1, 3, 4, 32, 32)
    for name in ("i3d_tiny", "timesformer_tiny"):
        torch.manual_seed(1)
        model = build(model_config_of(name)).eval()
        path = save_safetensors(model, tmp_path / name)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        assert meta["model_family"] == family_of(name).name
        assert ("timesformer_config" in meta) == (name == "timesformer_tiny")  # what earlier versions read
        for again in (load_safetensors(path), model_from_payload(model_payload(model))):
            assert type(again) is type(model) and again.cfg == model.cfg
            assert torch.equal(again.eval()(x), model(x))
    # a TimeSformer file written before the registry (timesformer_config only) still loads
    old = tmp_path / "old.safetensors"
    fields = json.dumps(model_config_of("timesformer_tiny").to_dict())
    save_file(load_file(str(tmp_path / "timesformer_tiny" / "model.safetensors")), str(old),
              metadata={"format": "pt", "timesformer_config": fields})
    assert type(load_safetensors(old)).__name__ == "TimeSformer"
    # a CNN file whose config asks for more numbers than it holds builds nothing
    big = tmp_path / "big.safetensors"
    save_file({"head.weight": torch.zeros(2, 2)}, str(big), metadata={
        "model_family": "resnet3d", "model_config": json.dumps(model_config_of("i3d_r50").to_dict())})
    with pytest.raises(ValueError, match="describes a model of 28,.* parameters.*No model was built"):
        load_safetensors(big)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"w": torch.zeros(1)}, str(unknown), metadata={"model_family": "x3d", "model_config": "{}"})
    with pytest.raises(ValueError, match="unknown model family 'x3d'"):
        load_safetensors(unknown)


def test_the_hugging_face_export_is_refused_for_a_family_transformers_cannot_load(tmp_path):
    from pipeline.models.convert import save_safetensors
    from pipeline.train.export import export_hf

    path = save_safetensors(build(model_config_of("i3d_tiny")), tmp_path / "m")
    with pytest.raises(ValueError, match="a resnet3d model; a Hugging Face directory holds a "
                                         "TimesformerForVideoClassification.*leave out --hf"):
        export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# -- the review's findings: each fails without its fix ----------------------------------------------------------


def _bn_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_a_recomputed_block_does_not_update_batchnorm_statistics_twice():
    from pipeline.models.checkpointing import apply_activation_checkpointing

    x = torch.randn(2, 3, 4, 32, 32)
    states = {}
    for policy in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = build(model_config_of("i3d_tiny")).train()
        apply_activation_checkpointing(model, policy)
        model(x).sum().backward()
        states[policy] = _bn_state(model)
    for policy in ("full", "selective"):
        for k, v in states["none"].items():
            assert torch.equal(states[policy][k], v), (policy, k)
    assert all(int(v) == 1 for k, v in states["full"].items() if k.endswith("num_batches_tracked"))


def test_batchnorm_runs_in_float32_under_half_precision_parameters():
    """DeepSpeed's bf16 casts parameters, not buffers: BatchNorm then sees bf16 weights and fp32 statistics."""
    model = build(model_config_of("i3d_tiny")).train()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    x = torch.randn(2, 3, 4, 32, 32, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the torch engine's path
        assert torch.isfinite(build(model_config_of("i3d_tiny"))(x.float()).float()).all()


def test_a_frozen_backbone_keeps_its_batchnorm_statistics():
    from pipeline.train.engine import apply_freeze

    model = build(model_config_of("i3d_tiny")).train()
    before = _bn_state(model)
    assert apply_freeze(model, "backbone") == sum(p.numel() for p in model.head.parameters())
    model(torch.randn(2, 3, 4, 32, 32)).sum().backward()
    after = _bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_export_tested_at_another_size_predicts_at_it(tmp_path):
    from pipeline.models.convert import save_safetensors
    from pipeline.predict.model import PredictError, load_model
    from pipeline.train.export import recipe_protocol

    cfg = load_recipe("smoke_i3d", ["test.crop=64"])
    path = save_safetensors(build(model_config_of("i3d_tiny", num_classes=4)), tmp_path / "m",
                            protocol=recipe_protocol(cfg))
    assert load_model(str(path)).protocol.crop == 64
    lying = save_safetensors(build(model_config_of("i3d_tiny", num_classes=4)), tmp_path / "lying",
                             protocol={**recipe_protocol(cfg), "crop": 100_000})
    with pytest.raises(PredictError, match="does not fit the model"):
        load_model(str(lying))


def test_a_cnn_file_hands_on_its_normalisation_and_classes(tmp_path):
    from pipeline.models.convert import checkpoint_normalization, save_safetensors
    from pipeline.models.factory import create_model

    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.manual_seed(3)
    source = build(model_config_of("i3d_tiny", num_classes=7, mean=imagenet[0], std=imagenet[1])).eval()
    path = save_safetensors(source, tmp_path / "m")
    assert checkpoint_normalization(path) == imagenet
    model = create_model("i3d_tiny", pretrained=str(path)).eval()
    assert (model.cfg.num_classes, model.cfg.mean, model.cfg.std) == (7, *imagenet)
    x = torch.randn(1, 3, 4, 32, 32)
    assert torch.equal(model(x), source(x))  # the head kept: the same classifier
    fresh = create_model("i3d_tiny", pretrained=str(path), num_classes=3)
    assert fresh.cfg.num_classes == 3 and torch.equal(fresh.stem.conv.weight, source.stem.conv.weight)


def test_a_cnn_file_whose_metadata_lies_builds_nothing_fast(tmp_path):
    import time

    from safetensors.torch import save_file

    from pipeline.models.convert import load_safetensors, save_safetensors

    huge = tmp_path / "huge.safetensors"
    fields = {**model_config_of("i3d_tiny").to_dict(), "stage_blocks": [100_000_000], "temporal_kernels": [[3]]}
    save_file({"w": torch.zeros(4)}, str(huge), metadata={"model_family": "resnet3d",
                                                          "model_config": json.dumps(fields)})
    t0 = time.time()
    with pytest.raises(ValueError, match="stage_blocks.*at most 8 stages of at most 1024 blocks"):
        load_safetensors(huge)
    assert time.time() - t0 < 5
    for field, value in (("num_frames", 10_000_000), ("img_size", 100_000)):
        with pytest.raises(ValueError, match=f"{field}.*at most"):
            model_config_of("i3d_tiny", **{field: value})
    # a config that fits the count of numbers but not the names and shapes of the tensors
    good = save_safetensors(build(model_config_of("i3d_tiny")), tmp_path / "good")
    wider = {**model_config_of("i3d_tiny").to_dict(), "stage_blocks": [1, 1, 1],
             "temporal_kernels": [[3], [3, 1], [3, 1]]}  # fewer numbers than the file holds, other names
    from safetensors.torch import load_file

    swapped = tmp_path / "swapped.safetensors"
    save_file(load_file(str(good)), str(swapped), metadata={"model_family": "resnet3d",
                                                            "model_config": json.dumps(wider)})
    with pytest.raises(ValueError, match="does not describe its tensors.*No model was built"):
        load_safetensors(swapped)


def test_launch_refuses_weights_of_another_family(tmp_path):
    from pipeline.models.convert import save_safetensors
    from pipeline.train.launch import check_init

    tsf = save_safetensors(build(model_config_of("timesformer_tiny", num_classes=4)), tmp_path / "tsf")
    cnn = save_safetensors(build(model_config_of("i3d_tiny", num_classes=4)), tmp_path / "cnn")
    with pytest.raises(ConfigError, match=r"holds the weights of a timesformer model, and model\.variant=i3d_tiny "
                                          r"is a resnet3d model"):
        check_init(load_recipe("smoke_i3d", [f"model.init={tsf}"]))
    with pytest.raises(ConfigError, match="holds the weights of a resnet3d model"):
        check_init(load_recipe("smoke", [f"model.init={cnn}"]))
    assert "safetensors" in check_init(load_recipe("smoke_i3d", [f"model.init={cnn}"]))


def test_a_micro_batch_that_leaves_batchnorm_one_value_is_refused_before_launch():
    from pipeline.config import check_model

    with pytest.raises(ConfigError, match="one value per channel in the model's last BatchNorm"):
        check_model(load_recipe("smoke_i3d", ["data.num_frames=2", "train.micro_batch=1", "train.global_batch=8"]))
    check_model(load_recipe("smoke_i3d", ["data.num_frames=2", "train.micro_batch=2", "train.global_batch=8"]))
    check_model(load_recipe("smoke", ["data.num_frames=2", "train.micro_batch=1", "train.global_batch=8"]))


def test_a_3d_cnn_in_half_precision_on_cpu_ranks_is_refused_with_the_reason():
    """oneDNN's bf16 3D convolutions gave non-finite gradients at random in the first steps of i3d_tiny (the same
    run in fp32, or with oneDNN off, trains): refused before anything runs, not met as a divergence."""
    with pytest.raises(ConfigError, match=r"train\.precision='bf16': expected fp32 for a 3D CNN on CPU ranks"):
        load_recipe("smoke_i3d", ["train.precision=bf16"])
    load_recipe("smoke_i3d", ["train.precision=bf16", "cluster.accelerator=gpu"])  # GPUs: the recipe's choice
    load_recipe("smoke", ["train.precision=bf16"])  # a TimeSformer on CPU in bf16 trains (tested elsewhere)
