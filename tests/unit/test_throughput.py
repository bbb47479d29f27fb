"""What makes training fast, checked on a CPU: the loop's per-step checks read a step late and only make the
host wait on steps that log, validate or save; ``auto`` activation checkpointing takes the cheapest policy that
fits; compiled blocks compute what eager blocks do and share one graph whatever their drop-path rates; the
utilisation metrics are named for what they count. The GPU side (memory measured on the device, compiled
blocks on CUDA) is in test_gpu.py; the numbers are benchmarks/train_loop.py's."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import ConfigError, batch_plan, load_recipe
from pipeline.models.factory import create_model
from pipeline.models.timesformer import TimeSformer, variant_config
from pipeline.train import loop
from pipeline.train.engine import TorchEngine
from pipeline.train.loop import StepChecks
from pipeline.train.parallelize import AUTO_ORDER, choose_policy, compile_blocks, prepare_model, resolve_checkpointing

CPU = torch.device("cpu")


def submit(checks: StepChecks, step: int, *, preempted=False, loss=1.0, norm=1.0) -> None:
    checks.submit(step, preempted, False, False, False, loss=torch.tensor(loss), norm=torch.tensor(norm))


def test_step_checks_answer_a_step_late_unless_asked_now_and_remember_divergence():
    checks = StepChecks(CPU)
    submit(checks, 1)
    assert checks.verdict(now=False) is None  # the first step has nothing earlier to read
    submit(checks, 2, preempted=True)
    v1 = checks.verdict(now=False)
    assert (v1.step, v1.stopping, v1.diverged) == (1, False, False)
    submit(checks, 3, norm=float("inf"))
    v2 = checks.verdict(now=False)
    assert (v2.step, v2.preempted, v2.diverged) == (2, True, False)
    v3 = checks.verdict(now=True)
    assert (v3.step, v3.diverged) == (3, True)
    submit(checks, 4)
    assert checks.verdict(now=True).diverged  # sticky: every later answer says so
    other = StepChecks(CPU)
    submit(other, 1, norm=-1.0)  # DeepSpeed reports an invalid norm as -1
    assert other.verdict(now=True).diverged


class FakeEngine:
    """The engine interface the loop uses; each step's loss is what ``losses`` says (default 1)."""

    def __init__(self, losses=None):
        self.global_step, self.lr, self.losses = 0, 0.1, losses or {}

    def train_micro_batch(self, video, label):
        self.global_step += 1
        return torch.tensor(self.losses.get(self.global_step, 1.0))

    def grad_norm(self):
        return 1.0

    def grad_norm_tensor(self):
        return torch.tensor(1.0)


