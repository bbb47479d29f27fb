"""On a CUDA device: the model gives the CPU's numbers, bf16 is close to fp32, checkpointing is exact; the
DeepSpeed engine (ZeRO-2, bf16, uint8 clips normalised on the GPU) learns like plain PyTorch and resumes."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.models.timesformer import ATTENTION_TYPES, TimeSformer, apply_activation_checkpointing, variant_config

from .test_timesformer import randomize_

pytestmark = pytest.mark.gpu
SMALL = dict(num_frames=8, img_size=64, patch_size=16, embed_dim=128, depth=3, num_heads=4, num_classes=11)


@pytest.fixture(autouse=True)
def exact_fp32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_cuda_fp32_matches_cpu(scheme):
    cpu = randomize_(TimeSformer(variant_config("timesformer_tiny", attention_type=scheme, **SMALL)), 0.05).eval()
    x = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        expected = cpu(x)
        got = cpu.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", ATTENTION_TYPES)
def test_bf16_training_step_is_close_to_fp32(scheme):
    model = randomize_(TimeSformer(variant_config("timesformer_tiny", attention_type=scheme, **SMALL)), 0.05).cuda()
    x, y = torch.randn(2, 3, 8, 64, 64, device="cuda"), torch.tensor([3, 9], device="cuda")
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        loss = torch.nn.functional.cross_entropy(m(x.to(dtype)).float(), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
        m.zero_grad(set_to_none=True)
        losses[dtype] = loss.item()
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=0.03)


def test_hugging_face_parity_at_full_size_on_cuda():
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    from pipeline.models.convert import hf_config_dict, load_checkpoint

    cfg = variant_config("timesformer_base", drop_path_rate=0.0)
    hf = TimesformerForVideoClassification(TimesformerConfig(**hf_config_dict(cfg))).cuda().eval()
    ours = load_checkpoint(TimeSformer(cfg), hf.state_dict()).cuda().eval()
    x = torch.randn(2, 3, 8, 224, 224, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x.transpose(1, 2)).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["full", "selective", "every_2"])
def test_checkpointing_policies_are_exact_on_cuda(policy):
    model = randomize_(TimeSformer(variant_config("timesformer_tiny", **SMALL)), 0.05).cuda().train()
    x, y = torch.randn(2, 3, 8, 64, 64, device="cuda"), torch.tensor([1, 2], device="cuda")

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss0, grads0 = loss_and_grads()
    apply_activation_checkpointing(model, policy)
    loss1, grads1 = loss_and_grads()
    assert loss1 == loss0
    for a, b in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


# --- the training engines on one GPU: DeepSpeed ZeRO-2 in bf16 from uint8 clips, next to plain PyTorch ---

ENGINE_RECIPE = ["cluster.accelerator=gpu", "train.precision=bf16", "train.zero_stage=2", "train.micro_batch=4",
                 "train.global_batch=4", "optim.lr=0.003", "data.index=unused"]


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank process group on this GPU, joined through DeepSpeed as a training rank does."""
    from pipeline.config import load_recipe
    from pipeline.distributed import free_port
    from pipeline.train.engine import init_distributed

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cuda"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield init_distributed(load_recipe("smoke", ENGINE_RECIPE), 0, 1, 0)
    finally:
        torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_engine_for(kind, cfg, device):
    from pipeline.config import batch_plan
    from pipeline.models.timesformer import model_config
    from pipeline.train.engine import DeepSpeedEngine, TorchEngine

    torch.manual_seed(0)
    model = TimeSformer(model_config(cfg))
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if kind == "deepspeed":
        return DeepSpeedEngine(model, cfg, batch_plan(cfg, 1), per_epoch=100,
                               model_factory=lambda: TimeSformer(model_config(cfg)))
    return TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=100, device=device)


def uint8_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 3, 4, 32, 32), dtype=torch.uint8, generator=g), torch.tensor([0, 1, 2, 3])


def test_deepspeed_zero2_bf16_learns_uint8_clips_like_plain_pytorch(one_rank_group):
    from pipeline.config import load_recipe
    from pipeline.train.evaluate import validate

    cfg = load_recipe("smoke", ENGINE_RECIPE)
    video, labels = uint8_batch()  # on the host, as the loader hands it over
    curves = {}
    for kind in ("deepspeed", "torch"):
        engine = make_engine_for(kind, cfg, one_rank_group)
        assert engine.module.pos_embed.device.type == "cuda"
        curves[kind] = [float(engine.train_micro_batch(video, labels)) for _ in range(25)]
        assert engine.global_step == 25
        with engine.eval_module() as (module, dtype):
            val = validate(module, dtype, [{"video": video, "label": labels}], one_rank_group)
        assert val["val_top1"] == 100.0, (kind, val, curves[kind])  # four clips memorised
    ds, plain = curves["deepspeed"], curves["torch"]
    assert ds[0] == pytest.approx(plain[0], rel=0.03)  # same weights, same clips: same start in bf16
    assert ds[-1] < 0.2 * ds[0] and plain[-1] < 0.2 * plain[0], curves


