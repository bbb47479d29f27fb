"""Checkpoint conversion for TimeSformer: ImageNet ViT inflation, the original repository's ``.pyth``,
Hugging Face ``TimesformerForVideoClassification``, and ``model.safetensors``.

Every load is strict. ``adapt_state_dict`` names each missing and unexpected key and each shape
mismatch; the only shape changes it makes are the ones it knows how to make correctly:

* ``pos_embed`` over another patch grid: 2-D interpolation of the grid (bicubic by default), never the
  original's 1-D interpolation of the flattened raster, which scrambles rows;
* ``time_embed`` for another frame count: 1-D interpolation over time (nearest by default, as the
  original);
* the classifier head, only when the caller says so (``reset_head=True``): it keeps its fresh init.

Reading files never runs code from them: every ``torch.load`` is ``weights_only=True`` (``safe_torch_load``),
with inert stand-ins for the config objects that foreign checkpoints pickle (a yacs/fvcore ``CfgNode``, an
``argparse.Namespace``); anything else a pickle asks to build or call is refused (``UnsafeCheckpointError``).
A safetensors file rebuilds the model its metadata describes only when its own tensors are that large.

Key names. Ours are the original's (after its ``model.`` wrapper prefix) and timm's for the ViT parts,
so the official checkpoints and timm's ``vit_base_patch16_224`` need no renaming; Hugging Face's are
mapped by ``HF_BLOCK_KEYS`` / ``HF_TOP_KEYS``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.models.config import DEFAULT_MEAN, DEFAULT_STD
from pipeline.models.registry import config_from_dict, family_of
from pipeline.models.timesformer import (
    EXTRA_STEPS,
    TimeSformer,
    TimeSformerConfig,
    resize_pos_embed,
    resize_time_embed,
)

StateDict = dict[str, torch.Tensor]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every missing, unexpected and mis-shaped key."""


class UnsafeCheckpointError(ValueError):
    """A pickled file asks to build or call something other than tensors and plain containers (so loading
    it the usual way could run code). Refused before any of it runs; the message names the file and what
    it asked for."""


# ---------------------------------------------------------------------------------------------------
# Reading pickled files without running them


