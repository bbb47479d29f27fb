"""Run the paper's test protocol on a model: per video, the softmax scores of k temporal clips x 3 crops
averaged (or, for long-video recipes, of every non-overlapping clip covering the video).

    python jobs/evaluate.py runs/k400_base-20261126-101500                # its export (or newest checkpoint)
    python jobs/evaluate.py model.safetensors --recipe k400_base test.temporal_clips=10
    python jobs/evaluate.py runs/... --split val --max-videos 500 --out report.json

The data and protocol come from the run's config.yaml (or --recipe) with key=value overrides. Prints
top-1/top-5 and writes the report (per-video predictions, per-class accuracy, confusion matrix).

Before the pass, the model's classes are compared with the dataset's (the names in the export's
metadata or the run's dataset.json, else their number): a model is not scored on labels it does not
know. Videos without a label (-1) are predicted but not scored: the report counts them. An earlier
report is never replaced silently: by default a new one goes next to it (test-val-2.json, ...); an
existing --out is refused unless --overwrite.

Videos the loader could not read are skipped and counted; more than data.max_skip_fraction of them
makes the result not the split's (exit 2, the report written and saying so).

One process; use a GPU when there is one. Exit codes: 0 done, 2 bad input (refused before the pass, or
a pass that scored no labelled video or skipped too many: then the report holds the predictions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a number of videos >= 0 (0 = all)")
    return value


def report_path(args, src: Path, split: str) -> tuple[Path, str]:
    """Where the report goes, and a note when that is not the obvious place (an earlier report is kept)."""
    if args.out:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"--out {out} exists (an earlier report?): pass --overwrite to replace it, "
                                  f"or choose another --out")
        return out, f"replacing the earlier report {out}" if out.exists() else ""
    out = src / "eval" / f"test-{split}.json" if src.is_dir() else src.with_suffix(f".test-{split}.json")
    if out.exists() and not args.overwrite:
        earlier, out = out, free_name(out)
        return out, f"an earlier report is at {earlier}: this one goes to {out.name} (--overwrite replaces it)"
    return out, f"replacing the earlier report {out}" if out.exists() else ""


def free_name(path: Path) -> Path:
    """``test-val.json`` -> the first of ``test-val-2.json``, ``test-val-3.json``, ... that does not exist."""
    n = 2
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    return candidate


def check_writable(out: Path) -> None:
    """Refuse, before the pass, a report path that cannot be written (a parent that is a file, a read-only
    or pseudo file system): otherwise the whole test pass would be lost at its last step. Leaves nothing
    behind (a refusal during the pass writes nothing either): a file is created and removed in the
    nearest directory that exists."""
    import tempfile

    if out.is_dir():
        raise FileExistsError(f"--out {out} is a directory: give a file name (report.json)")
    try:
        nearest = next(p for p in out.parents if p.exists())
        if not nearest.is_dir():
            raise NotADirectoryError(0, f"{nearest} is a file")
        with tempfile.TemporaryFile(dir=nearest, prefix=".evaluate-probe-"):
            pass
    except OSError as e:
        raise FileExistsError(f"the report cannot be written to {out} ({e.strerror or e}): choose another "
                              "--out") from None


def write_report(report: dict, out: Path, overwrite: bool) -> Path:
    """Write without ever replacing a report this command did not ask to replace: a file that appeared
    during the pass (another evaluation) sends this one to the next free name instead."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1)
    if overwrite:
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, out)
        return out
    while True:
        try:
            with open(out, "x") as f:
                f.write(text)
            return out
        except FileExistsError:
            out = free_name(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run directory, or a model.safetensors written by jobs/export.py")
    p.add_argument("--recipe", help="recipe for data and protocol (default: the run's config.yaml)")
    p.add_argument("--split", help="split to test (default: the recipe's data.test_split)")
    p.add_argument("--max-videos", type=count, default=0, help="stop after this many videos (0 = all)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--out", help="report path (default: RUN_DIR/eval/test-<split>.json, or next to the model; "
                                 "when that exists, the next free test-<split>-N.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report instead")
    p.add_argument("overrides", nargs="*", help="key=value overrides (test.temporal_clips=10 ...)")
    args = p.parse_intermixed_args(argv)
    import torch

    from pipeline.config import ConfigError, apply_layer, load_recipe, load_resolved, parse_overrides, validate
    from pipeline.data.loader import test_clip_config
    from pipeline.data.shards import ShardError, load_index
    from pipeline.data.storage import StorageError
    from pipeline.data.video import VideoDecodeError
    from pipeline.models.convert import load_safetensors
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.evaluate import (
        EvaluationError,
        describe,
        headline,
        model_classes,
        run_data_version,
        test_protocol,
    )
    from pipeline.train.export import export_model

    bad_input = (ConfigError, ShardError, StorageError, VideoDecodeError, EvaluationError, FileNotFoundError,
                 FileExistsError, ValueError)
    src = Path(args.model).resolve()
    try:
        export_needed = False
        if src.is_dir():
            cfg = load_resolved(src / "config.yaml") if not args.recipe else load_recipe(args.recipe)
            if not args.recipe:  # the version the run trained on (recorded at first start by runs before the pin)
                cfg.data.version = run_data_version(cfg, src)
            model_path = src / "export" / "model.safetensors"
            if not model_path.exists():
                if ckpt.latest_complete(src) is None:
                    raise ConfigError(f"{src}: no export and no complete checkpoint to evaluate")
                export_needed = True  # made below, once every other input has been checked
        else:
            if not args.recipe:
                raise ConfigError("a model file needs --recipe (which dataset and protocol to test on)")
            cfg, model_path = load_recipe(args.recipe), src
        if args.overrides:
            apply_layer(cfg, parse_overrides(args.overrides), "command line")
            validate(cfg)
        split = args.split or cfg.data.test_split
        out, note = report_path(args, src, split)  # before the pass: a refusal costs nothing
        index, storage = load_index(cfg.data.index, cfg.data.version or None)
        if export_needed:
            # the run's export is the run's model: built from its own config.yaml, whatever --recipe says
            # (another recipe's model would fail to load, or load into another architecture)
            run_cfg = load_resolved(src / "config.yaml") if args.recipe else cfg
            try:
                model_path = export_model(src, run_cfg)
            except RuntimeError as e:  # load_state_dict: the checkpoint is not the model of config.yaml
                raise ConfigError(f"{src}: its newest checkpoint does not fit the model of its config.yaml "
                                  f"({' '.join(str(e).split())[:300]}); the run directory was edited or "
                                  "damaged") from None
        model = load_safetensors(model_path)
        classes, classes_from = model_classes(model_path, src if src.is_dir() else None)
        check_writable(out)  # last, so a refusal above creates nothing; first, so a pass is never lost to it
    except bad_input as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if note:
        print(f"evaluate: {note}", file=sys.stderr)
    print(f"evaluate: the model's classes: {classes_from}", file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device, dtype).eval()
    try:
        report = test_protocol(model, dtype, index, storage, split=split, clip=test_clip_config(cfg),
                               protocol=cfg.test.protocol, temporal_clips=cfg.test.temporal_clips,
                               spatial_crops=cfg.test.spatial_crops, batch_size=cfg.test.batch_size, device=device,
                               num_workers=args.workers, max_videos=args.max_videos, progress=True, classes=classes)
    except bad_input as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if headline(report)[1] is None:  # nothing was scored (top-1, or a multi-label model's mAP): no made-up number
        written = write_report(report, out, args.overwrite) if report["predictions"] else None
        print(f"evaluate: {describe(report)}\nevaluate: no labelled video was evaluated, so there is no accuracy "
              f"(the split's labels are unknown, --max-videos stopped first, or every video was skipped); "
              + (f"the predictions are in {written}" if written else "no report written"), file=sys.stderr)
        return 2
    seen = report["read"] or (report["videos"] + report["unlabelled"] + report["skipped"])
    if report["skipped"] > cfg.data.max_skip_fraction * seen:  # the accuracy would cover part of the split only
        out = write_report(report, out, args.overwrite)
        print(f"evaluate: {describe(report)}\nevaluate: {report['skipped']} of {seen} videos could not be read, above "
              f"data.max_skip_fraction={cfg.data.max_skip_fraction:g}: this accuracy is not the split's; fix or "
              f"re-ingest the shards named in {out} (skipped_by_shard), or raise data.max_skip_fraction",
              file=sys.stderr)
        return 2
    out = write_report(report, out, args.overwrite)
    print(f"{describe(report)}\nreport: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