def test_deepspeed_checkpoint_on_gpu_resumes_the_same_losses(one_rank_group, tmp_path):
    from pipeline.config import load_recipe
    from pipeline.train.engine import consolidated_state_dict

    cfg = load_recipe("smoke", ENGINE_RECIPE)
    video, labels = uint8_batch()
    engine = make_engine_for("deepspeed", cfg, one_rank_group)
    for _ in range(3):
        engine.train_micro_batch(video, labels)
    engine.save(tmp_path, "step3", {"step": 3})
    after = [float(engine.train_micro_batch(video, labels)) for _ in range(3)]
    weights = consolidated_state_dict(tmp_path, "step3")  # fp32 master weights, on the host
    assert weights["head.weight"].dtype == torch.float32 and weights["head.weight"].device.type == "cpu"

    resumed = make_engine_for("deepspeed", cfg, one_rank_group)
    assert resumed.load(tmp_path, "step3")["step"] == 3
    assert resumed.global_step == 3
    torch.testing.assert_close(resumed.module.head.weight.float().cpu(), weights["head.weight"], atol=1e-2, rtol=0)
    again = [float(resumed.train_micro_batch(video, labels)) for _ in range(3)]
    assert again == pytest.approx(after, rel=1e-3)


def test_auto_checkpointing_measures_on_the_device_and_takes_the_cheapest_that_fits():
    from pipeline.train.parallelize import AUTO_ORDER, choose_policy, measure_policy, resolve_checkpointing

    device = torch.device("cuda")
    cfg = variant_config("timesformer_tiny", **SMALL)
    peaks = {p: measure_policy(lambda: TimeSformer(cfg), p, 4, (3, 8, 64, 64), 11, device, torch.bfloat16)
             for p in ("none", "full")}
    assert peaks["none"] > peaks["full"] > 0  # recomputing every block keeps less
    # a capacity between the two: none does not fit, full does -> the first that fits after none
    capacity = (peaks["none"] + peaks["full"]) // 2
    choice, seen = choose_policy(
        lambda p: measure_policy(lambda: TimeSformer(cfg), p, 4, (3, 8, 64, 64), 11, device, torch.bfloat16),
        capacity, reserve=0)
    assert choice != "none" and seen[choice] <= capacity and list(seen) == list(AUTO_ORDER[:len(seen)])
    # the real device: a tiny model fits without any recomputation
    assert resolve_checkpointing("auto", lambda: TimeSformer(cfg), 4, (3, 8, 64, 64), 11, device, torch.bfloat16,
                                 0.9) == "none"


@pytest.mark.parametrize("policy,scheme", [("none", "divided_space_time"), ("full", "divided_space_time"),
                                           ("selective", "divided_space_time"), ("full", "axial"),
                                           ("none", "joint_space_time"), ("none", "space_only"),
                                           ("none", "sparse_local_global")])
def test_compiled_blocks_match_eager_on_cuda_and_share_one_graph(policy, scheme):
    from torch._dynamo.utils import counters

    from pipeline.train.parallelize import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    cfg = variant_config("timesformer_tiny", **{**SMALL, "depth": 4, "drop_path_rate": 0.2, "attention_type": scheme})
    eager = randomize_(TimeSformer(cfg), 0.05).cuda()
    compiled = TimeSformer(cfg).cuda()
    compiled.load_state_dict(eager.state_dict())
    apply_activation_checkpointing(compiled, policy)
    compile_blocks(compiled)
    x = torch.randn(2, 3, 8, 64, 64, device="cuda")
    eager.eval(), compiled.eval()  # no drop-path draws: the same function
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=2e-4, rtol=1e-3)
    compiled.train()
    loss = compiled(x).float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in compiled.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    # blocks of different drop-path rates: one graph for training, one for evaluation
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_step_checks_read_a_step_later_without_draining_and_catch_divergence_on_cuda():
    from pipeline.train.loop import StepChecks

    device = torch.device("cuda")
    checks = StepChecks(device)
    finite, norm = torch.tensor(1.0, device=device), torch.tensor(2.0, device=device)
    checks.submit(1, False, False, False, False, loss=finite, norm=norm)
    assert checks.verdict(now=False) is None  # nothing earlier to read
    checks.submit(2, True, False, False, False, loss=finite, norm=norm)
    first = checks.verdict(now=False)
    assert first.step == 1 and not first.stopping and not first.diverged
    checks.submit(3, False, False, False, False, loss=torch.tensor(float("nan"), device=device), norm=norm)
    second = checks.verdict(now=False)
    assert second.step == 2 and second.preempted and not second.diverged
    third = checks.verdict(now=True)
    assert third.step == 3 and third.diverged
    checks.submit(4, False, False, False, False, loss=finite, norm=norm)
    assert checks.verdict(now=True).diverged  # sticky: a diverged run stays diverged