class _InertConfigNode:
    """Stand-in for a pickled config object of another code base (yacs/fvcore ``CfgNode``, a dict
    subclass; ``argparse.Namespace``). Unpickling "creates" one through ``__new__`` only, and what comes
    back is a plain ``OrderedDict``: the node's items are kept, its attributes (the CfgNode's immutability
    flags, a Namespace's fields) land in that dict's ``__dict__`` as inert data. No code of the original
    class exists here, so none can run; nothing of ours reads these configs (the weights are what count)."""

    def __new__(cls, *args: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


# Foreign classes a model checkpoint may pickle besides tensors, by their qualified name. The original
# TimeSformer's save_checkpoint stores ``cfg.dump()`` (a YAML string), but its forks and other SlowFast-style
# code bases pickle the CfgNode itself, and timm/DeiT training checkpoints keep their ``args`` Namespace.
FOREIGN_CONFIG_GLOBALS: list[tuple[type, str]] = [
    (_InertConfigNode, "fvcore.common.config.CfgNode"),
    (_InertConfigNode, "yacs.config.CfgNode"),
    (_InertConfigNode, "argparse.Namespace"),
]

_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")


def _refusal(error: Exception) -> str:
    """What the weights-only unpickler refused, in a phrase, without torch's advice to load the file unsafely."""
    text = str(error)
    m = _REFUSED_GLOBAL.search(text)
    if m:
        return (f"its pickle asks for {m.group(1)}, which is neither a tensor nor a plain container, so loading "
                f"it the usual way could run code")
    # torch wraps the unpickler's own words in advice (load with weights_only=False) that must not be followed
    lines = [line.strip().removeprefix("WeightsUnpickler error: ") for line in text.splitlines()]
    detail = next((line for line in lines if line and "weights_only" not in line
                   and not line.startswith(("Weights only load failed", "Check the documentation", "Please file"))),
                  type(error).__name__)
    return (f"its pickle holds more than tensors and plain containers ({detail.rstrip('.')}), and loading it "
            f"could run code")


# Globals that torch's weights-only unpickler allows but that let a pickle of a few bytes ask for memory of any
# size: ``bytearray(n)`` zero-fills n bytes as it is built (a 1 KB file held 1 GiB here, and asking for more
# costs no more bytes of file). No checkpoint holds one. Found in the pickle's text before torch reads it.
_AMPLIFYING_GLOBALS = (b"builtins\nbytearray\n",)
_SCAN_CHUNK = 16 << 20


def _pickle_texts(path: Path) -> Iterator[bytes]:
    """The pickle bytes of a torch file, in chunks that overlap by enough to find a global's name: the
    ``data.pkl`` records of a zip file (decompressed, as torch would read them), else the whole file (the
    legacy format puts its pickles at the front, but the scan need not know where they end)."""
    overlap = max(len(g) for g in _AMPLIFYING_GLOBALS)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.endswith(".pkl"):
                    with z.open(info) as f:
                        yield from _chunks(f, overlap)
        return
    with open(path, "rb") as f:
        yield from _chunks(f, overlap)


def _chunks(f: Any, overlap: int) -> Iterator[bytes]:
    tail = b""
    while chunk := f.read(_SCAN_CHUNK):
        yield tail + chunk
        tail = chunk[-overlap:]


def _refuse_amplifiers(path: Path, hint: str) -> None:
    try:
        for text in _pickle_texts(path):
            for name in _AMPLIFYING_GLOBALS:
                if name in text:
                    qualified = name.decode().strip().replace("\n", ".")
                    raise UnsafeCheckpointError(
                        f"{path}: refused to load: its pickle asks for {qualified}, which no checkpoint holds and "
                        f"which lets a small file claim memory of any size; nothing from it was built. {hint}")
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        if isinstance(e, UnsafeCheckpointError):
            raise
        # a damaged zip: torch.load below says what is wrong with it


def _tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a loaded checkpoint (containers and the __dict__ of allowed objects), without
    recursion: a hostile file may nest its containers deeper than Python's stack."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        if hasattr(item, "__dict__") and not isinstance(item, (torch.Tensor, type)):
            stack.extend(vars(item).values())


def _check_storage_bytes(state: Any, path: Path, hint: str) -> None:
    """Refuse tensors whose storages hold more bytes than the file does. A tensor read from the file has its
    bytes there; one built by a legacy constructor the pickle called (``torch.BFloat16Tensor(2**40)``) got
    an uninitialised allocation of the size it asked for, which the first copy or cast (an inflation's
    clone, an export's ``float()``) would fill: a small file that takes a node's memory."""
    size = path.stat().st_size
    storages: dict[tuple[str, int], int] = {}
    for t in _tensors_in(state):
        if t.layout != torch.strided or t.is_meta:
            continue  # sparse tensors are rebuilt from strided ones, which are counted; meta ones hold nothing
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a wrapper subclass without storage of its own
            continue
        storages[(str(t.device), s.data_ptr())] = s.nbytes()
    held = sum(storages.values())
    if held > size:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: its tensors hold {held:,} bytes, more than the file's {size:,}: its pickle "
            f"builds tensors that are not in the file (so any amount of memory could be asked for). {hint}")


