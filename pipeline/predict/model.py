"""The model a prediction runs and how it looks at a video: loading any MODEL the command accepts, the test
protocol (clips x crops) that turns a video into views, and the per-video scores and features.

A model brings its input normalisation (``cfg.mean`` / ``cfg.std``) and its class names; nothing here uses
module constants. The protocol is the run's recipe's (``data.*`` and ``test.*`` of its ``config.yaml``) for a
run directory, else the paper's for the model's frame count: one temporal clip in the middle of the video x 3
spatial crops along the long side, clips of ``T`` frames every ``rate`` frames of a 30 fps timeline (8x32,
16x16, 96x4: the original's configs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.video import DecodeLimits, FixedRateSampler, SegmentSampler, decode_frames, probe
from pipeline.models.timesformer import TimeSformer, TimeSformerConfig
from pipeline.predict.errors import PredictError

# The original's sampling rate for each released frame count (frames of a 30 fps timeline between sampled frames:
# TimeSformer 8x32, -HR 16x16, -L 96x4); another frame count spans 256 frames (8.5 s), as 8x32 and 16x16 do.
PAPER_SAMPLING_RATES = {8: 32, 16: 16, 96: 4}
CLIP_SPAN_FRAMES = 256



@dataclass(frozen=True)
class Protocol:
    """How one video becomes views: ``temporal_clips`` clips (uniformly spaced; ``long_video``: every
    non-overlapping clip covering the video) x ``spatial_crops`` crops of ``crop`` pixels (1: centre; 3: both
    ends and the centre of the long side). Scores are averaged over the views."""

    num_frames: int
    sampling_rate: int
    crop: int
    temporal_clips: int = 1
    spatial_crops: int = 3
    mode: str = "multi_view"  # multi_view or long_video
    sampler: str = "fixed_rate"  # fixed_rate (Kinetics) or segment (SSv2: one clip, a frame per segment)
    ref_fps: float = 30.0
    short_video: str = "loop"
    source: str = ""  # where these settings come from, for people

    def check(self) -> None:
        problems = []
        if self.mode not in ("multi_view", "long_video"):
            problems.append(f"mode {self.mode!r}: expected multi_view or long_video")
        if self.sampler not in ("fixed_rate", "segment"):
            problems.append(f"sampler {self.sampler!r}: expected fixed_rate or segment")
        if self.spatial_crops not in (1, 3):
            problems.append(f"{self.spatial_crops} spatial crops: expected 1 (centre) or 3 (along the long side)")
        if self.temporal_clips < 1 or self.num_frames < 1 or self.sampling_rate < 1 or self.crop < 1:
            problems.append("clips, frames, sampling rate and crop must be positive")
        if problems:
            raise PredictError(f"test protocol ({self.source or 'options'}): {'; '.join(problems)}")

    @property
    def clips_per_video(self) -> int | None:
        """Temporal clips per video (None: as many as cover it, the long-video protocol)."""
        if self.sampler == "segment":
            return 1
        return None if self.mode == "long_video" else self.temporal_clips

    def clip_specs(self, duration: float):
        """The clips' frame times for a video of ``duration`` seconds (as the test loader samples them)."""
        if self.sampler == "segment":
            return [SegmentSampler(self.num_frames).sample(duration, train=False)]
        temporal = FixedRateSampler(self.num_frames, self.sampling_rate, self.ref_fps, self.short_video)
        if self.mode == "long_video":
            return temporal.covering_clips(duration)
        return temporal.uniform_clips(duration, self.temporal_clips)

    def describe(self) -> str:
        if self.sampler == "segment":
            clips = f"1 clip of {self.num_frames} segments (a middle frame each)"
        else:
            span = self.num_frames * self.sampling_rate / self.ref_fps
            what = ("every non-overlapping clip covering the video" if self.mode == "long_video"
                    else f"{self.temporal_clips} temporal clip{'s' if self.temporal_clips > 1 else ''}")
            clips = (f"{what} of {self.num_frames} frames every {self.sampling_rate} at {self.ref_fps:g} fps "
                     f"({span:.2g} s)")
        crops = "centre crop" if self.spatial_crops == 1 else "3 crops along the long side"
        return f"{clips} x {crops} of {self.crop}px, scores averaged" + (f" [{self.source}]" if self.source else "")


