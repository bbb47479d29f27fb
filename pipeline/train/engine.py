"""The training engine: the only module that imports DeepSpeed.

The loop talks to a declared interface (``Engine``: ``train_micro_batch``, ``lr``, ``global_step``,
``grad_norm``, ``grad_norm_tensor``, ``module``, ``save``, ``load``, ``eval_module``), with two implementations:

* ``DeepSpeedEngine``: ZeRO stage 0-3, bf16/fp16/fp32, gradient accumulation and clipping by DeepSpeed,
  the optimizer and learning-rate schedule built here (torch SGD/AdamW: no JIT-compiled ops).
* ``TorchEngine``: plain PyTorch (DDP when there are several ranks, autocast for bf16/fp16): the
  baseline of the DeepSpeed-overhead benchmark, and a stand-in where DeepSpeed is not wanted.

The loss is the model's (``classification_loss``): cross-entropy over the classes, or for a multi-label model
(``TimeSformerConfig.multi_label``) binary cross-entropy on each class's logit against the multi-hot label; in
float32 either way, whatever the training precision. The fine-tuning options act here too (docs/training.md,
"Fine-tuning options"): label smoothing, mixup/cutmix of the micro batch on the device (soft targets;
``augment.BatchMixer``), layer-wise learning-rate decay (``build_optimizer``) and an EMA of the weights updated
after each optimizer step (``ema.WeightEMA``, saved with each checkpoint as ``ema.safetensors``).

The DeepSpeed JSON is a function of the resolved config and the world size (``deepspeed_config``); the
launcher writes it into the run directory, never edited by hand.

Checkpoint files are read weights-only, never unpickled freely: DeepSpeed's own loader (its checkpoint engine)
and its ZeRO consolidation call ``torch.load(..., weights_only=False)``; here both read through
``load_deepspeed_file``, which rebuilds tensors, plain containers and the four DeepSpeed classes its
checkpoints hold (``deepspeed_checkpoint_globals``), and refuses anything else before it runs. Every file of a
saved checkpoint is fsynced by the rank that wrote it (``checkpoint.sync_tree``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import BatchPlan, RunConfig, lr_factor
from pipeline.data.transforms import normalize_on_device
from pipeline.distributed import group_rank_world
from pipeline.models.config import normalization_of
from pipeline.models.convert import safe_torch_load
from pipeline.train.augment import BatchMixer
from pipeline.train.checkpoint import sync_tree
from pipeline.train.ema import EMA_FILE, WeightEMA, read_ema

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ZERO_BUCKET_ELEMENTS = 50_000_000  # ~3 buckets for TimeSformer-L (121 M): reductions overlap the backward


@runtime_checkable
class Engine(Protocol):
    """What the training loop, evaluation and checkpointing use of an engine. ``DeepSpeedEngine`` and
    ``TorchEngine`` implement it; a new engine (FSDP, say) implements these and nothing else changes."""

    @property
    def module(self) -> nn.Module:
        """The model being trained (its parameters are the engine's, possibly partitioned)."""

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by ``load``)."""

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""

    def train_micro_batch(self, video: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro batch (uint8 or float clips on the host), an optimizer step at an
        accumulation boundary; returns the loss as a device tensor (reading it is the caller's wait)."""

    def grad_norm(self) -> float | None:
        """The last step's gradient norm, read on the host (waits for the device); None when not computed."""

    def grad_norm_tensor(self) -> torch.Tensor | float | None:
        """The same norm without waiting: a device tensor (negative or non-finite for invalid gradients)."""

    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Write this rank's part of checkpoint ``ckpt_dir/tag``, fsynced."""

    def load(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        """Restore checkpoint ``ckpt_dir/tag`` (read weights-only); returns the client state saved with it."""

    def eval_module(self, ema: bool = False) -> contextlib.AbstractContextManager[tuple[nn.Module, torch.dtype]]:
        """A context giving a module with every weight present on this rank, in eval mode, and the dtype its
        input clips take; ``ema``: the moving average of the weights (``train.ema_decay``) in their place."""


def deepspeed_config(cfg: RunConfig, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed JSON for this recipe on ``plan.world_size`` ranks (global batch kept)."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        # A model of ~0.1 B parameters: a few buckets per step (DeepSpeed's default holds 500 M gradients, so
        # one reduction after the whole backward), reductions overlapped with the backward pass, gradients
        # copied into one contiguous buffer as they are produced (no fragmentation at a step's peak).
        "zero_optimization": {"stage": t.zero_stage, "overlap_comm": t.zero_stage > 0,
                              "contiguous_gradients": t.zero_stage > 0, "reduce_scatter": True,
                              "reduce_bucket_size": ZERO_BUCKET_ELEMENTS,
                              "allgather_bucket_size": ZERO_BUCKET_ELEMENTS},
        # bf16 has fp32's range: DeepSpeed's default per-parameter overflow scan (kernel launches for every
        # parameter and a host sync, every step) buys little there and costs much where steps are short (the
        # measurement: docs/training.md "DeepSpeed notes", benchmarks/results/train-overhead-h200.log). The loop
        # stops on a non-finite loss or gradient norm before that step's checkpoint instead (loop.DivergedError).
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000},
        "zero_allow_untested_optimizer": True,  # torch SGD (the paper's optimizer) under ZeRO
        "steps_per_print": 10**9,  # the loop prints its own metric lines
        "wall_clock_breakdown": False,
    }
    if t.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


