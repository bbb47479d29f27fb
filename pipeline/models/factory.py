"""Building a registered model, with or without its default weights: the one place that knows both the
architectures (the registry's families) and where weights come from (``hub``, ``convert``), so neither imports the
other."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.registry import MODELS, family_of, model_config_of
from pipeline.models.timesformer import TimeSformer


def create_model(name: str, pretrained: bool | str = False, **overrides: Any) -> nn.Module:
    """Build a registered model (pipeline.models.registry): ``create_model("timesformer_l", num_classes=600)``,
    ``create_model("i3d_r50", pretrained=True)``.

    ``pretrained=True`` starts from the variant's default weights (``MODELS[name].pretrained``), the timm way;
    a string names another source (``hf-hub:<org>/<name>``, ``s3://...``, a path). The source is fetched once
    (``pipeline.models.hub``, huggingface_hub's cache; ``HF_HUB_OFFLINE=1`` reads the cache only) and loaded
    strictly (an image ViT is inflated); the model's ``mean``/``std`` are the source's where it records them
    (a ``mean``/``std`` override that contradicts it is refused), and its class count too unless ``num_classes``
    says otherwise, in which case the head starts fresh."""
    probe = model_config_of(name, **overrides)  # an unknown model or a bad override: said before any download
    family = family_of(name)
    if not pretrained:
        return family.build(probe)
    from pipeline.models.convert import (
        checkpoint_normalization,
        detect_format,
        from_official,
        load_checkpoint,
        read_checkpoint,
    )
    from pipeline.models.hub import resolve_source

    source = pretrained if isinstance(pretrained, str) else MODELS[name].pretrained
    if not source:
        raise ValueError(f"variant {name!r} has no default weights (pretrained=True); give a source, "
                         f"create_model({name!r}, pretrained='hf-hub:<org>/<name>' or a path), or build it "
                         f"and use load_checkpoint")
    path = resolve_source(source)
    recorded = checkpoint_normalization(path)
    if recorded is not None:
        asked = [k for k in ("mean", "std") if k in overrides]
        ours, theirs = probe.mean + probe.std, recorded[0] + recorded[1]
        if asked and (len(ours) != len(theirs) or any(abs(a - b) > 1e-6 for a, b in zip(ours, theirs, strict=True))):
            raise ValueError(f"{source} was trained on inputs normalised with mean {list(recorded[0])} and std "
                             f"{list(recorded[1])}; the {'/'.join(asked)} given differ(s): leave them out (the model "
                             f"takes the source's) or start from other weights")
        overrides = {**overrides, "mean": recorded[0], "std": recorded[1]}
    if family.name != "timesformer":  # the family's loader converts its layouts (an image model is inflated)
        theirs = _video_head_classes(path)  # a video model's classes are kept (an image model's never are)
        if theirs is not None and "num_classes" not in overrides:
            overrides = {**overrides, "num_classes": theirs}
        model = family.build(model_config_of(name, **overrides))
        try:  # another class count asked for: a fresh head
            return family.load_weights(model, path, reset_head=theirs is not None and theirs != model.cfg.num_classes)
        except ValueError as e:
            raise type(e)(f"{source} ({path}): {e}") from None
    state = read_checkpoint(path)
    fmt = detect_format(state)
    head = {"hf": state.get("classifier.weight"), "ours": state.get("head.weight"),
            "timm_vit": state.get("head.weight"),
            "official": from_official(state).get("head.weight") if fmt == "official" else None}.get(fmt)
    theirs = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.ndim == 2 else None
    # a video model's classes are kept; an image model's (ImageNet's 1000) never become the variant's
    if theirs is not None and "num_classes" not in overrides and fmt != "timm_vit":
        overrides = {**overrides, "num_classes": theirs}
    model = TimeSformer(model_config_of(name, **overrides))
    reset = theirs is not None and theirs != model.cfg.num_classes
    try:
        return load_checkpoint(model, state, reset_head=reset)
    except ValueError as e:
        raise type(e)(f"{source} ({path}): {e}") from None


def _video_head_classes(path: Any) -> int | None:
    """The class count of a video classifier file of another family (ours: ``head.weight``; PySlowFast's:
    ``head.projection.weight``); None for an image model (its ImageNet classes are not the video model's) or a
    file without a head."""
    from pipeline.models.convert import read_checkpoint

    state = read_checkpoint(path)
    state = state.get("model_state", state) if isinstance(state.get("model_state"), dict) else state
    for key in ("head.weight", "head.projection.weight"):
        w = state.get(key)
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            return int(w.shape[0])
    return None