def loop_state(tmp_path, engine, stop, saved, overrides=(), total=40):
    cfg = load_recipe("smoke", ["train.micro_batch=2", "train.global_batch=2", "train.log_every=10",
                                "train.ckpt_every=10", "train.val_every=-1", *overrides])

    def stream(s, step):
        def batches():
            while True:
                yield {"video": torch.zeros(2, 3, 1, 1, 1), "label": torch.tensor([0, 1])}
        return batches(), min((step // 10 + 1) * 10, s.total)

    return loop.LoopState(cfg=cfg, engine=engine, plan=batch_plan(cfg, 1), index=None, storage=None, clip=None,
                          rank=0, world_size=1, device=CPU, per_epoch=100, total=total, run_dir=tmp_path,
                          sinks=SimpleNamespace(log_metrics=lambda m, step: None),
                          account=SimpleNamespace(exhausted=False, hours=0.0, save=lambda: None), stop=stop,
                          save=saved.append, validate=dict, batches=stream)


def test_the_loop_waits_for_the_device_only_on_steps_that_log_or_save(tmp_path, monkeypatch):
    asked = []
    real = StepChecks.verdict

    def spy(self, now):
        asked.append(now)
        return real(self, now)

    monkeypatch.setattr(StepChecks, "verdict", spy)
    saved: list[int] = []
    assert loop.train_loop(loop_state(tmp_path, FakeEngine(), SimpleNamespace(reason=None), saved)) == "done"
    waited = [step for step, now in enumerate(asked, start=1) if now]
    assert waited == [10, 20, 30, 40] and saved == [10, 20, 30, 40]  # the other 36 steps read a step late


def test_a_signal_between_checkpoints_stops_at_the_next_step_with_a_checkpoint(tmp_path):
    class Engine(FakeEngine):
        def train_micro_batch(self, video, label):
            if self.global_step == 12:  # the signal arrives during step 13
                stop.reason = "preempted"
            return super().train_micro_batch(video, label)

    stop = SimpleNamespace(reason=None)
    saved: list[int] = []
    assert loop.train_loop(loop_state(tmp_path, Engine(), stop, saved)) == "preempted"
    assert saved == [10, 14]  # step 13 raised the flag, step 14 read it and saved where it stood


@pytest.mark.parametrize("bad_step", [13, 20])
def test_a_non_finite_loss_between_checkpoints_never_reaches_one(tmp_path, bad_step):
    saved: list[int] = []
    state = loop_state(tmp_path, FakeEngine({bad_step: float("nan")}), SimpleNamespace(reason=None), saved)
    with pytest.raises(loop.DivergedError, match=rf"at or before step {bad_step}\b"):
        loop.train_loop(state)
    assert saved == [10]  # step 20's checkpoint is never written after a NaN at 13 (or at 20 itself)


def test_the_metrics_name_model_and_hardware_flops_utilisation(tmp_path):
    logged = []
    state = loop_state(tmp_path, FakeEngine(), SimpleNamespace(reason=None), [], total=10)
    state.sinks = SimpleNamespace(log_metrics=lambda m, step: logged.append(m))
    state.flops_per_clip, state.hardware_flops_per_clip, state.peak_tflops = 3e12, 4e12, 100.0
    loop.train_loop(state)
    m = logged[-1]
    assert m["hfu"] == pytest.approx(m["mfu"] * 4 / 3) and m["mfu"] == pytest.approx(
        m["clips_per_s"] * 3e12 / 1e12 / 100.0)


def test_auto_checkpointing_takes_the_first_policy_that_fits_and_full_when_none_does():
    peaks = {"none": 90, "selective": None, "every_4": 60, "every_3": 50, "every_2": 40, "full": 20}  # None: OOM
    measured = []

    def measure(policy):
        measured.append(policy)
        return peaks[policy]

    assert choose_policy(measure, capacity=70, reserve=5) == ("every_4", {"none": 90, "selective": None,
                                                                          "every_4": 60})
    assert measured == ["none", "selective", "every_4"]  # cheapest first; stops at the first fit
    assert choose_policy(measure, capacity=10, reserve=0)[0] == "full"  # nothing fits: the least memory
    assert choose_policy(measure, capacity=100, reserve=0)[0] == "none"
    assert AUTO_ORDER[0] == "none" and AUTO_ORDER[-1] == "full"


def test_auto_on_a_cpu_is_none_and_a_named_policy_is_kept(caplog):
    build = lambda: create_model("timesformer_tiny")  # noqa: E731
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        assert resolve_checkpointing("auto", build, 2, (3, 4, 32, 32), 10, CPU, torch.float32, 0.9) == "none"
    assert "no device memory" in caplog.text
    assert resolve_checkpointing("every_2", build, 2, (3, 4, 32, 32), 10, CPU, torch.float32, 0.9) == "every_2"


def test_the_new_train_settings_are_checked():
    cfg = load_recipe("smoke", ["train.activation_checkpointing=auto", "train.compile=blocks",
                                "train.memory_fraction=0.8"])
    assert (cfg.train.activation_checkpointing, cfg.train.compile, cfg.train.memory_fraction) == ("auto", "blocks", 0.8)
    with pytest.raises(ConfigError, match="train.compile"):
        load_recipe("smoke", ["train.compile=everything"])
    with pytest.raises(ConfigError, match="train.memory_fraction"):
        load_recipe("smoke", ["train.memory_fraction=1.5"])
    for name in ("k400_base", "k400_hr", "k400_long"):  # the GPU recipes measure and compile
        t = load_recipe(name).train
        assert (t.activation_checkpointing, t.compile) == ("auto", "blocks")


def test_compile_is_left_out_under_zero3_with_a_warning(caplog):
    cfg = load_recipe("smoke", ["train.compile=blocks", "train.zero_stage=3", "train.activation_checkpointing=full"])
    model = create_model("timesformer_tiny")
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        assert prepare_model(model, cfg, CPU, build=lambda: create_model("timesformer_tiny"), micro_batch=2) == "full"
    assert "ZeRO-3" in caplog.text and all(getattr(b, "_compiled_call_impl", None) is None for b in model.blocks)


def test_compiled_blocks_compute_what_eager_blocks_do_and_share_one_graph():
    """Blocks with different drop-path rates share one compiled graph (the rate is an input, not a constant)
    and, without random draws, give the eager model's outputs and gradients."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = variant_config("timesformer_tiny", depth=4, drop_path_rate=0.3)
    torch.manual_seed(0)
    eager = TimeSformer(cfg)
    compiled = TimeSformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    x = torch.randn(2, 3, 4, 32, 32)
    compiled.train()
    compiled(x).sum().backward()  # training: drop-path on, a rate per block
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    compiled.zero_grad()
    eager.eval(), compiled.eval()
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    torch.testing.assert_close(compiled.blocks[2].mlp.fc1.weight.grad, eager.blocks[2].mlp.fc1.weight.grad,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compiled.blocks[2].temporal_attn.qkv.weight.grad,
                               eager.blocks[2].temporal_attn.qkv.weight.grad, atol=1e-5, rtol=1e-4)


def test_patch_embedding_as_a_matrix_product_is_the_convolution():
    from pipeline.models.timesformer import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(16, 3, 32)
    for shape in [(2, 3, 4, 32, 32), (1, 3, 2, 40, 36)]:  # the second leaves pixels past the last patch
        x = torch.randn(*shape)
        B, C, T, H, W = shape
        tokens, grid = embed(x)
        conv = embed.proj(x.transpose(1, 2).reshape(B * T, C, H, W))
        assert grid == tuple(conv.shape[-2:])
        torch.testing.assert_close(tokens, conv.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
        grad_ours = torch.autograd.grad(tokens.square().sum(), embed.proj.weight)[0]
        grad_conv = torch.autograd.grad(conv.square().sum(), embed.proj.weight)[0]
        torch.testing.assert_close(grad_ours, grad_conv, atol=1e-4, rtol=1e-4)


def test_the_torch_engine_keeps_its_gradient_norm_on_the_device():
    cfg = load_recipe("smoke", ["train.engine=torch", "train.zero_stage=0", "train.micro_batch=2"])
    engine = TorchEngine(create_model("timesformer_tiny", num_classes=4), cfg, batch_plan(cfg, 1), per_epoch=10,
                         device=CPU)
    for _ in range(batch_plan(cfg, 1).grad_accum):
        engine.train_micro_batch(torch.randn(2, 3, 4, 32, 32), torch.tensor([0, 1]))
    norm = engine.grad_norm_tensor()
    assert isinstance(norm, torch.Tensor) and norm.ndim == 0 and engine.grad_norm() == pytest.approx(float(norm))
    from pipeline.train.engine import DeepSpeedEngine, Engine

    assert isinstance(engine, Engine)  # the declared interface, which both engines implement
    missing = [n for n in dir(Engine) if not n.startswith("_") and not hasattr(DeepSpeedEngine, n)]
    assert not missing, missing


def test_a_stop_read_a_step_late_checks_the_step_it_saves(tmp_path):
    """The signal arrives in step 13 and is read after step 14, which is the step saved: had step 14 gone
    non-finite, its checkpoint must not be written."""
    class Engine(FakeEngine):
        def train_micro_batch(self, video, label):
            if self.global_step == 12:
                stop.reason = "preempted"
            return super().train_micro_batch(video, label)

    stop = SimpleNamespace(reason=None)
    saved: list[int] = []
    with pytest.raises(loop.DivergedError, match=r"at or before step 14\b"):
        loop.train_loop(loop_state(tmp_path, Engine({14: float("nan")}), stop, saved))
    assert saved == [10]


def test_hardware_flops_count_the_share_of_the_forward_a_policy_recomputes():
    from pipeline.models.flops import flops_per_view, training_flops_per_clip
    from pipeline.train.parallelize import recompute_fraction

    assert [recompute_fraction(p, 12) for p in ("none", "selective", "full", "every_2", "every_5")] == [
        0.0, 0.0, 1.0, 0.5, 3 / 12]  # every_5 checkpoints blocks 0, 5 and 10
    cfg = variant_config("timesformer_tiny")
    fwd = flops_per_view(cfg)
    assert training_flops_per_clip(cfg, recompute_forward=0.5) == 3 * fwd + round(fwd / 2)


def test_a_step_whose_verdict_was_not_read_still_counts_when_the_next_is_read_at_once():
    """bad_data is a ratio that can fall back under its ceiling a step later: a flag raised at step 1 and
    never read on its own must still be in the verdict read at once at step 2."""
    checks = StepChecks(CPU)
    checks.submit(1, False, False, False, True, loss=torch.tensor(1.0), norm=torch.tensor(1.0))
    checks.submit(2, False, False, False, False, loss=torch.tensor(1.0), norm=torch.tensor(1.0))
    v = checks.verdict(now=True)
    assert v.step == 2 and v.bad_data


def test_a_reduced_precision_torch_engine_evaluates_under_autocast_and_resume_keeps_its_optimizer(tmp_path):
    cfg = load_recipe("smoke", ["train.engine=torch", "train.zero_stage=0", "train.micro_batch=2",
                                "train.global_batch=2", "train.precision=bf16"])
    engine = TorchEngine(create_model("timesformer_tiny", num_classes=4), cfg, batch_plan(cfg, 1), per_epoch=10,
                         device=CPU)
    with engine.eval_module() as (module, dtype):
        assert dtype == torch.float32  # fed float32 clips; the matmuls run in bf16
        assert module(torch.randn(1, 3, 4, 32, 32)).dtype == torch.bfloat16
    engine.train_micro_batch(torch.randn(2, 3, 4, 32, 32), torch.tensor([0, 1]))
    engine.save(tmp_path, "step1", {})
    state = torch.load(tmp_path / "step1" / "torch_engine.pt", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["foreach"] = "from an older checkpoint"  # what a checkpoint of another implementation carries
    torch.save(state, tmp_path / "step1" / "torch_engine.pt")
    resumed = TorchEngine(create_model("timesformer_tiny", num_classes=4), cfg, batch_plan(cfg, 1), per_epoch=10,
                          device=CPU)
    chosen = [g.get("foreach") for g in resumed.optimizer.param_groups]
    resumed.load(tmp_path, "step1")
    assert [g.get("foreach") for g in resumed.optimizer.param_groups] == chosen


def test_progress_lines_say_where_the_run_stands_and_wait_follows_them(tmp_path, capsys):
    from pipeline.cli.launch import LogFollower

    assert loop.format_duration(3.4) == "3s" and loop.format_duration(247) == "4m07s"
    assert loop.format_duration(3900) == "1h05m" and loop.format_duration(93600) == "1d02h"
    account = SimpleNamespace(hours=0.5, budget=2.0, unit="gpu")
    assert loop.progress_note(25, 100, 2.0, account) == " | 25% eta 2m30s | 0.5 of 2 gpu-hours"
    assert loop.progress_note(100, 100, 2.0, SimpleNamespace(hours=0.5, budget=0.0)) == " | 100% eta 0s"
    log_file = tmp_path / "0_log.out"
    follower = LogFollower(str(log_file))
    follower.poll()  # the job has not started: no file yet
    log_file.write_bytes(b"noise from submitit\n2026 [rank 0] INFO pipeline.train: step 5/10 loss=1 | 50% eta")
    follower.poll()
    assert capsys.readouterr().out == ""  # the progress line is not complete yet
    with open(log_file, "ab") as f:
        f.write(b" 5s\n[rank 0] WARNING pipeline.data: a shard was skipped\n")
    follower.poll()
    assert capsys.readouterr().out.splitlines() == [
        "2026 [rank 0] INFO pipeline.train: step 5/10 loss=1 | 50% eta 5s",
        "[rank 0] WARNING pipeline.data: a shard was skipped"]


def test_progress_lines_for_logs_come_at_each_tenth_or_minute_and_at_the_end(caplog):
    import logging

    from pipeline.progress import ProgressLines

    now = [0.0]
    lines = ProgressLines(logging.getLogger("test.progress"), "ingest", 40, "shards", every_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for i in range(40):
            now[0] += 1.0 if i != 20 else 120.0  # one slow shard: a line for the minute that passed
            lines.update(1, f"{(i + 1) * 8} videos")
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == "ingest: 4/40 shards (10%), 4s elapsed, eta 36s; 32 videos"
    assert "ingest: 21/40 shards (52%), 2m20s elapsed, eta 2m07s; 168 videos" in said  # the minute's line
    assert len(said) == 11 and said[-1] == "ingest: 40/40 shards (100%), 2m39s elapsed, eta 0s; 320 videos"
