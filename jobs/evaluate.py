#!/usr/bin/env python
"""Run the paper's test protocol on a model: per video, the softmax scores of k temporal clips x 3 crops
averaged (or, for long-video recipes, of every non-overlapping clip covering the video).

    python jobs/evaluate.py runs/k400_base-20261126-101500                # its export (or newest checkpoint)
    python jobs/evaluate.py model.safetensors --recipe k400_base test.temporal_clips=10
    python jobs/evaluate.py runs/... --split val --max-videos 500 --out report.json

The data and protocol come from the run's config.yaml (or --recipe) with key=value overrides. Prints
top-1/top-5 and writes the report (per-video predictions, per-class accuracy, confusion matrix).
One process; use a GPU when there is one. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run directory, or a model.safetensors written by jobs/export.py")
    p.add_argument("--recipe", help="recipe for data and protocol (default: the run's config.yaml)")
    p.add_argument("--split", help="split to test (default: the recipe's data.test_split)")
    p.add_argument("--max-videos", type=int, default=0, help="stop after this many videos (0 = all)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--out", help="report path (default: RUN_DIR/eval/test-<split>.json, or next to the model)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (test.temporal_clips=10 ...)")
    args = p.parse_intermixed_args(argv)
    import torch

    from pipeline.config import ConfigError, apply_layer, load_recipe, load_resolved, parse_overrides, validate
    from pipeline.data.shards import ShardError, load_index
    from pipeline.models.convert import load_safetensors
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.evaluate import test_protocol
    from pipeline.train.main import clip_config, export_model

    src = Path(args.model).resolve()
    try:
        if src.is_dir():
            cfg = load_resolved(src / "config.yaml") if not args.recipe else load_recipe(args.recipe)
            model_path = src / "export" / "model.safetensors"
            if not model_path.exists():
                if ckpt.latest_complete(src) is None:
                    raise ConfigError(f"{src}: no export and no complete checkpoint to evaluate")
                model_path = export_model(src, cfg)
        else:
            if not args.recipe:
                raise ConfigError("a model file needs --recipe (which dataset and protocol to test on)")
            cfg, model_path = load_recipe(args.recipe), src
        if args.overrides:
            apply_layer(cfg, parse_overrides(args.overrides), "command line")
            validate(cfg)
        model = load_safetensors(model_path)
        index, storage = load_index(cfg.data.index, cfg.data.version or None)
    except (ConfigError, ShardError, FileNotFoundError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    split = args.split or cfg.data.test_split
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device, dtype).eval()
    report = test_protocol(model, dtype, index, storage, split=split, clip=clip_config(cfg), protocol=cfg.test.protocol,
                           temporal_clips=cfg.test.temporal_clips, spatial_crops=cfg.test.spatial_crops,
                           batch_size=cfg.test.batch_size, device=device, num_workers=args.workers,
                           max_videos=args.max_videos, progress=True)
    out = Path(args.out) if args.out else (src / "eval" / f"test-{split}.json" if src.is_dir()
                                           else src.with_suffix(f".test-{split}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    views = report["views_per_video"] or "all covering clips x crops"
    print(f"{report['videos']} videos of {index.dataset} v{index.version} {split} ({cfg.test.protocol}, "
          f"{views} views): top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%\nreport: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