def safe_torch_load(path: str | os.PathLike, *, map_location: Any = "cpu",
                    allowed: Iterable[Any] = (), not_ours_hint: str | None = None, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, plain containers and the ``allowed`` globals
    (classes, or ``(stand_in, "qualified.name")`` pairs) are rebuilt; anything else in the pickle is
    refused with ``UnsafeCheckpointError`` before it runs. Other failures (truncated, not a torch file)
    raise ``ValueError``; both name the file. ``not_ours_hint`` ends the refusal's message (what to do).
    A pickle that could ask for memory of any size (``bytearray``, tensors larger than the file) is refused
    too (``UnsafeCheckpointError``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    hint = not_ours_hint or (
        "If it is a model from a source you trust, load it once in an isolated environment and re-save only "
        "its weights (torch.save(model.state_dict(), ...) or safetensors), then use that file.")
    if path.is_file():
        _refuse_amplifiers(path, hint)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            state = torch.load(str(path), map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: {_refusal(e)}; nothing from it was run. {hint}") from None
    except Exception as e:  # a truncated or foreign file: say which and why
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if path.is_file():
        _check_storage_bytes(state, path, hint)
    return state


# ---------------------------------------------------------------------------------------------------
# Strict loading with the resizes we know


def _grid_of(n_pos: int, where: str, key: str) -> tuple[int, int]:
    n = n_pos - 1
    side = int(round(n**0.5))
    if side * side != n:
        raise CheckpointMismatchError(
            f"{where}: {key} has {n_pos} entries, which is not 1 + a square grid; pass its grid explicitly"
        )
    return side, side


def adapt_state_dict(
    state: Mapping[str, torch.Tensor],
    model: TimeSformer,
    *,
    reset_head: bool = False,
    source_grid: tuple[int, int] | None = None,
    where: str = "checkpoint",
) -> StateDict:
    """Make ``state`` (already in our key names) fit ``model`` exactly, or raise naming every problem.

    Resizes position and time embeddings; drops the head when ``reset_head`` is true and it does not
    fit (the model's fresh head is kept). Returns a state dict that ``load_state_dict(strict=True)`` takes.
    """
    target = model.state_dict()
    cfg = model.cfg
    out: StateDict = {}
    shape_errors = []
    for key, value in state.items():
        if key not in target:
            continue  # reported below as unexpected
        want = target[key].shape
        if value.shape == want:
            out[key] = value
        elif key == "pos_embed" and value.ndim == 3 and value.shape[-1] == want[-1]:
            grid = source_grid or _grid_of(value.shape[1], where, key)
            out[key] = resize_pos_embed(value, grid, cfg.grid_size, cfg.pos_embed_resize)
        elif key == "time_embed" and value.ndim == 3 and value.shape[-1] == want[-1]:
            out[key] = resize_time_embed(value, cfg.num_frames, cfg.time_embed_resize)
        elif key.startswith("head.") and reset_head:
            continue
        else:
            shape_errors.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
    missing = sorted(k for k in target if k not in state and not (reset_head and k.startswith("head.")))
    if reset_head:
        for k in ("head.weight", "head.bias"):
            if k in target and k not in out:
                out[k] = target[k]
    unexpected = sorted(k for k in state if k not in target)
    if missing or unexpected or shape_errors:
        raise CheckpointMismatchError("\n".join(mismatch_lines(
            f"{where} does not fit TimeSformer({cfg.attention_type}, {cfg.num_frames}x{cfg.img_size}, "
            f"{cfg.num_classes} classes):", missing, unexpected, shape_errors)))
    return out


def mismatch_lines(title: str, missing: list[str], unexpected: list[str], shape_errors: list[str]) -> list[str]:
    """A state dict that does not fit a model, said key by key (every family's loader raises it the same way)."""
    lines = [title]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(sorted(unexpected))}")
    if shape_errors:
        lines.append(f"  shape mismatches ({len(shape_errors)}): {'; '.join(shape_errors)}")
    if any(e.startswith("head.") for e in shape_errors):
        lines.append("  (a different number of classes: pass reset_head=True to start a new head)")
    return lines


def load_into(model: TimeSformer, state: Mapping[str, torch.Tensor], **kwargs: Any) -> TimeSformer:
    """``adapt_state_dict`` then a strict ``load_state_dict``."""
    model.load_state_dict(adapt_state_dict(state, model, **kwargs), strict=True)
    return model


# ---------------------------------------------------------------------------------------------------
# ImageNet ViT (timm names) -> TimeSformer


def inflate_vit(vit_state: Mapping[str, torch.Tensor], model: TimeSformer, *, where: str = "ViT checkpoint",
                reset_head: bool | None = None) -> StateDict:
    """Turn an image ViT state dict (timm ``vit_base_patch16_224`` names) into one for ``model``.

    Each added attention step (temporal, width, local) starts as a copy of the block's spatial
    attention and its LayerNorm; ``*_fc`` layers and the time embedding start at zero, so the inflated
    model is the image ViT on every frame. The head is dropped when the class count differs.
    """
    cfg = model.cfg
    target = model.state_dict()
    state = {k: v for k, v in vit_state.items() if not k.startswith(("fc_norm.", "pre_logits."))}
    if "pos_embed" in state and model.pos_embed is None:
        del state["pos_embed"]
    new = dict(state)
    for i in range(cfg.depth):
        for step in EXTRA_STEPS[cfg.attention_type]:
            for src, dst in ((f"blocks.{i}.attn.", f"blocks.{i}.{step}_attn."),
                             (f"blocks.{i}.norm1.", f"blocks.{i}.{step}_norm1.")):
                new.update({dst + k[len(src):]: v.clone() for k, v in state.items() if k.startswith(src)})
            for part in ("weight", "bias"):
                new[f"blocks.{i}.{step}_fc.{part}"] = torch.zeros_like(target[f"blocks.{i}.{step}_fc.{part}"])
    if model.time_embed is not None and "time_embed" not in new:
        new["time_embed"] = torch.zeros_like(model.time_embed)
    if reset_head is None:  # an ImageNet head (1000 classes) on a video model of other classes
        theirs = new.get("head.weight", torch.empty(0)).shape
        reset_head = "head.weight" in target and theirs != target["head.weight"].shape
    return adapt_state_dict(new, model, reset_head=reset_head, where=where)


# ---------------------------------------------------------------------------------------------------
# The original repository (facebookresearch/TimeSformer) ``.pyth`` checkpoints


def from_official(checkpoint: Mapping[str, Any]) -> StateDict:
    """State dict from an original ``.pyth`` (``{"model_state": ...}`` with a ``model.`` prefix), a
    ``{"model": ...}``/``{"state_dict": ...}`` dict, or a bare state dict; ``module.`` prefixes stripped."""
    for wrapper in ("model_state", "model", "state_dict", "module"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    out = {}
    for k, v in checkpoint.items():
        for prefix in ("module.", "model."):
            if isinstance(k, str) and k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def require_tensors(state: Mapping[Any, Any], where: str) -> None:
    """A state dict maps names to tensors; a checkpoint whose weights are anything else (a number, a string,
    a nested dict where a tensor belongs) is named here, key by key, instead of failing deep in the load."""
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise CheckpointMismatchError(
            f"{where}: not a state dict of named tensors: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} "
            f"not a tensor under a string key: {shown}. Re-save it with torch.save(model.state_dict(), ...)")
    # A saved weight owns its elements; a view larger than its storage (stride 0, overlapping strides) is a
    # small file posing as a huge tensor, which the first clone or cast would materialise.
    posing = [f"{k} {tuple(v.shape)}" for k, v in state.items()
              if v.numel() * v.element_size() > v.untyped_storage().nbytes()]
    if posing:
        raise CheckpointMismatchError(
            f"{where}: {len(posing)} tensor(s) are views larger than the data stored for them ({', '.join(posing[:5])}"
            f"): not weights a model saved. Refusing to load it; re-save the checkpoint from the model")


def to_official(state: Mapping[str, torch.Tensor], cfg: TimeSformerConfig, epoch: int = 0) -> dict[str, Any]:
    """An original-format checkpoint: ``{"epoch", "model_state" (``model.`` prefix), "cfg"}``."""
    return {
        "epoch": epoch,
        "model_state": {f"model.{k}": v for k, v in state.items()},
        "cfg": {"TIMESFORMER": {"ATTENTION_TYPE": cfg.attention_type}, "DATA": {"NUM_FRAMES": cfg.num_frames,
                "TRAIN_CROP_SIZE": cfg.img_size}, "MODEL": {"NUM_CLASSES": cfg.num_classes}},
    }


# ---------------------------------------------------------------------------------------------------
# Hugging Face transformers TimesformerForVideoClassification

HF_BLOCK_KEYS = {
    "norm1": "layernorm_before",
    "attn.qkv": "attention.attention.qkv",
    "attn.proj": "attention.output.dense",
    "temporal_norm1": "temporal_layernorm",
    "temporal_attn.qkv": "temporal_attention.attention.qkv",
    "temporal_attn.proj": "temporal_attention.output.dense",
    "temporal_fc": "temporal_dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
HF_TOP_KEYS = {
    "cls_token": "timesformer.embeddings.cls_token",
    "pos_embed": "timesformer.embeddings.position_embeddings",
    "time_embed": "timesformer.embeddings.time_embeddings",
    "patch_embed.proj": "timesformer.embeddings.patch_embeddings.projection",
    "norm": "timesformer.layernorm",
    "head": "classifier",
}
HF_ATTENTION_TYPES = ("space_only", "joint_space_time", "divided_space_time")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK_RE = re.compile(r"^timesformer\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def _rename(key: str, block_re: re.Pattern, block_prefix: str, block_map: dict[str, str],
            top_map: dict[str, str], where: str) -> str:
    m = block_re.match(key)
    if m:
        i, module, kind = m.groups()
        if module not in block_map:
            raise CheckpointMismatchError(f"{where}: no Hugging Face equivalent for key {key!r}")
        return f"{block_prefix}{i}.{block_map[module]}.{kind}"
    for ours, theirs in top_map.items():
        if key == ours:
            return theirs
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    raise CheckpointMismatchError(f"{where}: no equivalent for key {key!r}")


def to_hf(state: Mapping[str, torch.Tensor], where: str = "state dict") -> StateDict:
    """Our state dict in Hugging Face ``TimesformerForVideoClassification`` names (a pure rename)."""
    return {_rename(k, _BLOCK_RE, "timesformer.encoder.layer.", HF_BLOCK_KEYS, HF_TOP_KEYS, where): v
            for k, v in state.items()}


def from_hf(hf_state: Mapping[str, torch.Tensor], where: str = "Hugging Face state dict") -> StateDict:
    """A Hugging Face ``TimesformerForVideoClassification`` state dict in our names."""
    inv_block = {v: k for k, v in HF_BLOCK_KEYS.items()}
    inv_top = {v: k for k, v in HF_TOP_KEYS.items()}
    return {_rename(k, _HF_BLOCK_RE, "blocks.", inv_block, inv_top, where): v for k, v in hf_state.items()}


def hf_config_dict(cfg: TimeSformerConfig) -> dict[str, Any]:
    """Keyword arguments for ``transformers.TimesformerConfig`` describing the same model."""
    if cfg.attention_type not in HF_ATTENTION_TYPES:
        raise ValueError(f"Hugging Face TimeSformer has no {cfg.attention_type!r} attention "
                         f"(it has {', '.join(HF_ATTENTION_TYPES)})")
    if cfg.pos_embed != "space_time":
        raise ValueError(f"Hugging Face TimeSformer always has space-time embeddings; pos_embed={cfg.pos_embed!r}")
    out = dict(image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
               num_frames=cfg.num_frames, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
               num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, hidden_act="gelu",
               layer_norm_eps=cfg.norm_eps, qkv_bias=cfg.qkv_bias, attention_type=cfg.attention_type,
               num_labels=cfg.num_classes, hidden_dropout_prob=cfg.drop_rate,
               attention_probs_dropout_prob=cfg.attn_drop_rate)
    # transformers 5.x types drop_path_rate as int and rejects 0.1; its default (0) is no drop path.
    if cfg.drop_path_rate:
        out["drop_path_rate"] = cfg.drop_path_rate
    if cfg.multi_label:  # transformers' own name for sigmoid scores and a BCE loss (its pipelines read it)
        out["problem_type"] = "multi_label_classification"
    return out


def config_from_hf(hf: Mapping[str, Any]) -> TimeSformerConfig:
    """Our config from a Hugging Face ``config.json`` dict."""
    labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 400
    return TimeSformerConfig(
        num_classes=labels, num_frames=hf.get("num_frames", 8), img_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 16), in_chans=hf.get("num_channels", 3),
        embed_dim=hf.get("hidden_size", 768), depth=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        mlp_ratio=hf.get("intermediate_size", 3072) / hf.get("hidden_size", 768),
        qkv_bias=hf.get("qkv_bias", True), attention_type=hf.get("attention_type", "divided_space_time"),
        drop_path_rate=float(hf.get("drop_path_rate", 0.0)), norm_eps=hf.get("layer_norm_eps", 1e-6),
        drop_rate=float(hf.get("hidden_dropout_prob", 0.0)),
        attn_drop_rate=float(hf.get("attention_probs_dropout_prob", 0.0)),
        multi_label=hf.get("problem_type") == "multi_label_classification",
    )


# ---------------------------------------------------------------------------------------------------
# safetensors


def save_safetensors(model: nn.Module, path: str | os.PathLike, classes: list[str] | None = None,
                     protocol: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (a model of any registered family) with its family and config in the metadata
    (``model_family``, ``model_config``; a TimeSformer's also as ``timesformer_config``, what earlier versions
    read), so ``load_safetensors`` can rebuild it,
    the class names when given (evaluation compares them with a dataset's: ``classes`` key, a JSON list) and
    the test protocol it was trained for (``test_protocol``: frames, sampling rate, clips x crops; predict
    uses it for a model without its run)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = model_metadata(model)
    if classes is not None:
        metadata["classes"] = json.dumps(list(classes))
    if protocol is not None:
        metadata["test_protocol"] = json.dumps(protocol)
    save_file(state, str(path), metadata=metadata)
    return path


def _safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Metadata and tensor shapes of a safetensors file, from its header alone (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # truncated, not a safetensors file, a header that contradicts the file's size
        raise ValueError(f"{path}: cannot be read as a safetensors file ({type(e).__name__}: {e})") from e


def check_config_against_shapes(cfg: TimeSformerConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Refuse a config that the file's own tensors do not bear out, before a model of that size is built.

    A metadata is only text: it could ask for any size of model (embed_dim 16384 x depth 64 is 5 GB) while
    the file holds a few bytes. The model built from it may hold no more numbers than the file's tensors, and
    its patch embedding, depth and head must have the shapes those tensors have; the strict load after
    construction checks everything else.
    """
    from pipeline.models.flops import parameter_count

    wanted = parameter_count(cfg)
    held = sum(math.prod(s) for s in shapes.values())
    problems = []
    patch = shapes.get("patch_embed.proj.weight")
    want_patch = (cfg.embed_dim, cfg.in_chans, cfg.patch_size, cfg.patch_size)
    if patch is not None and patch != want_patch:
        problems.append(f"patch_embed.proj.weight is {patch}, the config implies {want_patch}")
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    if depth != cfg.depth:
        problems.append(f"the file has {depth} blocks, the config says depth {cfg.depth}")
    head = shapes.get("head.weight")
    if cfg.num_classes and head is not None and head != (cfg.num_classes, cfg.embed_dim):
        problems.append(f"head.weight is {head}, the config implies {(cfg.num_classes, cfg.embed_dim)}")
    if wanted > held:
        problems.append(f"the config's model has {wanted:,} parameters, the file's tensors hold {held:,} numbers")
    if problems:
        raise CheckpointMismatchError(
            f"{where}: its metadata (timesformer_config: embed_dim {cfg.embed_dim}, depth {cfg.depth}, "
            f"{cfg.num_classes} classes) does not describe its tensors: {'; '.join(problems)}. No model was built. "
            f"The file was not written by save_safetensors / jobs/export.py or was edited afterwards; export the "
            f"run again (jobs/export.py), or build the model yourself and use load_checkpoint(model, path).")


def model_metadata(model: nn.Module) -> dict[str, str]:
    """The safetensors metadata that names a model's family and config (``load_safetensors`` rebuilds from it)."""
    family = family_of(model).name
    text = json.dumps(model.cfg.to_dict())
    meta = {"format": "pt", "model_family": family, "model_config": text}
    if family == "timesformer":
        meta["timesformer_config"] = text
    return meta


def config_from_metadata(meta: Mapping[str, str], where: str) -> Any:
    """The model config a safetensors file's metadata records (any family), or a ValueError naming the file."""
    family = meta.get("model_family", "timesformer")
    key = "timesformer_config" if family == "timesformer" and "timesformer_config" in meta else "model_config"
    if key not in meta:
        raise ValueError(f"{where}: no '{key}' in the safetensors metadata; build the model yourself and use "
                         f"load_checkpoint(model, path)")
    try:
        fields = json.loads(meta[key])
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where}: the metadata's {key} is not valid JSON ({e}); export the run again "
                         f"(jobs/export.py)") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: the metadata's {key} is a {type(fields).__name__}, not an object")
    try:
        cfg = config_from_dict(family, fields, where=where)
    except (TypeError, ValueError) as e:  # a field of the wrong type or value (NaN mlp_ratio): name the file
        if where in str(e):
            raise
        raise ValueError(f"{where}: the metadata's {key} is not a valid model config ({e})") from None
    odd = [f"{k}={v!r}" for k, v in fields.items() if isinstance(v, float) and not math.isfinite(v)]
    if odd:  # NaN passes every range check (all comparisons are false), then fails deep in the model's sizes
        raise ValueError(f"{where}: the metadata's {key} has non-finite values ({', '.join(odd)}); "
                         f"export the run again (jobs/export.py)")
    return cfg


def load_safetensors(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model (any registered family) from a file written by ``save_safetensors`` (strict). The config in
    the metadata is checked against the tensors in the header before the model is built."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    meta, shapes = _safetensors_header(path)
    cfg = config_from_metadata(meta, str(path))
    if not isinstance(cfg, TimeSformerConfig):
        family = family_of(cfg)
        wanted, held = family.parameter_count(cfg), sum(math.prod(s) for s in shapes.values())
        if wanted > held:
            raise CheckpointMismatchError(
                f"{path}: its metadata ({family.name} config) describes a model of {wanted:,} parameters, the file's "
                f"tensors hold {held:,} numbers. No model was built. Export the run again (jobs/export.py).")
        expected = family.state_shapes(cfg)
        if expected is not None and {k: tuple(v) for k, v in shapes.items()} != expected:
            odd = sorted(set(shapes) ^ set(expected)) or sorted(k for k in shapes if tuple(shapes[k]) != expected[k])
            raise CheckpointMismatchError(
                f"{path}: its metadata ({family.name} config) does not describe its tensors ({len(odd)} name(s) or "
                f"shape(s) differ, e.g. {', '.join(odd[:3])}). No model was built. The file was not written by "
                f"save_safetensors / jobs/export.py or was edited afterwards; export the run again.")
        return family.load_weights(family.build(cfg), load_file(str(path)))
    check_config_against_shapes(cfg, shapes, str(path))
    return load_into(TimeSformer(cfg), load_file(str(path)), where=str(path))


# ---------------------------------------------------------------------------------------------------
# One entry point for any file


def detect_format(state: Mapping[str, Any]) -> str:
    """``official``, ``hf``, ``timm_vit`` or ``ours`` from the keys of a loaded checkpoint."""
    if "model_state" in state:
        return "official"
    keys = [k for k in state if isinstance(k, str)]
    if any(k.startswith(("timesformer.", "classifier.")) for k in keys):
        return "hf"
    if any(k.startswith(("model.", "module.")) for k in keys) or "model" in state or "state_dict" in state:
        return "official"
    video_markers = ("time_embed",) + tuple(f"{s}_attn." for steps in EXTRA_STEPS.values() for s in steps)
    if any(k.startswith("blocks.") for k in keys) and not any(m in k for k in keys for m in video_markers):
        return "timm_vit"  # an image ViT; for space_only models it loads as is (see load_checkpoint)
    return "ours"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of a checkpoint file (a safetensors file, or a directory holding ``model.safetensors`` or
    ``pytorch_model.bin``, or a ``torch.save`` file read weights-only with the foreign config stand-ins), as a
    dict. An ``hf-hub:`` or ``s3://`` source is fetched first (``pipeline.models.hub.resolve_source``)."""
    from pipeline.models.hub import is_reference, resolve_source, weights_in

    if isinstance(path, str) and is_reference(path):
        path = resolve_source(path)
    path = Path(path)
    if path.is_dir():
        path = weights_in(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # a truncated or foreign file
            raise ValueError(f"{path}: cannot be read as a safetensors file ({type(e).__name__}: {e})") from e
    state = safe_torch_load(path, allowed=FOREIGN_CONFIG_GLOBALS)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict or a checkpoint dict; "
                         f"re-save it with torch.save(model.state_dict(), ...)")
    return dict(state)


def load_checkpoint(model: TimeSformer, source: str | os.PathLike | Mapping[str, Any], *,
                    fmt: str = "auto", reset_head: bool = False) -> TimeSformer:
    """Load any supported checkpoint (path or loaded dict) into ``model``, strictly.

    ``fmt``: ``auto`` (from the keys), ``ours``, ``official``, ``hf`` or ``timm_vit`` (inflation).
    """
    where = str(source) if not isinstance(source, Mapping) else "checkpoint"
    state = read_checkpoint(source) if not isinstance(source, Mapping) else dict(source)
    if fmt == "auto":
        fmt = detect_format(state)
        video_model = model.time_embed is not None or EXTRA_STEPS[model.cfg.attention_type]
        if fmt == "timm_vit" and not video_model:
            fmt = "ours"  # same keys: a space-only TimeSformer is an image ViT; load strictly, no head reset
    if fmt not in ("ours", "official", "hf", "timm_vit"):
        raise ValueError(f"unknown checkpoint format {fmt!r}: expected auto, ours, official, hf or timm_vit")
    if fmt == "official":
        state = from_official(state)
    require_tensors(state, where)  # a number or a string where a weight belongs: named, not an AttributeError
    if fmt == "hf":
        state = from_hf(state, where=where)
    elif fmt == "timm_vit":
        model.load_state_dict(inflate_vit(state, model, where=where), strict=True)
        return model
    return load_into(model, state, reset_head=reset_head, where=where)


PREPROCESSOR_FILE = "preprocessor_config.json"


def hf_preprocessor_dict(cfg: TimeSformerConfig) -> dict[str, Any]:
    """The image processor Hugging Face's TimeSformer checkpoints name (VideoMAE's), with this model's input
    size and normalisation: short side to the crop size, a centre crop, rescale to [0, 1], then mean/std."""
    return {"image_processor_type": "VideoMAEImageProcessor", "do_resize": True,
            "size": {"shortest_edge": cfg.img_size}, "resample": 2, "do_center_crop": True,
            "crop_size": {"height": cfg.img_size, "width": cfg.img_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.mean), "image_std": list(cfg.std)}


def checkpoint_normalization(path: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input normalisation a checkpoint says its weights were trained with, where it says so: our
    safetensors (its metadata's model config), a Hugging Face directory (its preprocessor config) or a timm
    model directory (its ``config.json``: ``pretrained_cfg.mean/std``, or top-level ``mean/std``); None for
    formats that do not record it (a .pth state dict). Reads headers and JSON only."""
    path = Path(path)
    try:
        if path.is_dir():
            pre = path / PREPROCESSOR_FILE
            if pre.is_file():
                d = json.loads(pre.read_text())
                if not d.get("do_normalize", True) or "image_mean" not in d or "image_std" not in d:
                    return None  # it does not say (or does not normalise): the recipe's constants are taken
                return tuple(map(float, d["image_mean"])), tuple(map(float, d["image_std"]))
            timm = path / "config.json"
            if timm.is_file():  # timm's hub config; a Hugging Face model config has neither key
                d = json.loads(timm.read_text())
                for where in (d.get("pretrained_cfg"), d):
                    if isinstance(where, dict) and "mean" in where and "std" in where:
                        return tuple(map(float, where["mean"])), tuple(map(float, where["std"]))
            path = path / "model.safetensors"
        if path.suffix == ".safetensors" and path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            key = next((k for k in ("model_config", "timesformer_config") if k in meta), None)  # any family's
            if key is not None:
                d = json.loads(meta[key])
                if "mean" in d and "std" in d:  # files written before the model carried it: the original's
                    return tuple(map(float, d["mean"])), tuple(map(float, d["std"]))
                return DEFAULT_MEAN, DEFAULT_STD
    except Exception as e:  # noqa: BLE001 -- OSError, bad JSON, safetensors' own error type: all one answer
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
                         ) from None
    return None


def save_hf(model: TimeSformer, directory: str | os.PathLike, labels: list[str] | None = None) -> Path:
    """A Hugging Face ``TimesformerForVideoClassification`` directory (config.json + model.safetensors)
    holding this model: ``transformers`` loads it with ``from_pretrained(directory)``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(model.cfg)
    labels = labels or [f"LABEL_{i}" for i in range(model.cfg.num_classes)]
    if len(labels) != model.cfg.num_classes:
        raise ValueError(f"{len(labels)} label names for a model with {model.cfg.num_classes} classes")
    config.pop("num_labels")
    config.update(model_type="timesformer", architectures=["TimesformerForVideoClassification"],
                  id2label={str(i): name for i, name in enumerate(labels)},
                  label2id={name: i for i, name in enumerate(labels)})
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / PREPROCESSOR_FILE).write_text(json.dumps(hf_preprocessor_dict(model.cfg), indent=1))
    state = {k: v.detach().float().contiguous().cpu() for k, v in to_hf(model.state_dict()).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