def is_multi_label(model: nn.Module) -> bool:
    """Whether a model scores each class on its own (sigmoid; ``TimeSformerConfig.multi_label``), found through
    the wrappers training puts around it (each keeps the model as ``.module``); False for a model without one."""
    for _ in range(4):
        cfg = getattr(model, "cfg", None)
        if cfg is not None and hasattr(cfg, "multi_label"):
            return bool(cfg.multi_label)
        model = getattr(model, "module", None)
        if model is None:
            break
    return False


def classification_loss(logits: torch.Tensor, label: torch.Tensor, multi_label: bool,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """The training loss of a batch, in float32 (under bf16/fp16 autocast too): cross-entropy against class
    indices ``(B,)`` or soft targets ``(B, classes)`` (mixup/cutmix), or for a multi-label model binary
    cross-entropy with logits against multi-hot (or mixed) labels ``(B, classes)``, averaged over clips and
    classes. ``label_smoothing`` e: cross-entropy's targets ``(1 - e) one-hot + e / classes``; multi-label, each
    class's target ``(1 - e) y + e / 2`` (toward 0.5, the binary case of the same rule). Mixed targets come
    smoothed already (``augment.BatchMixer``): the engines pass no smoothing with them."""
    logits = logits.float()
    if not multi_label:
        soft = label.is_floating_point() and label.dim() == 2
        return F.cross_entropy(logits, label.float() if soft else label, label_smoothing=label_smoothing)
    if label.shape != logits.shape:
        raise ValueError(f"a multi-label model takes multi-hot labels of shape {tuple(logits.shape)} (clips, "
                         f"classes), got {tuple(label.shape)}: train it on a multi-label dataset")
    target = label.float()
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / 2.0
    return F.binary_cross_entropy_with_logits(logits, target)




def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (the paper) or AdamW over the parameters that train (``train.freeze``);
    weight decay on every parameter, as the original, unless ``optim.decay_embeddings`` is off (then cls token,
    position and time embeddings are exempt); the classifier head at ``optim.head_lr_scale`` times the rate;
    with ``optim.layer_decay`` d < 1, each layer ``l`` (the model's ``layer_of(name)``: 0 for the embeddings or
    stem, one per block, ``num_layers`` for the top) at ``d ** (num_layers - l)`` times it (the head's scale on
    top). On a GPU the optimizer is torch's fused one (one kernel for all parameters instead of
    a few per tensor)."""
    o = cfg.optim
    exempt = set() if o.decay_embeddings else set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[int, bool, bool], list[nn.Parameter]] = {}
    apart = o.head_lr_scale != 1.0  # the head in groups of its own only when its rate differs: the optimizer's
    layered = o.layer_decay != 1.0  # groups (and so its checkpoints) keep their layout otherwise; likewise one
    core = model  # the family's own model, under training's wrappers: it knows its layers
    while not hasattr(core, "layer_of") and hasattr(core, "module"):
        core = core.module
    if layered and not hasattr(core, "layer_of"):
        raise ValueError(f"optim.layer_decay={o.layer_decay:g} needs the model's layers (a layer_of(name) method, "
                         f"which every registered family has); {type(core).__name__} has none: set layer_decay 1.0")
    top = core.num_layers if layered else 0  # group per layer only with layer decay
    for name, p in model.named_parameters():
        if p.requires_grad:
            layer = core.layer_of(name) if layered else top
            groups.setdefault((layer, apart and name.startswith(HEAD_PREFIX), name in exempt), []).append(p)
    if not groups:
        raise ValueError("no parameter of the model trains (all frozen): check train.freeze")
    param_groups = [{"params": params, "weight_decay": 0.0 if no_decay else o.weight_decay,
                     "lr": o.lr * (o.head_lr_scale if head else 1.0) * o.layer_decay ** (top - layer)}
                    for (layer, head, no_decay), params in sorted(groups.items())]
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if o.name == "sgd":
        return torch.optim.SGD(param_groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               **fused)
    return torch.optim.AdamW(param_groups, lr=o.lr, betas=tuple(o.betas), **fused)


HEAD_PREFIX = "head."  # the classifier's parameters (TimeSformer.head)


def apply_freeze(model: nn.Module, freeze: str) -> int:
    """``train.freeze``: ``backbone`` leaves only the classifier head trainable (a linear probe); returns the
    number of parameters that train. Normalisation layers with running statistics that can be frozen (a 3D CNN's
    BatchNorm, ``frozen``) keep them: a frozen backbone computes what it computed before training."""
    if freeze == "backbone":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(HEAD_PREFIX))
        for name, m in model.named_modules():
            if hasattr(m, "frozen") and not name.startswith(HEAD_PREFIX):
                m.frozen = True
    elif freeze != "none":
        raise ValueError(f"train.freeze={freeze!r}: expected none or backbone")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig,
                    per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule: ``lr_factor`` of the step (``train.plan_by=epochs``), or for a run planned by
    its budget the same shape over progress through a total that the run fits (``plan.ProgressSchedule``; the
    scheduler's state then carries the plan into checkpoints)."""
    if cfg.train.plan_by == "budget":
        from pipeline.train.plan import ProgressSchedule

        return torch.optim.lr_scheduler.LambdaLR(optimizer, ProgressSchedule(cfg, per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, per_epoch))