def paper_protocol(cfg: TimeSformerConfig) -> Protocol:
    """The paper's test protocol for a model alone (no recipe): 1 middle clip x 3 crops, at the original's
    sampling rate for its frame count."""
    rate = PAPER_SAMPLING_RATES.get(cfg.num_frames, max(1, round(CLIP_SPAN_FRAMES / cfg.num_frames)))
    return Protocol(num_frames=cfg.num_frames, sampling_rate=rate, crop=cfg.img_size, temporal_clips=1,
                    spatial_crops=3, source=f"the paper's for a {cfg.num_frames}x{cfg.img_size} model")


def parse_views(text: str) -> tuple[int, int]:
    """``--views TxS`` -> (temporal clips, spatial crops): ``1x3``, ``10x3``, ``4x1``."""
    t, sep, s = text.lower().partition("x")
    if not sep or not t.isdigit() or not s.isdigit() or int(t) < 1 or int(s) not in (1, 3):
        raise PredictError(f"--views {text!r}: expected TxS, temporal clips x spatial crops (S is 1 or 3), e.g. 1x3 "
                           f"or 10x3")
    return int(t), int(s)


# ---------------------------------------------------------------------------------------------------
# Loading any MODEL


@dataclass
class LoadedModel:
    model: TimeSformer
    classes: list[str]
    protocol: Protocol  # the default: the recipe's (run directory) or the paper's
    description: str  # what was loaded, from where, for people and for the outputs' records
    classes_from: str = ""
    weights: str = ""  # "sha256:<hex>" of the weights (see weights_digest): a resumed output compares it


    @property
    def multi_label(self) -> bool:
        return bool(getattr(self.model.cfg, "multi_label", False))


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a weights file: the same bytes, the same model, whatever its path."""
    from pipeline.data.shards import sha256_file

    return f"sha256:{sha256_file(path)}"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` of a state dict's tensors (names, dtypes, shapes and bytes, in name order): the digest of
    a model consolidated in memory from a checkpoint, which has no file to hash."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{h.hexdigest()}"


def _hub_resolve(ref: str) -> Path:
    try:
        from pipeline.models.hub import resolve_source
    except ImportError:
        raise PredictError(f"{ref}: hub and s3:// model references need pipeline.models.hub, which this installation "
                           "lacks; download the model and give its local path") from None
    try:
        return Path(resolve_source(ref))
    except ValueError as e:  # SourceError: not cached, offline, no such object; it says what to do
        raise PredictError(str(e)) from None


def load_model(ref: str) -> LoadedModel:
    """MODEL as the command takes it: a run directory (its export, else its newest complete checkpoint, with
    the recipe's protocol), an exported ``model.safetensors`` (or a directory holding one), a Hugging Face
    ``TimesformerForVideoClassification`` directory, or ``hf-hub:org/repo`` / ``s3://...`` (resolved to a
    local copy by ``pipeline.models.hub``)."""
    shown = ref
    if ref.startswith(("hf-hub:", "s3://")):
        path = _hub_resolve(ref)
    else:
        path = Path(ref).expanduser()
    if not path.exists():
        raise PredictError(f"{ref}: no such file or directory. MODEL is a run directory (runs/<name>), an exported "
                           f"model.safetensors, a Hugging Face export directory, or hf-hub:<org>/<repo>")
    path = path.resolve()
    if not ref.startswith(("hf-hub:", "s3://")):
        shown = str(path)  # the same model however it was named: a resumed output compares this
    if path.is_dir() and (path / "config.yaml").is_file():
        return _load_run_dir(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_dir(path, shown)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if path.is_file() and path.suffix == ".safetensors":
        return _load_safetensors(path, shown)
    raise PredictError(f"{ref}: not a model this command reads (a run directory with config.yaml, a .safetensors "
                       f"file written by jobs/export.py, or a Hugging Face directory with config.json)")


def _named(classes: list[str] | None, num_classes: int, where: str) -> tuple[list[str], str]:
    if classes is None:
        return [f"class_{i}" for i in range(num_classes)], "not recorded with the model: named class_<i>"
    if len(classes) != num_classes:
        raise PredictError(f"{where}: {len(classes)} class names for a model with {num_classes} outputs; re-export it")
    return list(classes), ""


def _load_safetensors(path: Path, shown: str) -> LoadedModel:
    from pipeline.models.convert import load_safetensors
    from pipeline.train.evaluate import EvaluationError, model_classes

    try:
        model = load_safetensors(path)
        classes, where = model_classes(path)
    except (ValueError, EvaluationError) as e:
        raise PredictError(str(e)) from None
    names, note = _named(classes, model.cfg.num_classes, str(path))
    return LoadedModel(model, names, recorded_protocol(path, model.cfg), f"{shown}", note or where,
                       file_digest(path))


MAX_TEST_CROP = 2048  # the largest test view a recorded protocol may ask for (a 4K frame's short side)


def recorded_protocol(path: Path, cfg: Any) -> Protocol:
    """The test protocol an export records (``jobs/export.py`` writes its recipe's), else the paper's for the
    model's size (an export made before models carried it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("test_protocol")
    if text is None:
        return paper_protocol(cfg)
    names = {f.name for f in dataclasses.fields(Protocol)} - {"source"}
    try:
        d = json.loads(text)
        protocol = Protocol(**{k: v for k, v in d.items() if k in names}, source=f"recorded with {path.name}")
    except (ValueError, TypeError) as e:
        raise PredictError(f"{path}: metadata 'test_protocol' is not a protocol ({e}); re-export the model, or give "
                           f"--views and --sampling-rate") from None
    # the test views may be larger than the training crop (test.crop: a 3D CNN tests at 256 after 224); a
    # TimeSformer's must hold whole patches, and no size runs away (the file's metadata is only text)
    patch = getattr(cfg, "patch_size", 1)
    if (protocol.num_frames != cfg.num_frames or not isinstance(protocol.crop, int) or protocol.crop % patch
            or not 0 < protocol.crop <= max(MAX_TEST_CROP, cfg.img_size)):
        raise PredictError(f"{path}: its recorded test protocol ({protocol.num_frames} frames, {protocol.crop}px) does "
                           f"not fit the model ({cfg.num_frames} frames, {cfg.img_size}px, test views a multiple of "
                           f"{patch}px up to {max(MAX_TEST_CROP, cfg.img_size)}px); re-export the model")
    protocol.check()
    return protocol


def _load_run_dir(run: Path) -> LoadedModel:
    """A run's model: its export when there is one (the end of training writes it), else the weights its export
    would hold (the best or newest complete checkpoint, its EMA when the run exports that), consolidated in memory
    (nothing is written into the run directory)."""
    from pipeline.config import ConfigError, load_resolved
    from pipeline.models.convert import load_safetensors
    from pipeline.models.registry import build, model_config
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.engine import consolidated_state_dict
    from pipeline.train.evaluate import EvaluationError, model_classes, recorded_dataset

    try:
        cfg = load_resolved(run / "config.yaml")
        export = run / "export" / "model.safetensors"
        if export.is_file():
            model, what = load_safetensors(export), f"{run} (its export)"
            classes, where = model_classes(export, run)
            digest = file_digest(export)
        else:
            from pipeline.train.export import run_weights

            if ckpt.latest_complete(run) is None:
                raise PredictError(f"{run}: no export and no complete checkpoint: nothing to predict with yet")
            tag, ema = run_weights(run, cfg)  # what its export would hold: the best checkpoint, its EMA
            model = build(model_config(cfg))
            state = consolidated_state_dict(ckpt.checkpoint_root(run), tag, ema=ema)
            digest = state_digest(state)
            model.load_state_dict(state, strict=True)
            what = f"{run} (checkpoint {tag}{', its EMA weights' if ema else ''}, not exported)"
            recorded = recorded_dataset(run)
            classes, where = (recorded["classes"], str(run / "dataset.json")) if recorded else (None, "")
    except (ConfigError, EvaluationError, ValueError, FileNotFoundError) as e:
        raise PredictError(str(e)) from None
    except RuntimeError as e:  # load_state_dict: the checkpoint is not the model of config.yaml
        raise PredictError(f"{run}: its newest checkpoint does not fit the model of its config.yaml "
                           f"({' '.join(str(e).split())[:300]})") from None
    names, note = _named(classes, model.cfg.num_classes, str(run))
    from pipeline.train.export import recipe_protocol

    protocol = Protocol(**recipe_protocol(cfg), source=f"the recipe of {run.name}")
    return LoadedModel(model, names, protocol, what, note or where, digest)


IMAGE_MODEL_ADVICE = ("not a video classifier: fine-tune it first (python jobs/launch.py --recipe <recipe> "
                      "model.init=<it>), then predict with the run")


def _check_video_classifier(directory: str, hf: dict[str, Any]) -> None:
    """Refuse what the directory's config.json says is not a TimeSformer video classifier: a timm image ViT (the
    starting point of a fine-tuning, ``model.init``: its weights have no temporal attention and its head classifies
    ImageNet images), or another transformers model type."""
    if "pretrained_cfg" in hf or ("architecture" in hf and "model_type" not in hf):
        name = hf.get("architecture") or "a ViT"
        raise PredictError(f"{directory}: an image model (a timm {name}), {IMAGE_MODEL_ADVICE}")
    kind = hf.get("model_type")
    if kind is not None and kind != "timesformer":
        raise PredictError(f"{directory}: a Hugging Face {kind!r} model, not a TimeSformer video classifier "
                           f"(config.json's model_type); give a TimesformerForVideoClassification, a run directory "
                           f"or an exported model.safetensors")


def _load_hf_dir(directory: Path, shown: str) -> LoadedModel:
    """A ``TimesformerForVideoClassification`` directory: config.json (architecture, id2label), the weights
    (model.safetensors, or pytorch_model.bin read weights-only) and preprocessor_config.json's normalisation."""
    from pipeline.models.convert import checkpoint_normalization, config_from_hf, load_checkpoint

    try:
        hf = json.loads((directory / "config.json").read_text())
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
        _check_video_classifier(shown, hf)
        cfg = config_from_hf(hf)
        norm = checkpoint_normalization(directory)
        if norm is not None:
            cfg = dataclasses.replace(cfg, mean=norm[0], std=norm[1])
        if hf.get("problem_type") == "multi_label_classification" and "multi_label" in {
                f.name for f in dataclasses.fields(cfg)}:
            cfg = dataclasses.replace(cfg, multi_label=True)
        weights = directory / "model.safetensors"
        if not weights.is_file() and (directory / "pytorch_model.bin").is_file():
            weights = directory / "pytorch_model.bin"
        model = load_checkpoint(TimeSformer(cfg), weights, fmt="hf")
        digest = file_digest(weights)
    except PredictError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise PredictError(f"{directory}: not a readable Hugging Face TimeSformer directory "
                           f"({' '.join(str(e).split())[:300]})") from None
    id2label = hf.get("id2label") or {}
    try:
        classes = [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else None
    except (ValueError, TypeError):
        raise PredictError(f"{directory}/config.json: id2label keys must be class indices") from None
    names, note = _named(classes, cfg.num_classes, str(directory / "config.json"))
    return LoadedModel(model, names, paper_protocol(cfg), f"{shown} (Hugging Face format)",
                       note or f"{len(names)} from {directory / 'config.json'} (id2label)", digest)


# ---------------------------------------------------------------------------------------------------
# A video's views, scores and features


def read_views(source: str | bytes, name: str, protocol: Protocol, mean, std,
               limits: DecodeLimits | None = None) -> tuple[torch.Tensor, int]:
    """Every view of one video as ``(V, C, T, crop, crop)`` float32, normalised with the model's ``mean`` /
    ``std``, and the number of temporal clips. ``VideoDecodeError`` for a video that does not decode."""
    from pipeline.data.transforms import TestTransform

    info = probe(source, name, limits=limits)
    specs = protocol.clip_specs(info.duration)
    spatial = TestTransform(crop=protocol.crop, num_crops=protocol.spatial_crops, mean=tuple(mean), std=tuple(std))
    views = [spatial(decode_frames(source, spec.times, name=name, limits=limits).frame_list) for spec in specs]
    return torch.cat(views), len(specs)


@dataclass
class Result:
    """One input's outcome: averaged scores (softmax, or sigmoid for a multi-label model) and feature, or an
    error saying why it could not be predicted."""

    input: str
    scores: np.ndarray | None = None  # (K,) float32
    feature: np.ndarray | None = None  # (D,) float32
    views: int = 0
    clips: int = 0
    error: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Predictor:
    """A model on a device with its protocol: ``predict(input_id)`` decodes the input's views and returns its
    ``Result``; a broken input becomes a Result with ``error`` set, never an exception."""

    def __init__(self, model: TimeSformer, protocol: Protocol, *, device: torch.device | None = None,
                 batch_size: int = 8, limits: DecodeLimits | None = None) -> None:
        protocol.check()
        self.device = device or default_device()
        # bf16 on GPUs as the test protocol runs; fp32 on CPUs, where bf16 is slower and less exact
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.protocol, self.batch_size, self.limits = protocol, max(1, batch_size), limits
        self.multi_label = bool(getattr(model.cfg, "multi_label", False))
        self.forward_calls = 0  # model passes made (tests count them)

    @property
    def cfg(self) -> TimeSformerConfig:
        return self.model.cfg

    @torch.no_grad()
    def scores(self, views: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores and pre-head features of ``(V, C, T, H, W)`` normalised views, each averaged over the views:
        softmax probabilities (sigmoid for a multi-label model) and the final-norm CLS feature the head reads."""
        feats, probs = [], []
        for i in range(0, len(views), self.batch_size):
            chunk = views[i:i + self.batch_size].to(self.device, self.dtype)
            f = self.model.forward_features(chunk)
            logits = self.model.head(f).float()
            self.forward_calls += 1
            probs.append(torch.sigmoid(logits) if self.multi_label else F.softmax(logits, -1))
            feats.append(f.float())
        return (torch.cat(probs).mean(0).cpu().numpy().astype(np.float32),
                torch.cat(feats).mean(0).cpu().numpy().astype(np.float32))

    def load(self, input_id: str) -> tuple[torch.Tensor, int]:
        """The views of an input (read from its path or object store)."""
        from pipeline.predict.inputs import read_source

        return read_views(read_source(input_id), input_id, self.protocol, self.cfg.mean, self.cfg.std, self.limits)

    def predict(self, input_id: str, loaded: tuple[torch.Tensor, int] | BaseException | None = None) -> Result:
        """``loaded``: the views already read (by a prefetching thread), or the error reading them raised."""
        t0 = time.perf_counter()
        try:
            if isinstance(loaded, BaseException):
                raise loaded
            views, clips = loaded if loaded is not None else self.load(input_id)
            scores, feature = self.scores(views)
        except Exception as e:  # noqa: BLE001 -- a broken input is reported and the others go on
            return Result(input_id, error=describe_error(e, input_id), seconds=time.perf_counter() - t0)
        if not (np.isfinite(scores).all() and np.isfinite(feature).all()):
            return Result(input_id, error="the model produced non-finite scores", views=len(views), clips=clips,
                          seconds=time.perf_counter() - t0)
        return Result(input_id, scores, feature, len(views), clips, seconds=time.perf_counter() - t0)


def describe_error(e: BaseException, input_id: str) -> str:
    """One line saying why an input failed, without repeating its name when the error already starts with it."""
    text = " ".join(str(e).split()) or type(e).__name__
    if text.startswith(input_id):
        text = text[len(input_id):].lstrip(": ")
    kind = "" if isinstance(e, (ValueError, OSError, RuntimeError)) else f"{type(e).__name__}: "
    return f"{kind}{text}"[:500]


def topk(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, highest first (ties by index)."""
    k = min(k, len(scores))
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
