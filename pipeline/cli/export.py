"""Export a training run's model: the consolidated fp32 weights of a checkpoint (ZeRO shards merged) as
``model.safetensors`` with its config in the metadata, and the Hugging Face format on request, with a model
card, uploaded to the Hugging Face Hub with --push-to-hub.

    python jobs/export.py runs/k400_long-20261126-101500                    # newest complete checkpoint
    python jobs/export.py runs/k400_long-... --tag step000004000 --out /tmp/l.safetensors
    python jobs/export.py runs/k400_long-... --hf exports/timesformer-l-k400  # + a transformers directory
    python jobs/export.py runs/k400_long-... --push-to-hub my-org/timesformer-k400 --private
    python jobs/export.py model.safetensors --hf exports/bare              # a model without its run

The Hugging Face directory (--hf) holds config.json (with the class names as id2label), preprocessor_config.json
(the model's input size and normalisation), the weights and README.md, a model card: for a run, its dataset and
version, recipe, test protocol and accuracy and GPU-hours (docs/export.md). transformers.pipeline(
"video-classification", model=DIR) classifies a video file with it. --push-to-hub REPO writes it (to --hf, by
default RUN_DIR/export/hf) and uploads it, with the token in $HF_TOKEN or that of `hf auth login`.

Load it back with ``pipeline.models.load_safetensors(path)``, or ``transformers.
TimesformerForVideoClassification.from_pretrained(dir)`` for --hf. Exit codes: 0 done, 2 nothing to export
or a checkpoint refused, 3 the export was written but the upload failed (the message says why). Checkpoint files
are read weights-only: one that asks to run code, or whose weights do not fit the run's model, is refused with
its path named, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory made by jobs/launch.py (or a model.safetensors, with --hf or "
                                   "--push-to-hub: a model without its run, which gets a shorter card)")
    p.add_argument("--tag", help="checkpoint tag (default: the best one with train.keep_best, else the newest "
                                 "complete one)")
    p.add_argument("--trained-weights", action="store_true", help="with train.ema_decay: export the trained weights, "
                                                                  "not their moving average (the default when "
                                                                  "train.ema_export is on)")
    p.add_argument("--out", help="output file (default RUN_DIR/export/model.safetensors)")
    p.add_argument("--hf", metavar="DIR", help="also write a Hugging Face TimesformerForVideoClassification directory "
                                               "with a model card")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the Hugging Face directory to the Hub repository "
                                                         "REPO (org/name; created when missing)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = p.parse_args(argv)
    if args.private and not args.push_to_hub:
        p.error("--private goes with --push-to-hub REPO")
    if args.push_to_hub:  # a wrong id or no token: said before any export work, which can take minutes
        from pipeline.train.export import PushError, hub_token

        try:
            hub_token(args.push_to_hub)
        except PushError as e:
            print(f"export: {e}", file=sys.stderr)
            return 2
    source = Path(args.run_dir).resolve()
    if source.is_file() and source.suffix == ".safetensors":
        return _export_bare(source, args)
    return _export_run(source, args)


def _export_run(run_dir: Path, args: argparse.Namespace) -> int:
    from pipeline.config import load_resolved
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.export import export_model

    if not (run_dir / "config.yaml").exists():
        print(f"export: {run_dir} is not a run directory (no config.yaml) nor a model.safetensors", file=sys.stderr)
        return 2
    cfg = load_resolved(run_dir / "config.yaml")
    tags = [t for _, t in ckpt.complete_checkpoints(run_dir)]
    if args.tag and args.tag not in tags:
        print(f"export: no complete checkpoint {args.tag!r} in {run_dir}; complete ones: {tags}", file=sys.stderr)
        return 2
    try:
        from pipeline.train.export import run_weights

        tag, ema = run_weights(run_dir, cfg, args.tag, False if args.trained_weights else None)
        path = export_model(run_dir, cfg, tag, Path(args.out) if args.out else None, ema=ema)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # FileNotFoundError: no checkpoint; ValueError: a refused (UnsafeCheckpointError) or unreadable file,
        # weights that do not fit the model; RuntimeError: load_state_dict naming the keys that do not fit
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) from {tag}{' (its EMA weights)' if ema else ''}")
    if not (args.hf or args.push_to_hub):
        return 0
    from pipeline.data.shards import load_index
    from pipeline.train.evaluate import EvaluationError, recorded_dataset, run_data_version

    labels, index = None, None
    try:
        recorded = recorded_dataset(run_dir)  # the classes the run trained on, whatever was committed since
        labels = recorded["classes"] if recorded else None
    except EvaluationError as e:
        print(f"export: {e}", file=sys.stderr)
    try:  # the version the run read: the card's digest of its training data (and a run's classes, if unrecorded)
        index = load_index(cfg.data.index, run_data_version(cfg, run_dir) or None)[0]
        labels = labels or index.classes
    except Exception as e:  # noqa: BLE001 -- label names and the digest are niceties; the weights are what matter
        print(f"export: dataset {cfg.data.index} unreadable ({e}); the card goes without the training data's "
              f"digest{'' if labels else ', and labels come from the model file (else LABEL_<i>)'}", file=sys.stderr)
    hf_dir = Path(args.hf) if args.hf else run_dir / "export" / "hf"
    return _write_hf(path, hf_dir, args, labels=labels, run_dir=run_dir, cfg=cfg, index=index)


def _export_bare(path: Path, args: argparse.Namespace) -> int:
    if not (args.hf or args.push_to_hub):
        print(f"export: {path} is already a model.safetensors; say where its Hugging Face directory goes (--hf DIR) "
              f"or where to push it (--push-to-hub REPO)", file=sys.stderr)
        return 2
    if args.tag or args.out:
        print("export: --tag and --out choose a run's checkpoint; a model.safetensors has none", file=sys.stderr)
        return 2
    return _write_hf(path, Path(args.hf) if args.hf else path.parent / "hf", args)


def _write_hf(path: Path, hf_dir: Path, args: argparse.Namespace, **run) -> int:
    from pipeline.train.export import PushError, export_hf, push_to_hub, pushed_files

    try:
        out = export_hf(path, hf_dir, repo_id=args.push_to_hub, **run)
    except (FileNotFoundError, ValueError) as e:  # not our safetensors (no config in its metadata), unreadable
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (Hugging Face format, with a model card: README.md)")
    if not args.push_to_hub:
        return 0
    try:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
    except PushError as e:
        print(f"export: {e}", file=sys.stderr)
        return 3
    print(f"pushed {', '.join(pushed_files(out))} of {out} to https://huggingface.co/{args.push_to_hub} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
