"""The 3D ResNet family (I3D, Slow): sizes and costs against the published numbers and PyTorch's own counter, the
model's generic interface, its config, and the converters (PySlowFast, inflated 2D ImageNet ResNets)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import fields
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.config import TimeSformerConfig
from pipeline.models.convert import CheckpointMismatchError
from pipeline.models.resnet3d import (
    RESNET3D_VARIANTS,
    ResNet3D,
    ResNet3DConfig,
    build,
    convert,
    cost_per_view,
    detect_format,
    flops_per_view,
    from_pyslowfast,
    inflate_resnet2d,
    load_checkpoint,
    parameter_count,
    resnet3d_variant_config,
    state_shapes,
    to_pyslowfast,
)

SHARED_FIELDS = {"num_classes", "num_frames", "img_size", "in_chans", "mean", "std", "multi_label"}
# Params (M) and inference TFLOPs over 30 views (3 crops x 10 clips) of 8 frames at 256 x 256, the view PySlowFast
# tests on (TEST_CROP_SIZE): I3D 8x8 R50 from the paper's Table 2; Slow 8x8 R50 from the SlowFast paper (54.52
# GFLOPs per view x 30)
PUBLISHED = {"i3d_r50": (28.0, 1.11), "slow_r50": (32.5, 1.64)}


def tiny(**overrides) -> ResNet3DConfig:
    return resnet3d_variant_config("i3d_tiny", **overrides)


def meta_model(cfg: ResNet3DConfig) -> ResNet3D:
    with torch.device("meta"):
        return ResNet3D(cfg)


# ---------------------------------------------------------------------------------------------------
# Parameters and FLOPs


@pytest.mark.parametrize("name", list(RESNET3D_VARIANTS))
def test_parameter_count_and_state_layout_from_the_config_match_the_built_model(name):
    cfg = resnet3d_variant_config(name)
    model = meta_model(cfg)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())
    assert state_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert cfg.feature_dim == model.head.in_features


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameters_and_flops_match_the_published_numbers(name):
    cfg = resnet3d_variant_config(name)
    params_m, tflops = PUBLISHED[name]
    assert round(parameter_count(cfg) / 1e6, 1) == params_m
    assert round(30 * flops_per_view(cfg, img_size=256) / 1e12, 2) == tflops
    if name == "slow_r50":
        assert round(flops_per_view(cfg, img_size=256) / 1e9, 2) == 54.52


def test_i3d_is_the_papers_1_11_tflops_over_30_views_and_batchnorm_is_not_in_it():
    cfg = resnet3d_variant_config("i3d_r50")
    assert round(30 * flops_per_view(cfg, img_size=256) / 1e12, 2) == 1.11
    # fvcore's eval BatchNorm rule would give 1.12: the published count leaves BatchNorm out
    assert round(30 * flops_per_view(cfg, img_size=256, include_batchnorm=True) / 1e12, 2) == 1.12
    assert flops_per_view(cfg) == 28_407_660_544  # the 224 x 224 training view


@pytest.mark.parametrize("name,frames,size", [("i3d_r50", 8, 256), ("slow_r50", 8, 224)])
def test_flops_equal_pytorch_operation_count_on_the_full_models(name, frames, size):
    """On the meta device nothing is computed, so the full R50 models are counted in well under a second."""
    cfg = resnet3d_variant_config(name)
    model = meta_model(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, frames, size, size, device="meta"))
    assert counter.get_total_flops() == 2 * flops_per_view(cfg, num_frames=frames, img_size=size)


@pytest.mark.parametrize("overrides", [{}, {"stage_blocks": (2, 2, 2, 2)},
                                       {"temporal_kernels": ((1,), (1,), (3,), (3,)), "stem_temporal_kernel": 1,
                                        "temporal_pool": 1}])
@pytest.mark.parametrize("frames,size", [(4, 32), (6, (40, 56))])
def test_cost_model_equals_pytorch_count_and_batchnorm_elements(overrides, frames, size):
    """Convolutions and the classifier exactly as PyTorch counts them (2 FLOPs per multiply-add); the BatchNorm
    part is 2 per element that goes through a BatchNorm (fvcore's eval rule), counted here with hooks."""
    cfg = tiny(**overrides)
    model = ResNet3D(cfg).eval()
    h, w = (size, size) if isinstance(size, int) else size
    elements = []
    hooks = [m.register_forward_hook(lambda m, i, o: elements.append(i[0].numel()))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, frames, h, w))
    for hook in hooks:
        hook.remove()
    cost = cost_per_view(cfg, num_frames=frames, img_size=size)
    assert counter.get_total_flops() == 2 * 2 * (cost.conv + cost.head)  # 2 clips
    assert 2 * sum(elements) == 2 * cost.batchnorm
    assert flops_per_view(cfg, num_frames=frames, img_size=size, include_batchnorm=True) == cost.total(True)


