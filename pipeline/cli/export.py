"""Export a training run's model: the consolidated fp32 weights of a checkpoint (ZeRO shards merged) as
``model.safetensors`` with its config in the metadata, and the Hugging Face format on request.

    python jobs/export.py runs/k400_long-20261126-101500                    # newest complete checkpoint
    python jobs/export.py runs/k400_long-... --tag step000004000 --out /tmp/l.safetensors
    python jobs/export.py runs/k400_long-... --hf exports/timesformer-l-k400  # + a transformers directory

Load it back with ``pipeline.models.load_safetensors(path)``, or ``transformers.
TimesformerForVideoClassification.from_pretrained(dir)`` for --hf. Exit codes: 0 done, 2 nothing to export
or a checkpoint refused. Checkpoint files are read weights-only: one that asks to run code, or whose weights do
not fit the run's model, is refused with its path named, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory made by jobs/launch.py")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    p.add_argument("--out", help="output file (default RUN_DIR/export/model.safetensors)")
    p.add_argument("--hf", metavar="DIR", help="also write a Hugging Face TimesformerForVideoClassification directory")
    args = p.parse_args(argv)
    from pipeline.config import load_resolved
    from pipeline.models.convert import load_safetensors, save_hf
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.export import export_model

    run_dir = Path(args.run_dir).resolve()
    if not (run_dir / "config.yaml").exists():
        print(f"export: {run_dir} is not a run directory (no config.yaml)", file=sys.stderr)
        return 2
    cfg = load_resolved(run_dir / "config.yaml")
    tags = [t for _, t in ckpt.complete_checkpoints(run_dir)]
    if args.tag and args.tag not in tags:
        print(f"export: no complete checkpoint {args.tag!r} in {run_dir}; complete ones: {tags}", file=sys.stderr)
        return 2
    try:
        path = export_model(run_dir, cfg, args.tag, Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # FileNotFoundError: no checkpoint; ValueError: a refused (UnsafeCheckpointError) or unreadable file,
        # weights that do not fit the model; RuntimeError: load_state_dict naming the keys that do not fit
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) from {args.tag or tags[-1]}")
    if args.hf:
        labels = None
        try:
            from pipeline.data.shards import load_index
            from pipeline.train.evaluate import recorded_dataset

            recorded = recorded_dataset(run_dir)  # the classes the run trained on, whatever was committed since
            labels = (recorded["classes"] if recorded else
                      load_index(cfg.data.index, cfg.data.version or None)[0].classes)
        except Exception as e:  # noqa: BLE001 -- label names are a nicety; the weights are what matters
            print(f"export: dataset {cfg.data.index} unreadable ({e}); labels will be LABEL_<i>", file=sys.stderr)
        print(f"wrote {save_hf(load_safetensors(path), args.hf, labels)} (Hugging Face format)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