def init_distributed(cfg: RunConfig, rank: int, world_size: int, local_rank: int) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs) with the recipe's collective timeout."""
    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    device = torch.device("cpu")
    if cfg.cluster.accelerator == "gpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if cfg.train.engine == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed
        import deepspeed.ops

        # the shared-memory all-reduce op serves CPU inference only; building it is a long JIT compile
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(timeout=timeout, init_method="env://", rank=rank, world_size=world_size)
    elif not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                             rank=rank, world_size=world_size)
    return device


# What a refused checkpoint file's message tells the user to do.
NOT_OURS = ("A checkpoint written by this product's training engine never holds anything else: this file was not "
            "written by it, or was replaced afterwards. Restore the checkpoint from a copy you trust, or move this "
            "checkpoint directory away to resume from the one before.")


def deepspeed_checkpoint_globals() -> list[type]:
    """The classes DeepSpeed 0.19's own checkpoint files pickle besides tensors and plain containers: in the
    ZeRO optimizer states, the loss scaler (``LossScaler``; ``DynamicLossScaler`` with fp16), the stage
    (``ZeroStageEnum``) and the parameter slice map (``fragment_address``). Found by saving ZeRO 0-3 x
    fp32/bf16 checkpoints (tests/unit/test_hostile_checkpoints.py checks the list stays exact); fp16, a GPU-only
    precision, adds the dynamic scaler. Rebuilding them runs no code of theirs: an object is made by
    ``__new__`` and its attributes set, the enum is looked up by value."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: str | os.PathLike, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """One file of a DeepSpeed checkpoint, read weights-only (``UnsafeCheckpointError`` for anything else)."""
    return safe_torch_load(path, map_location=map_location, allowed=deepspeed_checkpoint_globals(),
                           not_ours_hint=NOT_OURS, **kwargs)


class _TorchWithSafeLoad:
    """``torch`` as ``deepspeed.utils.zero_to_fp32`` sees it during a consolidation: the same module, except
    that ``load`` (called there with ``weights_only=False`` on every shard) is ``load_deepspeed_file``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None, **kwargs: Any) -> Any:
        return load_deepspeed_file(f, map_location=map_location or "cpu", **kwargs)  # weights_only: ignored