# ---------------------------------------------------------------------------------------------------
# The model


def test_forward_shapes_and_any_frame_count_or_size():
    cfg = tiny()
    model = build(cfg).eval()
    x = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, cfg.feature_dim) == (2, 4 * 8 * 4)
    assert model.feature_map(x).shape == (2, 128, 2, 1, 1)
    for t, h, w in [(2, 32, 32), (7, 48, 40), (16, 64, 64)]:
        assert model(torch.randn(1, 3, t, h, w)).shape == (1, 10)
    assert isinstance(ResNet3D(tiny(num_classes=0)).head, torch.nn.Identity)
    assert ResNet3D(tiny(num_classes=0))(x).shape == (2, cfg.feature_dim)


def test_bad_inputs_are_named():
    model = build(tiny()).eval()
    with pytest.raises(ValueError, match=r"expects video as \(B, C=3, T, H, W\); got shape \(2, 4, 3, 32, 32\)"):
        model(torch.randn(2, 4, 3, 32, 32))
    with pytest.raises(ValueError, match="at least temporal_pool=2 frames; got 1"):
        model(torch.randn(1, 3, 1, 32, 32))
    with pytest.raises(TypeError, match="needs a ResNet3DConfig"):
        ResNet3D(TimeSformerConfig())


def test_gradient_reaches_every_parameter():
    model = build(tiny(zero_init_residual=False)).train()
    model(torch.randn(2, 3, 4, 32, 32)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_reset_parameters_is_pyslowfasts_init():
    model = build(tiny(num_classes=400))
    for blk in model.checkpoint_units():
        assert torch.all(blk.bn3.weight == 0) and torch.all(blk.bn1.weight == 1) and torch.all(blk.bn1.bias == 0)
    assert model.head.weight.std().item() == pytest.approx(0.01, rel=0.1) and torch.all(model.head.bias == 0)
    w = model.stem.conv.weight  # He normal, fan-out = 8 channels x 5 x 7 x 7
    assert w.std().item() == pytest.approx((2 / (8 * 5 * 49)) ** 0.5, rel=0.1)
    assert torch.all(build(tiny(zero_init_residual=False)).checkpoint_units()[0].bn3.weight == 1)


def test_checkpoint_fn_on_every_unit_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain = build(tiny(stage_blocks=(2, 1, 2, 1), zero_init_residual=False)).train()
    wrapped = copy.deepcopy(plain)
    calls = []

    def counting_checkpoint(fn, *args):
        calls.append(fn)
        return torch_checkpoint(fn, *args, use_reentrant=False)

    for unit in wrapped.checkpoint_units():
        unit.checkpoint_fn = counting_checkpoint
    x = torch.randn(2, 3, 4, 32, 32)
    out_plain, out_wrapped = plain(x), wrapped(x)
    assert len(calls) == len(wrapped.checkpoint_units()) == 6
    torch.testing.assert_close(out_wrapped, out_plain, rtol=0, atol=0)
    out_plain.square().sum().backward()
    out_wrapped.square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    with torch.no_grad():  # nothing to save for a backward: runs plainly, checkpoint_fn is not called
        wrapped(x)
    assert len(calls) == 6
    for unit in wrapped.checkpoint_units():
        unit.checkpoint_fn = partial(torch_checkpoint, use_reentrant=True)  # reentrant: tensors positional
    wrapped(x.requires_grad_()).sum().backward()


def test_layer_of_and_num_layers():
    model = meta_model(resnet3d_variant_config("i3d_r50"))
    assert model.num_layers == 3 + 4 + 6 + 3 + 1 == 17
    assert model.layer_of("stem.conv.weight") == model.layer_of("stem.bn.bias") == 0
    assert model.layer_of("stages.0.0.conv1.weight") == 1
    assert model.layer_of("stages.0.2.bn3.weight") == 3
    assert model.layer_of("stages.1.0.shortcut_conv.weight") == 4
    assert model.layer_of("stages.2.5.conv2.weight") == 3 + 4 + 6
    assert model.layer_of("stages.3.2.bn3.bias") == 16
    assert model.layer_of("head.weight") == model.layer_of("head.bias") == 17
    assert model.layer_of("stages.3.9.conv1.weight") == 17  # no such block: the top
    layers = [model.layer_of(n) for n, _ in model.named_parameters()]
    assert layers == sorted(layers) and set(layers) == set(range(18))  # every layer, in order


def test_no_weight_decay_is_the_batchnorm_parameters():
    model = build(tiny())
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    assert len(names) == 2 * n_bn and all(params[n].ndim == 1 for n in names)
    assert "stem.bn.weight" in names and "head.bias" not in names and "stem.conv.weight" not in names


# ---------------------------------------------------------------------------------------------------
# The config


def test_config_module_imports_without_torch():
    code = ("import sys, pipeline.models.resnet3d_config as c; c.resnet3d_variant_config('i3d_r50'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_round_trips_through_json_with_tuples():
    for name in RESNET3D_VARIANTS:
        cfg = resnet3d_variant_config(name)
        back = ResNet3DConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and isinstance(back.temporal_kernels[1], tuple) and isinstance(back.stage_blocks, tuple)
        assert hash(back) == hash(cfg)
    cfg = ResNet3DConfig(mean=[0.5], std=[0.25, 0.25, 0.25], temporal_kernels=[[3], [3, 1], [3, 1], [1, 3]])
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.25,) * 3 and cfg.temporal_kernels[3] == (1, 3)


def test_fields_shared_with_timesformer_mean_the_same():
    ours = {f.name: f for f in fields(ResNet3DConfig)}
    theirs = {f.name: f for f in fields(TimeSformerConfig)}
    assert set(ours) & set(theirs) == SHARED_FIELDS  # no other TimeSformer field name is reused
    for name in SHARED_FIELDS:
        assert ours[name].type == theirs[name].type, name
        assert ours[name].default == theirs[name].default, name
    assert ResNet3DConfig().feature_dim == 2048


@pytest.mark.parametrize("overrides,message", [
    ({"depth": 12}, r"unknown model field\(s\) \['depth'\]; known fields: \[.*'stage_blocks'"),
    ({"stage_blocks": []}, r"stage_blocks=\(\): expected a non-empty list of positive block counts"),
    ({"stage_blocks": [3, 0, 6, 3]}, "stage_blocks=.*positive block counts"),
    ({"temporal_kernels": [[3], [3, 1]]}, r"temporal_kernels=.*expected 4 non-empty lists \(one per stage"),
    ({"temporal_kernels": [[3], [2], [3, 1], [1, 3]]}, "temporal_kernels=.*odd positive kernel sizes"),
    ({"stem_temporal_kernel": 4}, "stem_temporal_kernel=4: expected an odd positive kernel size"),
    ({"num_frames": 1}, "num_frames=1: expected at least temporal_pool=2 frames"),
    ({"mean": [0.4, 0.5]}, "mean=.*expected 3 finite numbers, one per input channel"),
    ({"std": [0.0]}, "std=.*expected positive numbers"),
    ({"head_dropout": 1.0}, r"head_dropout=1.0: expected a probability in \[0, 1\)"),
    ({"num_classes": -1}, "num_classes=-1: expected an integer >= 0"),
    ({"bottleneck_width": 0}, "bottleneck_width=0: expected a positive integer"),
    ({"multi_label": "yes"}, "multi_label='yes': expected true or false"),
    ({"bn_eps": 0}, "bn_eps=0: expected a small positive number"),
])
def test_bad_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        ResNet3DConfig.from_dict({**RESNET3D_VARIANTS["i3d_tiny"], **overrides}, where="test")


# ---------------------------------------------------------------------------------------------------
# Converters


def test_pyslowfast_round_trip_through_a_pyth_file(tmp_path):
    cfg = tiny(stage_blocks=(2, 1, 2, 1))
    model = build(cfg).eval()
    for m in model.modules():  # statistics and scales other than the initial ones, so a mix-up shows
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    theirs = to_pyslowfast(model.state_dict())
    # names of PySlowFast's ResNet (video_model_builder.py, stem_helper.py, resnet_helper.py, head_helper.py)
    for key in ("s1.pathway0_stem.conv.weight", "s1.pathway0_stem.bn.running_var",
                "s2.pathway0_res0.branch1.weight", "s2.pathway0_res0.branch1_bn.bias",
                "s2.pathway0_res1.branch2.a.weight", "s2.pathway0_res1.branch2.a_bn.weight",
                "s4.pathway0_res1.branch2.b.weight", "s5.pathway0_res0.branch2.c_bn.num_batches_tracked",
                "head.projection.weight", "head.projection.bias"):
        assert key in theirs, key
    assert "s2.pathway0_res1.branch1.weight" not in theirs  # identity shortcut
    assert len(theirs) == len(model.state_dict())
    path = tmp_path / "checkpoint_epoch_00010.pyth"
    torch.save({"epoch": 10, "model_state": theirs, "optimizer_state": {}, "cfg": "MODEL:\n  ARCH: i3d\n"}, path)
    fresh = load_checkpoint(build(cfg).eval(), path)
    x = torch.randn(1, 3, 4, 32, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert detect_format({"model_state": theirs}) == "pyslowfast"
    assert detect_format(model.state_dict()) == "ours"


def test_pyslowfast_names_of_the_full_i3d():
    cfg = resnet3d_variant_config("i3d_r50")
    theirs = to_pyslowfast(meta_model(cfg).state_dict())
    assert theirs["s1.pathway0_stem.conv.weight"].shape == (64, 3, 5, 7, 7)
    assert theirs["s4.pathway0_res5.branch2.a.weight"].shape == (256, 1024, 1, 1, 1)  # (3, 1) cycle: block 5 -> 1
    assert theirs["s5.pathway0_res1.branch2.a.weight"].shape == (512, 2048, 3, 1, 1)  # (1, 3) cycle: block 1 -> 3
    assert theirs["head.projection.weight"].shape == (400, 2048)
    back = from_pyslowfast({"model_state": theirs}, cfg)
    assert set(back) == set(state_shapes(cfg))


def test_converter_errors_name_missing_extra_and_misshaped_keys():
    cfg = tiny()
    theirs = to_pyslowfast(build(cfg).state_dict())
    broken = dict(theirs)
    del broken["s3.pathway0_res0.branch2.b.weight"]
    broken["s3.pathway0_nonlocal0.conv_g.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"non-local blocks.*: s3.pathway0_nonlocal0.conv_g.weight"):
        from_pyslowfast(broken, cfg)
    del broken["s3.pathway0_nonlocal0.conv_g.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): stages.1.0.conv2.weight"):
        from_pyslowfast(broken, cfg)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): stages.3.1.conv1.weight"):
        convert({**build(cfg).state_dict(), "stages.3.1.conv1.weight": torch.zeros(1)}, cfg)
    other = tiny(num_classes=7)
    with pytest.raises(CheckpointMismatchError, match=r"head.weight: checkpoint \(10, 128\) vs model \(7, 128\)"
                                                      r"(.|\n)*reset_head=True"):
        from_pyslowfast(theirs, other)
    fitted = from_pyslowfast(theirs, other, reset_head=True)
    assert fitted["head.weight"].shape == (7, 128)
    torch.testing.assert_close(fitted["stem.conv.weight"], theirs["s1.pathway0_stem.conv.weight"])
    assert "head.weight" not in convert(build(cfg).state_dict(), tiny(num_classes=0), reset_head=True)
    no_counters = {k: v for k, v in theirs.items() if not k.endswith("num_batches_tracked")}
    assert from_pyslowfast(no_counters, cfg)["stem.bn.num_batches_tracked"] == 0  # Caffe2 conversions lack them
    with pytest.raises(ValueError, match="not a 3D ResNet checkpoint.*begin blocks.0.attn"):
        detect_format({"blocks.0.attn.qkv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match="not a tensor"):
        convert({**build(cfg).state_dict(), "stem.conv.weight": 3}, cfg)


def resnet2d_state(blocks=(3, 4, 6, 3), stem=64, width=64, classes=1000, seed=0) -> dict[str, torch.Tensor]:
    """A 2D ResNet's state dict in torchvision's / timm's layout (torchvision.models.resnet.Bottleneck; timm's
    ResNet has the same keys), random weights and BatchNorm statistics, built by hand: timm is not installed."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name, c_out, c_in, k):
        state[f"{name}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) * (2 / (c_in * k * k)) ** 0.5

    def bn(name, c):
        state.update({f"{name}.weight": 1 + 0.2 * torch.randn(c, generator=g), f"{name}.bias": 0.1 * torch.randn(
            c, generator=g), f"{name}.running_mean": 0.1 * torch.randn(c, generator=g),
            f"{name}.running_var": 0.5 + torch.rand(c, generator=g), f"{name}.num_batches_tracked": torch.tensor(7)})

    conv("conv1", stem, 3, 7)
    bn("bn1", stem)
    c_in = stem
    for layer, n in enumerate(blocks, start=1):
        inner = width * 2 ** (layer - 1)
        for b in range(n):
            p = f"layer{layer}.{b}"
            conv(f"{p}.conv1", inner, c_in, 1), bn(f"{p}.bn1", inner)
            conv(f"{p}.conv2", inner, inner, 3), bn(f"{p}.bn2", inner)
            conv(f"{p}.conv3", 4 * inner, inner, 1), bn(f"{p}.bn3", 4 * inner)
            if b == 0:
                conv(f"{p}.downsample.0", 4 * inner, c_in, 1), bn(f"{p}.downsample.1", 4 * inner)
            c_in = 4 * inner
    state["fc.weight"] = 0.01 * torch.randn(classes, c_in, generator=g)
    state["fc.bias"] = torch.zeros(classes)
    return state


def resnet2d_features(state: dict[str, torch.Tensor], blocks, image: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet forward (Bottleneck with the stride on the 3x3), eval mode, pooled features."""

    def bn(x, name):
        return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], training=False, eps=1e-5)

    x = F.relu(bn(F.conv2d(image, state["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for layer, n in enumerate(blocks, start=1):
        for b in range(n):
            p, stride = f"layer{layer}.{b}", (2 if layer > 1 and b == 0 else 1)
            out = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
            out = bn(F.conv2d(out, state[f"{p}.conv3.weight"]), f"{p}.bn3")
            if f"{p}.downsample.0.weight" in state:
                x = bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + x)
    return x.mean(dim=(2, 3))


def test_resnet50_layout_inflates_into_i3d_r50():
    state = resnet2d_state()
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 25_557_032
    assert detect_format(state) == "resnet2d"  # torchvision's ResNet-50: 25,557,032 parameters
    cfg = resnet3d_variant_config("i3d_r50")
    ours = convert(state, cfg)
    meta_model(cfg).load_state_dict(ours, strict=True, assign=True)
    w2d, w3d = state["conv1.weight"], ours["stem.conv.weight"]
    assert w3d.shape == (64, 3, 5, 7, 7)
    torch.testing.assert_close(w3d.sum(dim=2), w2d)  # the I3D rule: repeated over time, divided by kt
    assert ours["stages.3.1.conv1.weight"].shape == (512, 2048, 3, 1, 1)
    torch.testing.assert_close(ours["stages.2.3.bn2.running_var"], state["layer3.3.bn2.running_var"])
    assert ours["head.weight"].shape == (400, 2048) and torch.all(ours["head.bias"] == 0)  # a fresh head
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(.*stages.3.2.conv1.weight"):
        inflate_resnet2d(resnet2d_state(blocks=(3, 4, 6, 2)), cfg)
    with pytest.raises(CheckpointMismatchError, match=r"not part of a torchvision/timm ResNet: layer1.0.se"):
        inflate_resnet2d({**state, "layer1.0.se.fc1.weight": torch.zeros(1)}, cfg)


SMALL = dict(stage_blocks=(2, 2, 2, 2), stem_width=8, bottleneck_width=4, num_classes=5)


def test_inflated_model_on_identical_frames_gives_the_image_models_features():
    """With temporal kernels of 1 every frame is the image, exactly; with I3D's kernels the frames away from the
    zero-padded ends are (the inflation's point: a 'boring video' of one image has the image's features)."""
    state = resnet2d_state(blocks=SMALL["stage_blocks"], stem=8, width=4, seed=1)
    image = torch.randn(2, 3, 64, 64)
    expected = resnet2d_features(state, SMALL["stage_blocks"], image)
    c2d = ResNet3DConfig(**SMALL, stem_temporal_kernel=1, temporal_kernels=((1,),) * 4, temporal_pool=1)
    model = load_checkpoint(build(c2d).eval(), state)
    clip = image.unsqueeze(2).expand(-1, -1, 4, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(clip), expected, rtol=1e-4, atol=1e-5)

    i3d = ResNet3DConfig(**SMALL)  # I3D's kernels: 5, (3), (3, 1), (3, 1), (1, 3), the pool after res2
    model = load_checkpoint(build(i3d).eval(), state)
    with torch.no_grad():
        fmap = model.feature_map(image.unsqueeze(2).expand(-1, -1, 32, -1, -1))
    assert fmap.shape[2] == 16
    torch.testing.assert_close(fmap[:, :, 8].mean(dim=(2, 3)), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fmap[:, :, 0].mean(dim=(2, 3)), expected, rtol=1e-4, atol=1e-5)  # the padded end


def test_our_layout_loads_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny()
    model = build(cfg).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_checkpoint(build(cfg).eval(), path)
    x = torch.randn(1, 3, 4, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown checkpoint format 'timm_vit'"):
        load_checkpoint(build(cfg), path, fmt="timm_vit")
