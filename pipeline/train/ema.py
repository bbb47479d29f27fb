"""An exponential moving average of a model's weights (``train.ema_decay``; docs/training.md "Fine-tuning
options"): after every optimizer step, ``ema = decay * ema + (1 - decay) * weights``, starting from the weights
training starts from.

The average lives on the weights' device in float32 (one copy of the model) and is updated with one fused
``_foreach_lerp_`` per step: no host sync. Each rank keeps its own copy of the full average, which needs every
weight on every rank: the torch engine, and DeepSpeed with ZeRO 0-2 (stage 3 partitions the weights: refused by
the config). Every rank computes the same average from the same weights; rank 0 saves it with each checkpoint as
``ema.safetensors`` (no pickle), which resume, the test protocol and the export read. Buffers that are not
floating point are copied, not averaged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

EMA_FILE = "ema.safetensors"  # in a checkpoint directory (checkpoints/step<N>/)


def exports_ema(cfg) -> bool:
    """Whether a run (``pipeline.config.RunConfig``) tests and exports the EMA of its weights."""
    return cfg.train.ema_decay > 0 and cfg.train.ema_export


class WeightEMA:
    """The moving average of ``module``'s state (its ``state_dict`` names: a checkpoint's ``module`` names)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay}: expected a number in (0, 1)")
        self.decay = decay
        self.updates = 0
        live = module.state_dict(keep_vars=True)  # Parameters themselves: read at each update, never stale
        self.names = list(live)
        self._live = list(live.values())
        self.shadow = [t.detach().float().clone() if t.is_floating_point() else t.detach().clone()
                       for t in self._live]
        self._avg = [i for i, t in enumerate(self._live) if t.is_floating_point()]
        self._copy = [i for i, t in enumerate(self._live) if not t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, on the device (queued; nothing waits)."""
        live = [self._live[i].detach() for i in self._avg]
        live = [t if t.dtype == torch.float32 else t.float() for t in live]
        torch._foreach_lerp_([self.shadow[i] for i in self._avg], live, 1.0 - self.decay)
        for i in self._copy:
            self.shadow[i].copy_(self._live[i].detach())
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], where: str = "EMA weights") -> None:
        missing, unexpected = set(self.names) - set(state), set(state) - set(self.names)
        if missing or unexpected:
            raise ValueError(f"{where}: the averaged weights do not fit the model (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]})")
        for name, shadow in zip(self.names, self.shadow, strict=True):
            if state[name].shape != shadow.shape:
                raise ValueError(f"{where}: {name} has shape {tuple(state[name].shape)}, the model's is "
                                 f"{tuple(shadow.shape)}")
            shadow.copy_(state[name])

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the live weights (a resumed run whose checkpoint has no average)."""
        for shadow, live in zip(self.shadow, self._live, strict=True):
            shadow.copy_(live.detach())

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged weights in the live module for the duration (evaluation), the trained ones back after,
        bit for bit."""
        with torch.no_grad():
            backup = [t.detach().clone() for t in self._live]
            for live, shadow in zip(self._live, self.shadow, strict=True):
                live.data.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for live, saved in zip(self._live, backup, strict=True):
                    live.data.copy_(saved)

    def save(self, directory: Path) -> Path:
        """``directory/ema.safetensors`` (the caller fsyncs the checkpoint)."""
        from safetensors.torch import save_file

        path = Path(directory) / EMA_FILE
        save_file({n: t.detach().cpu().contiguous() for n, t in self.state_dict().items()}, str(path),
                  metadata={"decay": repr(self.decay), "updates": str(self.updates)})
        return path

    def load(self, directory: Path) -> bool:
        """Restore the average saved in ``directory``; False when there is none there."""
        path = Path(directory) / EMA_FILE
        if not path.exists():
            return False
        state, meta = read_ema(path)
        self.load_state_dict(state, str(path))
        self.updates = int(meta.get("updates", 0))
        return True


def read_ema(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The averaged weights in an ``ema.safetensors`` (safetensors: tensors only, nothing runs) and its metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: one clear error
        raise ValueError(f"{path}: not a readable EMA weights file ({type(e).__name__}: {e}); restore the "
                         f"checkpoint from a copy, or move it away to use the one before") from None
