"""The fine-tuning options (docs/training.md "Fine-tuning options"), each for what it promises: the EMA is the
running average, layer decay gives each layer its rate, RandAugment treats every frame of a clip alike, mixup and
cutmix give soft targets that match what was mixed, label smoothing is the textbook loss, keep_best tests and
exports the best step's weights; all of them at once through a real (tiny) training run; and under DeepSpeed
ZeRO-2."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, batch_plan, load_recipe
from pipeline.models.factory import create_model
from pipeline.train import checkpoint as ckpt
from pipeline.train.augment import RAND_AUGMENT_OPS, BatchMixer, rand_augment
from pipeline.train.engine import TorchEngine, build_optimizer, classification_loss, consolidated_state_dict

TORCH = ["train.engine=torch", "train.zero_stage=0", "data.index=unused"]
CPU = torch.device("cpu")


def tiny(num_classes: int = 3):
    torch.manual_seed(0)
    return create_model("timesformer_tiny", num_frames=2, num_classes=num_classes, drop_path_rate=0.0)


def clips(seed: int, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


# -- config ---------------------------------------------------------------------------------------------------


def test_every_option_is_off_by_default_and_bad_values_and_combinations_are_refused():
    cfg = load_recipe("k400_long")
    t = cfg.train
    assert (t.label_smoothing, t.mixup_alpha, t.cutmix_alpha, t.ema_decay, t.keep_best) == (0.0, 0.0, 0.0, 0.0, False)
    assert cfg.optim.layer_decay == 1.0 and cfg.data.randaugment_n == 0
    refused = {
        "train.label_smoothing=1.0": r"train.label_smoothing=1.0: expected a number in \[0, 1\)",
        "optim.layer_decay=0": r"optim.layer_decay=0.0: expected a number in \(0, 1\]",
        "train.ema_decay=1.0": r"train.ema_decay=1.0: expected a number in \[0, 1\)",
        "data.randaugment_m=11": r"data.randaugment_m=11: expected a magnitude in 0..10",
        "train.mix_prob=1.5": r"train.mix_prob=1.5: expected a number in \[0, 1\]",
    }
    for override, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            load_recipe("smoke", [override])
    with pytest.raises(ConfigError, match="train.micro_batch=1 has nothing to mix with"):
        load_recipe("smoke", ["train.mixup_alpha=0.8", "train.micro_batch=1"])
    with pytest.raises(ConfigError, match="ZeRO stage 3 partitions them"):
        load_recipe("smoke", ["train.ema_decay=0.99", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match="train.val_every=-1 never validates"):
        load_recipe("smoke", ["train.keep_best=true", "train.val_every=-1"])
    with pytest.raises(ConfigError, match="mixes nothing"):
        load_recipe("smoke", ["train.cutmix_alpha=1.0", "train.mix_prob=0"])


# -- EMA ------------------------------------------------------------------------------------------------------


def test_the_ema_is_the_running_average_of_the_weights_and_is_evaluated_saved_and_resumed(tmp_path):
    decay = 0.75
    cfg = load_recipe("smoke", [*TORCH, "train.micro_batch=2", "train.global_batch=2", f"train.ema_decay={decay}",
                                "optim.lr=0.01"])
    model = tiny()
    engine = TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=100, device=CPU)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the average starts at the start
    for step in range(4):
        engine.train_micro_batch(*clips(step))
        for k, v in model.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v.detach()
    got = engine.ema.state_dict()
    assert engine.ema.updates == 4
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k
    assert not torch.allclose(got["head.weight"], trained["head.weight"])  # an average, not the last weights
    with engine.eval_module(ema=True) as (module, _):  # the average in the weights' place, for evaluation
        assert all(torch.equal(v, got[k]) for k, v in module.state_dict().items())
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # and the weights back, exactly

    engine.save(tmp_path, "step000000004", {"step": 4})
    assert (tmp_path / "step000000004" / "ema.safetensors").exists()
    for k, v in consolidated_state_dict(tmp_path, "step000000004", ema=True).items():
        assert torch.equal(v, got[k]), k
    resumed = TorchEngine(tiny(), cfg, batch_plan(cfg, 1), per_epoch=100, device=CPU)
    resumed.load(tmp_path, "step000000004")
    assert resumed.ema.updates == 4 and all(torch.equal(v, got[k]) for k, v in resumed.ema.state_dict().items())
    engine.train_micro_batch(*clips(9))  # the resumed average continues exactly as the uninterrupted one
    resumed.train_micro_batch(*clips(9))
    for k, v in engine.ema.state_dict().items():
        assert torch.allclose(resumed.ema.state_dict()[k], v, atol=1e-6), k


# -- layer decay ----------------------------------------------------------------------------------------------


def test_layer_decay_gives_each_layer_lr_times_decay_to_the_distance_from_the_top():
    model = tiny()  # depth 2: embeddings = layer 0, blocks 1 and 2, norm and head = 3 (the top)
    cfg = load_recipe("smoke", [*TORCH, "optim.lr=0.01", "optim.layer_decay=0.5", "optim.head_lr_scale=10",
                                "optim.decay_embeddings=false"])
    opt = build_optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    expected_layer = {"cls_token": 0, "pos_embed": 0, "time_embed": 0, "patch_embed.proj.weight": 0,
                      "blocks.0.attn.qkv.weight": 1, "blocks.1.mlp.fc2.bias": 2, "norm.weight": 3, "head.weight": 3}
    named = dict(model.named_parameters())
    for name, layer in expected_layer.items():
        head = 10 if name.startswith("head.") else 1
        assert lr_of[id(named[name])] == pytest.approx(0.01 * 0.5 ** (3 - layer) * head), name
    for name, p in named.items():  # every parameter, in one group, at its layer's rate
        layer = 0 if name.startswith(("cls_token", "pos_embed", "time_embed", "patch_embed")) else \
            int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 3
        assert lr_of[id(p)] == pytest.approx(0.01 * 0.5 ** (3 - layer) * (10 if name.startswith("head.") else 1))
    assert decay_of[id(model.pos_embed)] == 0.0
    assert decay_of[id(model.blocks[0].attn.qkv.weight)] == cfg.optim.weight_decay
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    # off: the layout older checkpoints were saved with (one group); a linear probe: the head only, at the top rate
    assert len(build_optimizer(model, load_recipe("smoke", TORCH)).param_groups) == 1
    frozen = load_recipe("smoke", [*TORCH, "optim.layer_decay=0.5", "train.freeze=backbone"])
    from pipeline.train.engine import apply_freeze

    apply_freeze(model, "backbone")
    groups = build_optimizer(model, frozen).param_groups
    assert [g["lr"] for g in groups] == [frozen.optim.lr]
    # the schedule scales every group alike, and the engine reports the base rate
    warm = load_recipe("smoke", [*TORCH, "optim.lr=0.01", "optim.layer_decay=0.5", "optim.warmup_epochs=1",
                                 "train.micro_batch=2", "train.global_batch=2"])
    engine = TorchEngine(tiny(), warm, batch_plan(warm, 1), per_epoch=4, device=CPU)
    engine.train_micro_batch(*clips(0))
    lrs = sorted({round(g["lr"], 12) for g in engine.optimizer.param_groups})
    assert lrs == pytest.approx([0.01 * 0.5 / 8, 0.01 * 0.5 / 4, 0.01 * 0.5 / 2, 0.01 * 0.5])  # warm-up at 2/4
    assert engine.lr == pytest.approx(0.01 * 0.5)


# -- RandAugment ----------------------------------------------------------------------------------------------


def test_rand_augment_applies_the_same_ops_to_every_frame_and_draws_other_ops_for_other_clips():
    g = torch.Generator().manual_seed(0)
    frame = torch.randint(40, 200, (1, 3, 24, 32), dtype=torch.uint8, generator=g)  # not the full range:
    frame[..., :8, :] //= 2  # autocontrast and equalize have something to do
    clip = frame.expand(4, 3, 24, 32).contiguous()  # four identical frames
    for name, op in RAND_AUGMENT_OPS.items():
        out = op(clip, 0.9)
        assert out.dtype == torch.uint8 and out.shape == clip.shape, name
        assert all(torch.equal(out[0], out[t]) for t in range(4)), name
        assert not torch.equal(out, clip), f"{name} changed nothing at magnitude 9"
    outputs = []
    for seed in range(6):
        out = rand_augment(clip, 2, 9, np.random.default_rng(seed))
        assert all(torch.equal(out[0], out[t]) for t in range(4)), seed
        outputs.append(out)
    assert len({o.numpy().tobytes() for o in outputs}) == 6  # other draws, other clips
    # a clip whose frames differ gets one mapping: equalize's lookup table is the clip's, not each frame's
    moving = torch.stack([torch.roll(frame[0], shifts=3 * t, dims=-1) for t in range(4)])
    eq = RAND_AUGMENT_OPS["equalize"](moving, 0.9)
    for t in range(4):
        assert torch.equal(eq[t], torch.roll(eq[0], shifts=3 * t, dims=-1))


def test_the_loaders_train_transform_runs_rand_augment_on_uint8_and_leaves_the_stream_alone_when_off():
    from pipeline.data.transforms import TrainTransform

    frames = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 40, 48, 3), dtype=np.uint8), 4, axis=0)
    plain = TrainTransform(crop=32, scale=(32, 40), output="uint8")
    augmented = TrainTransform(crop=32, scale=(32, 40), output="uint8", randaugment=(3, 9))
    a = plain(frames, np.random.default_rng(1))
    b = TrainTransform(crop=32, scale=(32, 40), output="uint8", randaugment=(0, 9))(frames, np.random.default_rng(1))
    assert torch.equal(a, b)  # off: the same clip as before the option existed
    c = augmented(frames, np.random.default_rng(1))
    assert c.dtype == torch.uint8 and c.shape == a.shape and not torch.equal(a, c)
    assert all(torch.equal(c[:, 0], c[:, t]) for t in range(4))  # (C, T, H, W): every frame alike
    from pipeline.data.loader import clip_config

    assert clip_config(load_recipe("smoke", ["data.randaugment_n=2", "data.randaugment_m=7"])).randaugment == (2, 7)


# -- mixup / cutmix / label smoothing ---------------------------------------------------------------------------


def test_cutmix_pastes_one_box_on_every_frame_and_its_lambda_is_the_box_area():
    B, C, T, H, W = 4, 3, 5, 16, 20
    video = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1, 1).expand(B, C, T, H, W).contiguous()
    label = torch.tensor([0, 1, 2, 3])
    mixer = BatchMixer(0.0, 1.0)
    seen = 0
    for seed in range(8):
        out, target = mixer(video, label, 5, False, np.random.default_rng(seed))
        assert mixer.last["kind"] == "cutmix"
        lam = mixer.last["lam"]
        for i in range(B):
            pasted = out[i] != i  # where clip i shows its partner, clip B - 1 - i
            assert torch.equal(out[i][pasted], torch.full_like(out[i][pasted], B - 1 - i))
            assert all(torch.equal(pasted[c, t], pasted[0, 0]) for c in range(C) for t in range(T))  # one box
            share = float(pasted[0, 0].sum()) / (H * W)
            assert 1 - lam == pytest.approx(share)
            seen += share > 0
            expected = torch.zeros(5)
            expected[label[i]] += lam
            expected[label[B - 1 - i]] += 1 - lam
            assert torch.allclose(target[i], expected)
        assert torch.allclose(target.sum(-1), torch.ones(B))
    assert seen  # some boxes were not empty


def test_mixup_mixes_clips_and_targets_with_one_lambda_and_multi_label_targets_mix_alike():
    video, label = clips(0, n=4)
    mixer = BatchMixer(0.8, 0.0, smoothing=0.1)
    out, target = mixer(video, label, 3, False, np.random.default_rng(3))
    lam = mixer.last["lam"]
    assert mixer.last["kind"] == "mixup" and 0 < lam < 1
    assert torch.allclose(out, lam * video + (1 - lam) * video.flip(0))
    smooth = F.one_hot(label, 3).float() * 0.9 + 0.1 / 3
    assert torch.allclose(target, lam * smooth + (1 - lam) * smooth.flip(0))
    assert torch.allclose(target.sum(-1), torch.ones(4))
    multi = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    _, mixed = BatchMixer(0.8, 0.0)(video, multi, 3, True, np.random.default_rng(3))
    assert torch.allclose(mixed, lam * multi + (1 - lam) * multi.flip(0))
    switch = BatchMixer(1.0, 1.0, switch_prob=0.5)
    kinds = {(switch(video, label, 3, False, np.random.default_rng(s)), switch.last["kind"])[1] for s in range(20)}
    assert kinds == {"mixup", "cutmix"}
    never = BatchMixer(1.0, 0.0, prob=0.0)
    same, hard = never(video, label, 3, False, np.random.default_rng(0))
    assert never.last["kind"] == "none" and torch.equal(same, video) and torch.equal(hard, F.one_hot(label, 3).float())


def test_label_smoothing_loss_is_the_hand_computed_one():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    label = torch.tensor([0, 1])
    e, C = 0.2, 3
    logp = torch.log_softmax(logits, -1)
    by_hand = -sum(((1 - e) * (c == int(label[i])) + e / C) * float(logp[i, c]) for i in range(2) for c in range(C)) / 2
    assert float(classification_loss(logits, label, False, e)) == pytest.approx(by_hand, rel=1e-6)
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    target = [[(1 - e) * float(multi[i, c]) + e / 2 for c in range(C)] for i in range(2)]
    sig = torch.sigmoid(logits)
    bce = -sum(target[i][c] * math.log(sig[i, c]) + (1 - target[i][c]) * math.log(1 - sig[i, c])
               for i in range(2) for c in range(C)) / 6
    assert float(classification_loss(logits, multi, True, e)) == pytest.approx(bce, rel=1e-6)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5]])  # mixed targets (the mixer smoothed them already)
    assert float(classification_loss(logits, soft, False)) == pytest.approx(float(-(soft * logp).sum(-1).mean()))


# -- keep_best ------------------------------------------------------------------------------------------------


def run_loop_with_validations(tmp_path: Path, cfg, scores: list[float]):
    """The real loop and checkpoints (torch engine) over random batches, with a fake validation that returns
    ``scores`` in turn; returns the engine and the weights each saved step had."""
    from pipeline.models.timesformer import TimeSformer, model_config
    from pipeline.train import loop

    torch.manual_seed(0)
    model = TimeSformer(model_config(cfg))
    engine = TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=100, device=CPU)
    saved: dict[int, dict[str, torch.Tensor]] = {}

    def save(step: int) -> None:
        engine.save(ckpt.checkpoint_root(tmp_path), ckpt.tag_for(step), {"step": step})
        ckpt.mark_complete(tmp_path, ckpt.tag_for(step), {"step": step})
        ckpt.prune(tmp_path, cfg.train.keep_checkpoints)
        saved[step] = {k: v.detach().clone() for k, v in (engine.ema.state_dict() if engine.ema else
                                                         model.state_dict()).items()}

    def stream(s, step):
        return ({"video": clips(i)[0], "label": clips(i)[1]} for i in range(step, 100)), s.total

    values = iter(scores)
    key = "val_top1_ema" if cfg.train.ema_decay else "val_top1"
    state = loop.LoopState(cfg=cfg, engine=engine, plan=batch_plan(cfg, 1), index=None, storage=None, clip=None,
                           rank=0, world_size=1, device=CPU, per_epoch=100, total=2 * len(scores), run_dir=tmp_path,
                           sinks=SimpleNamespace(log_metrics=lambda *a: None), account=SimpleNamespace(
                               exhausted=False, hours=0.0, save=lambda: None), stop=SimpleNamespace(reason=None),
                           save=save, validate=lambda: {key: next(values), "val_clips": 4.0}, batches=stream)
    assert loop.train_loop(state) == "done"
    return engine, saved


@pytest.mark.parametrize("ema", [False, True])
def test_keep_best_keeps_tests_and_exports_the_best_validated_step(tmp_path, ema):
    from pipeline.models.convert import load_safetensors
    from pipeline.train.export import export_model
    from pipeline.train.loop import final_weights

    cfg = load_recipe("smoke", [*TORCH, "train.micro_batch=2", "train.global_batch=2", "train.val_every=2",
                                "train.ckpt_every=100", "train.keep_checkpoints=1", "train.keep_best=true",
                                "train.log_every=100", "optim.lr=0.01", "data.num_frames=2", "data.crop=16",
                                "data.scale=[16,20]", "model.num_classes=3", "model.drop_path_rate=0",
                                *(["train.ema_decay=0.5"] if ema else [])])
    engine, saved = run_loop_with_validations(tmp_path, cfg, [10.0, 50.0, 30.0, 20.0])
    assert sorted(saved) == [2, 4, 8]  # each new best (steps 2, 4) and the last step, whatever ckpt_every says
    kept = [step for step, _ in ckpt.complete_checkpoints(tmp_path)]
    assert kept == [4, 8]  # keep_checkpoints=1 keeps the newest, and the best besides
    record = ckpt.best_checkpoint(tmp_path)
    assert record["step"] == 4 and record["value"] == 50.0 and record["metric"] == ("val_top1_ema" if ema else
                                                                                   "val_top1")
    final = final_weights(engine, tmp_path, cfg)
    assert (final["step"], final["tag"], final["ema"]) == (4, ckpt.tag_for(4), ema)
    with engine.eval_module(ema=ema) as (module, _):  # what the test protocol scores: the best step's weights
        assert all(torch.equal(v, saved[4][k]) for k, v in module.state_dict().items())
    exported = load_safetensors(export_model(tmp_path, cfg))
    for k, v in exported.state_dict().items():
        assert torch.equal(v, saved[4][k]), k
    assert not torch.equal(saved[4]["head.weight"], saved[8]["head.weight"])


# -- all at once, through a real run --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_run_with_every_option_on_trains_validates_tests_and_exports(tmp_path):
    """The launcher, one local rank, the shard loader (RandAugment in its workers), the torch engine with layer
    decay, mixup/cutmix, label smoothing and the EMA, validation of both weights, keep_best, the test protocol
    and the export."""
    from pipeline.models.convert import load_safetensors
    from pipeline.train.launch import LaunchRequest, launch
    from tests.synthetic_data import write_dataset

    write_dataset(str(tmp_path / "ds"), "colour", per_class={"train": 2, "val": 1})
    options = ["data.randaugment_n=2", "data.randaugment_m=9", "train.label_smoothing=0.1", "train.mixup_alpha=0.8",
               "train.cutmix_alpha=1.0", "optim.layer_decay=0.75", "train.ema_decay=0.9", "train.keep_best=true"]
    info = launch(LaunchRequest(recipe="smoke", nodes=1, local=True, name="all-options", runs_dir=str(tmp_path),
                                overrides=[f"data.index={tmp_path / 'ds'}", *TORCH[:2], "train.max_steps=4",
                                           "train.val_every=2", "train.ckpt_every=4", "train.log_every=2",
                                           "train.activation_checkpointing=none", "test.temporal_clips=1",
                                           "test.spatial_crops=1", "tracking.register=false", *options]),
                  out=lambda *a: None)
    result = next(r for r in info["job"].results() if r["rank"] == 0)
    run = Path(info["run_dir"])
    assert result["outcome"] == "done", result
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_top1" in r]
    assert [r["step"] for r in val] == [2, 4] and all("val_top1_ema" in r for r in val)
    best = ckpt.best_checkpoint(run)
    assert best is not None and result["weights_step"] == best["step"] and result["weights"] == "ema"
    assert json.loads((run / "eval" / "test.json").read_text())["weights"] == {"step": best["step"], "ema": True,
                                                                                "best": True}
    exported = load_safetensors(Path(result["export"]))
    for k, v in consolidated_state_dict(ckpt.checkpoint_root(run), best["tag"], ema=True).items():
        assert torch.equal(exported.state_dict()[k], v), k


# -- DeepSpeed ZeRO-2 -----------------------------------------------------------------------------------------


def test_layer_decay_and_the_ema_under_deepspeed_zero2(deepspeed_rank, tmp_path):
    """One rank, gloo: DeepSpeed's ZeRO-2 optimizer keeps each layer's rate, and the EMA follows the weights
    ZeRO writes back after each step (its average by hand), saved and read back with the checkpoint."""
    from pipeline.models.timesformer import TimeSformer, model_config
    from pipeline.train.engine import DeepSpeedEngine

    decay = 0.5
    cfg = load_recipe("smoke", ["data.index=unused", "train.engine=deepspeed", "train.zero_stage=2",
                                "train.micro_batch=2", "train.global_batch=2", "data.num_frames=2", "data.crop=16",
                                "model.drop_path_rate=0.0", "optim.lr=0.01", "optim.layer_decay=0.5",
                                f"train.ema_decay={decay}"])
    torch.manual_seed(0)
    model = TimeSformer(model_config(cfg))
    engine = DeepSpeedEngine(model, cfg, batch_plan(cfg, 1), per_epoch=100,
                             model_factory=lambda: TimeSformer(model_config(cfg)))
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # inside ZeRO's wrapper
    top = len(model.blocks) + 1
    # ZeRO-2 holds each group as a flat fp32 partition: every layer's rate is there, group by group
    layers = sorted({round(g["lr"] / 0.01, 9) for g in base.param_groups})
    assert layers == pytest.approx(sorted(0.5 ** (top - layer) for layer in range(top + 1)))
    expected = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    for step in range(3):
        video, label = clips(step)
        engine.train_micro_batch(torch.randint(0, 256, video.shape, dtype=torch.uint8), label)
        for k, v in engine.module.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v.detach().float()
    assert engine.global_step == 3 and engine.ema.updates == 3
    for k, v in engine.ema.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    engine.save(tmp_path, "step000000003", {"step": 3})
    for k, v in consolidated_state_dict(tmp_path, "step000000003", ema=True).items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    assert engine.lr == pytest.approx(0.01)


@pytest.mark.integration
@pytest.mark.slow
def test_two_deepspeed_zero2_ranks_train_with_every_option_and_export_the_best_ema(tmp_path):
    """The 2-rank local path of tests/integration/test_train.py (DeepSpeed on gloo): ZeRO-2's saved optimizer
    holds each layer's rate, every checkpoint holds the EMA, and the export is the best checkpoint's EMA."""
    from pipeline.models.convert import load_safetensors
    from pipeline.train.engine import load_deepspeed_file
    from tests.integration.test_train import SHORT, run_local
    from tests.synthetic_data import write_dataset

    write_dataset(str(tmp_path / "ds"), "colour")
    info = run_local(tmp_path, "zero2-options", str(tmp_path / "ds"), SHORT + [
        "train.max_steps=4", "train.ckpt_every=2", "train.val_every=2", "train.zero_stage=2", "optim.layer_decay=0.75",
        "train.ema_decay=0.9", "train.keep_best=true", "train.label_smoothing=0.1", "train.mixup_alpha=0.8",
        "train.cutmix_alpha=1.0", "data.randaugment_n=2", "tracking.register=false"])
    result = next(r for r in info["results"] if r["rank"] == 0)
    run = Path(info["run_dir"])
    assert result["outcome"] == "done" and result["weights"] == "ema", result
    shard = load_deepspeed_file(run / "checkpoints" / ckpt.tag_for(4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    lrs = [g["lr"] for g in shard["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]]
    assert lrs == pytest.approx([0.001 * 0.75 ** k for k in (3, 2, 1, 0)])  # smoke: lr 0.001, 2 blocks, no schedule
    best = ckpt.best_checkpoint(run)
    assert result["weights_step"] == best["step"]
    exported = load_safetensors(Path(result["export"]))
    for k, v in consolidated_state_dict(ckpt.checkpoint_root(run), best["tag"], ema=True).items():
        assert torch.equal(exported.state_dict()[k], v), k