def _module_weights(state: Any, path: Path) -> Mapping[str, torch.Tensor]:
    module = state.get("module") if isinstance(state, Mapping) else None
    if not isinstance(module, Mapping) or not all(isinstance(v, torch.Tensor) for v in module.values()):
        raise ValueError(f"{path}: holds no 'module' state dict of tensors: not a checkpoint written by this "
                         f"product's training engine")
    return module


class _FineTuning:
    """What both engines do alike for the fine-tuning options: soft targets (label smoothing, mixup/cutmix) and
    the EMA of the weights. ``_setup_finetuning`` after the module is in place; ``_targets`` before the forward;
    ``_stepped`` after each optimizer step."""

    cfg: RunConfig
    device: torch.device
    multi_label: bool
    ema: WeightEMA | None

    def _setup_finetuning(self, module: nn.Module) -> None:
        t = self.cfg.train
        self.smoothing = t.label_smoothing
        self.mixer = (BatchMixer(t.mixup_alpha, t.cutmix_alpha, t.mix_prob, t.mix_switch_prob, t.label_smoothing)
                      if t.mixup_alpha > 0 or t.cutmix_alpha > 0 else None)
        self.num_classes = int(getattr(getattr(module, "cfg", None), "num_classes", 0) or self.cfg.model.num_classes)
        self.ema = WeightEMA(module, t.ema_decay) if t.ema_decay > 0 else None

    def _targets(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clips and targets the loss sees: mixed (on the device) when mixup/cutmix is on."""
        label = label.to(self.device, non_blocking=True)  # a blocking copy would wait for the device's queue
        if self.mixer is None:
            return x, label
        return self.mixer(x, label, self.num_classes, self.multi_label)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # mixed targets are smoothed already (BatchMixer smooths before it mixes)
        return classification_loss(logits, target, self.multi_label, 0.0 if self.mixer else self.smoothing)

    def _stepped(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def _save_ema(self, path: Path) -> None:
        if self.ema is not None and group_rank_world()[0] == 0:
            path.mkdir(parents=True, exist_ok=True)
            self.ema.save(path)

    def _load_ema(self, path: Path) -> None:
        if self.ema is not None and not self.ema.load(path):
            import logging

            logging.getLogger("pipeline.train").warning(
                "%s has no %s (saved without train.ema_decay): the weight average restarts from the resumed "
                "weights", path, EMA_FILE)
            self.ema.reset()


class DeepSpeedEngine(_FineTuning):
    def __init__(self, model: nn.Module, cfg: RunConfig, plan: BatchPlan, per_epoch: int,
                 model_factory: Callable[[], nn.Module], ds_config: dict[str, Any] | None = None,
                 device: torch.device | None = None) -> None:
        import deepspeed

        self.cfg, self.plan, self.model_factory = cfg, plan, model_factory
        self.norm = normalization_of(model)  # the model's own input normalisation
        self.multi_label = is_multi_label(model)  # the loss: BCE per class, or cross-entropy
        self.ds_config = ds_config or deepspeed_config(cfg, plan)
        optimizer = build_optimizer(model, cfg, device)
        scheduler = build_scheduler(optimizer, cfg, per_epoch)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        # DeepSpeed reads every file of a checkpoint through its checkpoint engine's load, which unpickles
        # with weights_only=False; resuming must not run what a replaced file carries.
        self.engine.checkpoint_engine.load = load_deepspeed_file
        self.dtype = DTYPES[cfg.train.precision]
        self.device = self.engine.device
        self._setup_finetuning(self.engine.module)

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def global_step(self) -> int:
        return int(self.engine.global_steps)

    @property
    def lr(self) -> float:
        """The learning rate of the next step (the base rate: layer decay and the head's scale left out)."""
        return float(self.scheduler.get_last_lr()[0]) * self.cfg.optim.lr / (self.scheduler.base_lrs[0] or 1.0)

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def grad_norm_tensor(self) -> torch.Tensor | float | None:
        """The last step's gradient norm as DeepSpeed holds it (a device tensor: reading it waits for the
        device, so the loop checks it on the device); negative or non-finite when the gradients were not."""
        return self.engine.get_global_grad_norm()

    def train_micro_batch(self, video: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Forward, backward and (at an accumulation boundary) an optimizer step; returns the loss."""
        if not self.engine.module.training:
            self.engine.train()
        x, target = self._targets(normalize_on_device(video, self.device, *self.norm, dtype=self.dtype), label)
        loss = self._loss(self.engine(x), target)
        self.engine.backward(loss)
        before = self.engine.global_steps
        self.engine.step()
        if self.engine.global_steps != before:  # an optimizer step (an accumulation boundary)
            self._stepped()
        return loss.detach()

    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        self._save_ema(Path(ckpt_dir) / tag)
        sync_tree(Path(ckpt_dir) / tag)  # this rank's files reach the disk before rank 0 marks them complete

    def load(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        # Optimizer states are loaded (the default): with load_optimizer_states=False, ZeRO-3 would read the
        # weights through zero_to_fp32 directly, outside load_deepspeed_file.
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # inside ZeRO's wrapper
        from pipeline.train import elastic

        directory, world = Path(ckpt_dir) / tag, group_rank_world()[1]
        saved, bf16, zero3 = elastic.saved_ranks(directory) if directory.is_dir() else (0, False, False)
        if saved and saved != world:  # partitioned optimizer state, written by another number of ranks
            if zero3:
                raise elastic.zero3_refusal(directory, saved, world)
            # module weights, schedule and step counters by DeepSpeed (ZeRO-1/2 and the bf16 optimizer load
            # their module from the whole model states file), the optimizer state re-partitioned here
            with keeping_implementation(base):
                path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=False)
            if path is not None:
                elastic.load_repartitioned(self.engine, directory, saved, bf16, self.cfg.train.precision,
                                           load_deepspeed_file, IMPLEMENTATION_OPTIONS)
        else:
            with keeping_implementation(base):
                path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
        self._load_ema(Path(ckpt_dir) / tag)
        return client_state or {}

    @contextlib.contextmanager
    def eval_module(self, ema: bool = False) -> Iterator[tuple[nn.Module, torch.dtype]]:
        """A module with every weight present on this rank, for evaluation at each rank's own pace (``ema``:
        the weight average in the weights' place, which are restored after). ZeRO-3 partitions parameters, so
        its weights are gathered (collectively) into a plain copy."""
        if ema and self.ema is None:
            raise ValueError("eval_module(ema=True): this run keeps no weight average (train.ema_decay=0)")
        if self.cfg.train.zero_stage < 3:
            was_training = self.engine.module.training
            self.engine.module.eval()
            try:
                with self.ema.swapped() if ema else contextlib.nullcontext():
                    yield self.engine.module, self.dtype
            finally:
                self.engine.module.train(was_training)
            return
        import deepspeed

        plain = self.model_factory()
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = {n: p.detach().clone() for n, p in self.engine.module.named_parameters()}
        buffers = {n: b for n, b in self.engine.module.named_buffers()}
        plain.load_state_dict({**full, **buffers}, strict=True)
        yield plain.to(self.device, self.dtype).eval(), self.dtype


class TorchEngine(_FineTuning):
    """Plain PyTorch: DDP over the process group when there are several ranks, autocast for bf16/fp16."""

    def __init__(self, model: nn.Module, cfg: RunConfig, plan: BatchPlan, per_epoch: int,
                 device: torch.device) -> None:
        self.cfg, self.plan, self.device = cfg, plan, device
        self.norm = normalization_of(model)  # the model's own input normalisation
        self.multi_label = is_multi_label(model)  # the loss: BCE per class, or cross-entropy
        self.raw = model.to(device)
        distributed = group_rank_world()[1] > 1
        self.model = nn.parallel.DistributedDataParallel(self.raw) if distributed else self.raw
        self.optimizer = build_optimizer(self.raw, cfg, device)
        self.scheduler = build_scheduler(self.optimizer, cfg, per_epoch)
        self.dtype = DTYPES[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        self.micro = 0
        self.steps = 0
        self._norm: torch.Tensor | None = None
        self._setup_finetuning(self.raw)

    @property
    def module(self) -> nn.Module:
        return self.raw

    @property
    def global_step(self) -> int:
        return self.steps

    @property
    def lr(self) -> float:
        """The learning rate of the next step (the base rate: layer decay and the head's scale left out)."""
        return float(self.scheduler.get_last_lr()[0]) * self.cfg.optim.lr / (self.scheduler.base_lrs[0] or 1.0)

    def grad_norm(self) -> float | None:
        return None if self._norm is None else float(self._norm)

    def grad_norm_tensor(self) -> torch.Tensor | None:
        """The last step's gradient norm, on the device (reading it is the caller's choice of when to wait)."""
        return self._norm

    def train_micro_batch(self, video: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if not self.raw.training:
            self.model.train()
        self.micro += 1
        boundary = self.micro % self.plan.grad_accum == 0
        sync = contextlib.nullcontext() if boundary or not hasattr(self.model, "no_sync") else self.model.no_sync()
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with sync:
            x, target = self._targets(normalize_on_device(video, self.device, *self.norm), label)
            with autocast:
                logits = self.model(x)
            loss = self._loss(logits, target)
            self.scaler.scale(loss / self.plan.grad_accum).backward()
        if boundary:
            self.scaler.unscale_(self.optimizer)
            clip = self.cfg.optim.grad_clip or float("inf")
            self._norm = nn.utils.clip_grad_norm_(self.raw.parameters(), clip).detach()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.steps += 1
            self._stepped()
        return loss.detach()

    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        if group_rank_world()[0] == 0:
            path = Path(ckpt_dir) / tag
            path.mkdir(parents=True, exist_ok=True)
            torch.save({"module": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                        "steps": self.steps, "micro": self.micro, "client_state": client_state},
                       path / "torch_engine.pt")
            self._save_ema(path)
            sync_tree(path)

    def load(self, ckpt_dir: Path, tag: str) -> dict[str, Any]:
        path = Path(ckpt_dir) / tag / "torch_engine.pt"
        state = safe_torch_load(path, map_location=self.device, not_ours_hint=NOT_OURS)
        self.raw.load_state_dict(_module_weights(state, path))
        with keeping_implementation(self.optimizer):
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # micro batches counted under this run's accumulation (a resume on another world size re-derives it; a
        # checkpoint is always taken at an optimizer step, so the count is whole steps)
        self.steps, self.micro = state["steps"], state["steps"] * self.plan.grad_accum
        self._load_ema(Path(ckpt_dir) / tag)
        return state["client_state"]

    @contextlib.contextmanager
    def eval_module(self, ema: bool = False) -> Iterator[tuple[nn.Module, torch.dtype]]:
        """The model in eval mode, fed float32 clips; a bf16/fp16 run evaluates under autocast at its
        training precision (as DeepSpeed's bf16 weights and ``jobs/evaluate.py`` do), not in plain fp32.
        ``ema``: the weight average in the weights' place (restored after)."""
        if ema and self.ema is None:
            raise ValueError("eval_module(ema=True): this run keeps no weight average (train.ema_decay=0)")
        was_training = self.raw.training
        self.raw.eval()
        try:
            with self.ema.swapped() if ema else contextlib.nullcontext():
                yield (self.raw if self.dtype == torch.float32 else _Autocast(self.raw, self.dtype)), torch.float32
        finally:
            self.raw.train(was_training)


class _Autocast(nn.Module):
    """``module`` run under autocast to ``dtype`` (its weights stay as they are)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.module(x)


# An optimizer's implementation choices, not its state: loading a state dict (which carries its param
# groups' options) must not turn a fused optimizer back into the one an older checkpoint was saved with.
IMPLEMENTATION_OPTIONS = ("fused", "foreach", "capturable")


@contextlib.contextmanager
def keeping_implementation(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Around a load of ``optimizer``'s state: its param groups keep the implementation options they had."""
    chosen = [{k: g[k] for k in IMPLEMENTATION_OPTIONS if k in g} for g in optimizer.param_groups]
    yield
    # not strict: a load that regrouped the parameters keeps the options of the groups present both times
    for group, options in zip(optimizer.param_groups, chosen, strict=False):
        group.update(options)


def make_engine(model: nn.Module, cfg: RunConfig, plan: BatchPlan, per_epoch: int, device: torch.device,
                model_factory: Callable[[], nn.Module]) -> Engine:
    if cfg.train.engine == "torch":
        return TorchEngine(model, cfg, plan, per_epoch, device)
    return DeepSpeedEngine(model, cfg, plan, per_epoch, model_factory, device=device)


def consolidated_state_dict(ckpt_dir: Path, tag: str, ema: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint written by either engine (ZeRO shards merged), on one process.
    Every file is read weights-only; a file that asks for more is refused (``UnsafeCheckpointError``).
    ``ema``: the moving average of the weights saved with it (``ema.safetensors``) instead."""
    path = Path(ckpt_dir) / tag
    if ema:
        if not (path / EMA_FILE).exists():
            raise FileNotFoundError(f"{path}: no {EMA_FILE} (the run kept no weight average: train.ema_decay=0, "
                                    f"or train.ema_export=false to export the trained weights)")
        return {k: v.float() if v.is_floating_point() else v for k, v in read_ema(path / EMA_FILE)[0].items()}
    if (path / "torch_engine.pt").exists():
        state = safe_torch_load(path / "torch_engine.pt", not_ours_hint=NOT_OURS)
        return {k: v.float() for k, v in _module_weights(state, path / "torch_engine.pt").items()}
    if any(path.glob("zero_pp_rank_*_optim_states.pt")) or any(path.glob("*zero_pp_rank_*")):
        from deepspeed.utils import zero_to_fp32

        real_torch, zero_to_fp32.torch = zero_to_fp32.torch, _TorchWithSafeLoad()
        try:
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        finally:
            zero_to_fp32.torch = real_torch
        return {k: v.float() for k, v in state.items()}
    model_states = path / "mp_rank_00_model_states.pt"
    if model_states.exists():  # ZeRO stage 0: the whole module is in the model states
        return {k: v.float() for k, v in _module_weights(load_deepspeed_file(model_states), model_states).items()}
    raise FileNotFoundError(f"{path}: not a checkpoint written by the DeepSpeed or torch engine")
