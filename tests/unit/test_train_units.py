"""Training pieces without a process group: rank detection, checkpoint markers, the GPU-hour account,
the launcher's dry run and refusals, the engines' optimizer setup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, batch_plan, load_recipe
from pipeline.distributed import DistEnv, expand_nodelist, group_rank_world, job_port
from pipeline.models.factory import create_model
from pipeline.train import checkpoint as ckpt
from pipeline.train.budget import GpuHours
from pipeline.train.engine import TorchEngine, build_optimizer
from pipeline.train.launch import parse_time

REPO = Path(__file__).resolve().parents[2]


def test_rank_detection_from_each_launcher(monkeypatch):
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a",
                "MASTER_PORT": "1234"}
    assert DistEnv.detect(torchrun) == DistEnv(3, 8, 1, 2, "a", 1234, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "4",
             "SLURM_JOB_NODELIST": "gpu[07-08,10],cpu1", "SLURM_JOB_ID": "98765"}
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is expanded here
    env = DistEnv.detect(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr) == (5, 8, 1, 2, "gpu07")
    assert env.master_port == job_port("98765") and env.num_nodes == 4
    stray = {**slurm, "SUBMITIT_EXECUTOR": "slurm", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "x"}
    assert DistEnv.detect(stray).rank == 5  # a launching shell's RANK does not leak into the Slurm job
    local = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1",
             "SUBMITIT_LOCAL_JOB_ID": "4242"}
    assert DistEnv.detect(local).launcher == "submitit-local" and DistEnv.detect(local).world_size == 2
    assert DistEnv.detect({}).launcher == "single"
    assert DistEnv.detect({"MASTER_PORT": "4321"}) == DistEnv.single(4321) == DistEnv(0, 1, 0, 1, "127.0.0.1", 4321,
                                                                                        "single")
    assert 0 < DistEnv.single().master_port < 65536  # a free port of its own
    assert group_rank_world() == (0, 1)  # no process group in this process
    assert expand_nodelist("n[1-3,5],gpu7") == ["n1", "n2", "n3", "n5", "gpu7"]


def test_only_complete_checkpoints_are_resumed_and_old_ones_pruned(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    for step in (10, 20, 30):
        (root / ckpt.tag_for(step)).mkdir(parents=True)
        ckpt.mark_complete(tmp_path, ckpt.tag_for(step), {"step": step})
    (root / ckpt.tag_for(40)).mkdir()  # a job killed while saving: no marker
    assert ckpt.latest_complete(tmp_path) == (30, "step000000030")
    assert ckpt.prune(tmp_path, keep=2) == ["step000000010"]
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [20, 30]
    assert (root / "step000000040").exists()  # newer than the newest complete one: maybe still being written
    assert ckpt.latest_complete(tmp_path / "nothing") is None


def test_gpu_hours_accumulate_across_attempts(tmp_path):
    first = GpuHours(tmp_path, devices=8, unit="gpu", budget=1.0)
    first.start -= 1800  # this attempt ran half an hour on 8 GPUs
    first.save()
    assert first.hours == pytest.approx(4.0, rel=1e-3) and first.exhausted
    second = GpuHours(tmp_path, devices=4, unit="gpu")
    second.start -= 900
    assert second.hours == pytest.approx(5.0, rel=1e-3)
    second.save()
    state = json.loads((tmp_path / "gpu_hours.json").read_text())
    assert len(state["attempts"]) == 2 and state["attempts"][0]["devices"] == 8


def test_time_limits_in_slurm_forms():
    assert parse_time("90") == 90 and parse_time("1:30:00") == 90 and parse_time("2-00:00:00") == 2880
    assert parse_time("10:30") == 11  # MM:SS rounds up


def launch_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "launch.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env=env)


def test_dry_run_prints_everything_and_writes_nothing(tmp_path):
    # the recipe starts from the ImageNet ViT on the Hub: an offline hub cache holds a (tiny) stand-in under its
    # name, so the dry run resolves it with the real code, as a launch on a machine with that cache would
    from tests.hub_cache import put_timm_vit

    snap = put_timm_vit(tmp_path / "hf-cache", "timm/vit_base_patch16_224.orig_in21k_ft_in1k", tmp_path)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    p = launch_cli("--nodes", "4", "--recipe", "k400_long", "--partition", "a100", "--time", "1-00:00:00",
                   "--dry-run", "--runs-dir", str(tmp_path / "runs"), "--cluster",
                   str(REPO / "configs/clusters/example_gpu.yaml"), cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert (f"init        hf-hub:timm/vit_base_patch16_224.orig_in21k_ft_in1k@{snap.name} -> "
            f"{snap.resolve()}/model.safetensors (safetensors") in out
    assert "normalised with mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5]" in out
    assert f"init: {snap.resolve()}" in out  # the ranks' path in config.yaml, the reference beside it
    assert f"init_source: hf-hub:timm/vit_base_patch16_224.orig_in21k_ft_in1k@{snap.name}" in out  # pinned
    assert "32 rank(s); global batch 64 = micro batch 2 x accumulation 1 x 32 rank(s)" in out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=a100", "#SBATCH --time=1440", "#SBATCH --signal=USR2@180", "#SBATCH --requeue",
                 "export NCCL_IB_DISABLE=0", '"stage": 2', "variant: timesformer_l"):
        assert line in out, line
    assert not (tmp_path / "runs").exists()


def test_unsatisfiable_world_and_bad_overrides_are_refused_before_anything_runs(tmp_path):
    p = launch_cli("--nodes", "3", "--recipe", "smoke", "--local", "--runs-dir", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 2 and "global_batch=8 cannot be met on 3 rank(s)" in p.stderr
    p = launch_cli("--nodes", "2", "--recipe", "smoke", "--local", "train.zero_stag=2", cwd=tmp_path)
    assert p.returncode == 2 and "unknown key 'train.zero_stag'" in p.stderr
    p = launch_cli("--nodes", "2", "--recipe", "smoke", "--local", f"data.index={tmp_path / 'none'}", cwd=tmp_path)
    assert p.returncode == 2 and "cannot be read" in p.stderr and "jobs/ingest.py" in p.stderr
    p = launch_cli("--nodes", "2", "--recipe", "smoke", "--local", "data.index=rel/ds", cwd=tmp_path)
    assert p.returncode == 2 and f"'{tmp_path / 'rel' / 'ds'}'" in p.stderr  # made absolute where launched
    assert not list(tmp_path.glob("smoke-*"))


def test_optimizer_groups_and_the_plain_engine_accumulates():
    model = create_model("timesformer_tiny", num_frames=2, num_classes=3)
    cfg = load_recipe("smoke", ["optim.name=sgd", "optim.decay_embeddings=false", "optim.weight_decay=0.5",
                                "train.engine=torch", "train.zero_stage=0", "train.micro_batch=2"])
    opt = build_optimizer(model, cfg)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[1]["weight_decay"] == 0.0
    exempt = {id(p) for p in opt.param_groups[1]["params"]}
    assert exempt == {id(model.pos_embed), id(model.time_embed), id(model.cls_token)}
    plan = batch_plan(cfg, 1)  # global 8 = micro 2 x 4 accumulation steps
    engine = TorchEngine(model, cfg, plan, per_epoch=10, device=torch.device("cpu"))
    before = model.head.weight.detach().clone()
    x, y = torch.randn(2, 3, 2, 32, 32), torch.tensor([0, 1])
    for i in range(3):
        engine.train_micro_batch(x, y)
        assert engine.global_step == 0 and torch.equal(model.head.weight, before), i
    engine.train_micro_batch(x, y)
    assert engine.global_step == 1 and not torch.equal(model.head.weight, before)


def test_gpu_recipes_take_uint8_clips_and_every_path_normalises_them_like_the_loader():
    from pipeline.data.loader import clip_config
    from pipeline.data.transforms import finish_clip
    from pipeline.train.evaluate import validate

    assert clip_config(load_recipe("k400_long")).output == "uint8"  # normalised on the GPU
    assert clip_config(load_recipe("smoke")).output == "float"
    torch.manual_seed(0)
    u8 = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)  # (B, T, C, H, W) frames
    as_uint8 = torch.stack([finish_clip(c, output="uint8") for c in u8])
    as_float = torch.stack([finish_clip(c, output="float") for c in u8])
    model = create_model("timesformer_tiny", num_frames=2, num_classes=3).eval()
    labels = torch.tensor([0, 2])
    cpu = torch.device("cpu")
    a = validate(model, torch.float32, [{"video": as_uint8, "label": labels}], cpu)
    b = validate(model, torch.float32, [{"video": as_float, "label": labels}], cpu)
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5) and a["val_top1"] == b["val_top1"]
    cfg = load_recipe("smoke", ["train.engine=torch", "train.zero_stage=0", "train.micro_batch=2",
                                "train.global_batch=2"])
    losses = []
    for video in (as_uint8, as_float):
        torch.manual_seed(1)
        m = create_model("timesformer_tiny", num_frames=2, num_classes=3)
        engine = TorchEngine(m, cfg, batch_plan(cfg, 1), per_epoch=10, device=cpu)
        losses.append(float(engine.train_micro_batch(video, labels)))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.parametrize("poison", ["nan_clip", "huge_lr"])
def test_a_diverging_run_stops_before_its_checkpoint_with_a_clear_error(tmp_path, monkeypatch, poison):
    """A non-finite loss (a broken clip) or gradient (a learning rate far too high) stops the loop at that
    step, before the step's checkpoint, so the newest checkpoint holds finite weights."""
    from types import SimpleNamespace

    from pipeline.train import loop

    overrides = ["train.engine=torch", "train.zero_stage=0", "train.micro_batch=2", "train.global_batch=2",
                 "train.ckpt_every=2", "train.val_every=100", "train.log_every=100", "optim.name=sgd",
                 "optim.grad_clip=0"]
    if poison == "huge_lr":
        overrides.append("optim.lr=1e30")
    cfg = load_recipe("smoke", overrides)
    torch.manual_seed(0)
    model = create_model("timesformer_tiny", num_frames=cfg.data.num_frames, num_classes=4)
    engine = TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=100, device=torch.device("cpu"))

    def stream(s, step):  # the data: random clips, with a NaN one at the fourth step for "nan_clip"
        def batches():
            for i in range(step, 100):
                video = torch.randn(2, 3, cfg.data.num_frames, 32, 32)
                if poison == "nan_clip" and i == 3:
                    video[1, 0, 0, 0, 0] = float("nan")
                yield {"video": video, "label": torch.tensor([0, 1])}
        return batches(), 100

    monkeypatch.setattr(loop, "_interval_stream", stream)
    saved = []
    state = loop.LoopState(cfg=cfg, engine=engine, plan=batch_plan(cfg, 1), index=None, storage=None,
                           clip=None, rank=0, world_size=1, device=torch.device("cpu"), per_epoch=100, total=10,
                           run_dir=tmp_path, sinks=None, account=SimpleNamespace(exhausted=False),
                           stop=SimpleNamespace(reason=None), save=saved.append, validate=dict)
    with pytest.raises(loop.DivergedError, match=r"step \d+: training diverged") as err:
        loop.train_loop(state)
    stopped = int(str(err.value).split(":")[0].split()[1])
    assert saved == list(range(2, stopped, 2)) and stopped not in saved  # earlier checkpoints only
    assert f"--resume {tmp_path}" in str(err.value) and "optim.lr" in str(err.value)
    if poison == "nan_clip":
        assert stopped == 4  # the fourth step's batch


