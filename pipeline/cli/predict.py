"""Predict the classes of videos with a trained TimeSformer: top-k class names per video under the model's test
protocol (scores averaged over temporal clips x spatial crops), optionally per-video features and attention
figures, in this process or on a Ray cluster.

    python jobs/predict.py runs/k400_base-20261126-101500 clips/                     # a table on stdout
    python jobs/predict.py model.safetensors a.mp4 b.mkv --out preds.jsonl            # JSONL (or .csv)
    python jobs/predict.py hf-hub:facebook/timesformer-base-finetuned-k400 @videos.txt --out preds.csv
    python jobs/predict.py runs/<run> s3://bucket/videos/ --out preds.jsonl --features feats.safetensors
    python jobs/predict.py runs/<run> clips/ --views 10x3 --topk 1 --out preds.csv      # another protocol
    python jobs/predict.py runs/<run> clips/ --out preds.jsonl --ray                  # a local Ray
    python jobs/predict.py runs/<run> s3://bucket/videos/ --out p.jsonl --ray ray://head:10001
    python jobs/predict.py runs/<run> one.mp4 --explain maps/                         # attention figures
    python jobs/predict.py runs/<run> clips/ --dry-run                                # what would run

MODEL: a run directory (its export, else its newest complete checkpoint; the recipe's test protocol), an
exported model.safetensors (config and class names in its metadata), a Hugging Face export directory, or
hf-hub:<org>/<repo>. The model's own input normalisation and class names are used.

INPUTS: video files, folders (searched recursively for video extensions), list files (@list.txt, or any
argument ending in .txt or .csv: one path or URI per line, relative to the list's folder), s3://bucket/prefix.

Protocol: a run directory's recipe (test.temporal_clips x test.spatial_crops, data.num_frames,
data.sampling_rate); for a model alone, the paper's: 1 clip in the middle of the video x 3 crops, at the
original's sampling rate for its frame count (8x32, 16x16, 96x4). --views and --sampling-rate override it.

Resuming: with an existing --out (and --features), inputs already there are skipped; inputs that failed are
tried again. Outputs of another model (or of other weights under the same name: their sha256 is recorded) or
protocol are refused, not mixed. --overwrite starts over. Broken inputs (unreadable, corrupt, no frames) get an
error row and do not stop the others. Exit codes: 0 every input predicted, 1 some inputs failed (their rows say why), 2
nothing ran (a bad MODEL, no inputs, a bad option or output).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from pipeline.models.registry import scheme_of


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive integer")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: expected a score threshold in [0, 1]")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timesformer-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="run directory, model.safetensors, Hugging Face directory or "
                                                  "hf-hub:<org>/<repo>")
    p.add_argument("inputs", metavar="INPUTS", nargs="+", help="video files, folders, @list.txt / .csv, s3:// prefixes")
    p.add_argument("--out", type=Path, help="predictions file: .jsonl or .csv (default: a table on stdout); resumed "
                                            "when it exists")
    p.add_argument("--features", type=Path, metavar="FILE.safetensors",
                   help="also write each input's feature (the final-norm CLS token the classifier reads, averaged "
                        "over the views): tensors features [N, D] float32 and ids; written in parts while it runs, "
                        "merged at the end; resumed when it or its parts exist")
    p.add_argument("--explain", type=Path, metavar="DIR", help="write an attention figure (PNG) per input into DIR")
    p.add_argument("--topk", type=positive, default=5, help="classes per input (default 5)")
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="multi-label models: report every class scoring at least this (default 0.5)")
    p.add_argument("--views", metavar="TxS", help="temporal clips x spatial crops (1 or 3), e.g. 1x3 or 10x3")
    p.add_argument("--sampling-rate", type=positive, help="frames of a 30 fps timeline between sampled frames")
    p.add_argument("--sampler", choices=("fixed_rate", "segment"),
                   help="fixed_rate (Kinetics) or segment (SSv2: one clip, the middle frame of T segments)")
    p.add_argument("--batch-size", type=positive, default=8, help="views per forward pass (default 8)")
    p.add_argument("--workers", type=int, default=1, help="threads decoding the next inputs (default 1; 0: none)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray: a local Ray on 127.0.0.1 (no ADDRESS) or a cluster's address")
    p.add_argument("--actors", type=positive, help="model actors on Ray (default: one per GPU, else CPUs / 4)")
    p.add_argument("--overwrite", action="store_true", help="start --out and --features over instead of resuming")
    p.add_argument("--dry-run", action="store_true", help="say what would be predicted, with which model and "
                                                          "protocol; run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pipeline.predict").setLevel(logging.INFO)
    import torch

    from pipeline.predict import PredictError, expand_inputs, load_model, run_predictions
    from pipeline.predict.model import parse_views

    try:
        if args.out is not None and args.out.is_dir():
            raise PredictError(f"--out {args.out} is a directory: give a file name (preds.jsonl or preds.csv)")
        if args.out is not None:
            from pipeline.predict.outputs import output_format

            output_format(args.out)
        if args.features is not None and args.features.suffix != ".safetensors":
            raise PredictError(f"--features {args.features}: features are written as safetensors (*.safetensors)")
        loaded = load_model(args.model)
        protocol = loaded.protocol
        changes = {}
        if args.views:
            changes["temporal_clips"], changes["spatial_crops"] = parse_views(args.views)
            changes["mode"] = "multi_view"
        if args.sampling_rate:
            changes["sampling_rate"] = args.sampling_rate
        if args.sampler:
            changes["sampler"] = args.sampler
        if changes:
            source = f"{protocol.source}, changed on the command line"
            protocol = dataclasses.replace(protocol, **changes, source=source)
        protocol.check()
        if args.explain is not None:
            from pipeline.predict.explain import SUPPORTED

            if getattr(loaded.model.cfg, "attention_type", None) not in SUPPORTED:
                raise PredictError(f"--explain supports {', '.join(SUPPORTED)} attention; this model uses "
                                   f"{scheme_of(loaded.model.cfg)}")
        inputs, notes = expand_inputs(args.inputs)
        device = torch.device(args.device) if args.device else None
    except PredictError as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    cfg = loaded.model.cfg
    kind = "multi-label (sigmoid, every class >= --threshold and the top-k)" if loaded.multi_label else \
        "single-label (softmax)"
    print(f"predict: model {loaded.description}: {scheme_of(cfg)}, {cfg.num_frames}x{cfg.img_size}, "
          f"{cfg.num_classes} classes ({loaded.classes_from}), {kind}, input mean {list(cfg.mean)} std {list(cfg.std)}",
          file=sys.stderr)
    print(f"predict: protocol: {protocol.describe()}", file=sys.stderr)
    print(f"predict: inputs: {len(inputs)} ({'; '.join(notes)})", file=sys.stderr)
    if args.dry_run:
        where = f"on Ray ({args.ray})" if args.ray else f"in this process on {device or 'the default device'}"
        print(f"predict: would run {where}; rows to {args.out or 'stdout'}"
              + (f", features to {args.features}" if args.features else "")
              + (f", attention figures to {args.explain}" if args.explain else ""), file=sys.stderr)
        for x in inputs:
            print(x)
        return 0
    if args.explain is not None:
        print("predict: --explain shows the last block's space attention from the CLS token and the attention "
              "rollout over all blocks, on the centre clip's centre crop", file=sys.stderr)
    try:
        summary = run_predictions(loaded, inputs, protocol=protocol, out=args.out, features=args.features,
                                  explain_dir=args.explain, topk=args.topk, threshold=args.threshold,
                                  overwrite=args.overwrite, ray=args.ray, actors=args.actors,
                                  batch_size=args.batch_size, device=device, workers=args.workers)
    except PredictError as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    for x, error in summary.failed[:20]:
        print(f"predict: FAILED {x}: {error}", file=sys.stderr)
    if len(summary.failed) > 20:
        print(f"predict: ... and {len(summary.failed) - 20} more failed (their rows say why)", file=sys.stderr)
    extra = ""
    if args.out:
        extra += f"; predictions: {args.out}"
    if args.features:
        extra += f"; features: {args.features}"
    if summary.explained:
        extra += f"; {len(summary.explained)} attention figures in {args.explain}"
    print(f"predict: {summary.describe(args.out)}{extra}", file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