def test_a_separate_head_learning_rate_and_a_frozen_backbone():
    from pipeline.train.engine import apply_freeze

    cfg = load_recipe("smoke", ["optim.name=adamw", "optim.lr=0.001", "optim.head_lr_scale=10", "train.engine=torch",
                                "train.zero_stage=0", "train.micro_batch=2", "train.global_batch=2"])
    model = create_model("timesformer_tiny", num_frames=2, num_classes=3)
    plain = load_recipe("smoke", ["optim.name=adamw", "train.engine=torch", "train.zero_stage=0"])
    assert len(build_optimizer(model, plain).param_groups) == 1  # the layout older checkpoints were saved with
    by_lr = {round(g["lr"], 9): {id(p) for p in g["params"]} for g in build_optimizer(model, cfg).param_groups}
    head = {id(model.head.weight), id(model.head.bias)}
    assert set(by_lr) == {0.001, 0.01} and by_lr[0.01] == head and head.isdisjoint(by_lr[0.001])
    # a linear probe: only the head trains, and a step moves nothing else
    assert apply_freeze(model, "backbone") == model.head.weight.numel() + model.head.bias.numel()
    frozen = load_recipe("smoke", ["train.freeze=backbone", "train.engine=torch", "train.zero_stage=0",
                                   "train.micro_batch=2", "train.global_batch=2"])
    engine = TorchEngine(model, frozen, batch_plan(frozen, 1), per_epoch=10, device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.train_micro_batch(torch.randn(2, 3, 2, 32, 32), torch.tensor([0, 1]))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"head.weight", "head.bias"}
    with pytest.raises(ConfigError, match="train.freeze='everything': expected one of none, backbone"):
        load_recipe("smoke", ["train.freeze=everything"])
