#!/usr/bin/env python
"""The paper's Table 2 on the demo task: TimeSformer against a 3D CNN, accuracy against training GPU-hours and
against inference cost, as a ``jobs/compare.py`` report.

The two recipes of the comparison train the same task the same way: ``demo_order`` (the tiny TimeSformer, divided
space-time attention) and ``demo_order_i3d`` (i3d_tiny: I3D's anatomy, one bottleneck block per stage); the same
data, the same budget (``budget.gpu_hours``, in CPU-process-hours here), the same step cap and the same seeds. Each
run goes through the product's own launcher (``pipeline.train.launch.launch``, local processes: what
``jobs/launch.py --local`` does), one after another, into one MLflow experiment (``tracking.experiment=table2-demo``,
the embedded sqlite database of the study's runs directory). Each run ends with the recipe's test protocol (2
clips x 3 crops per video) and its export, as any run does.

The data are the demo's (``jobs/demo.py``): its synthetic colour-order videos (``balanced_order_spec`` for the
recipe's sampling rate, a 32-pixel square; 96 train + 24 val per class), ingested into WebDataset shards with the
demo's ingest settings. Made once under the runs directory, and kept for the next study.

Then ``jobs/compare.py``'s code (``pipeline.cli.compare.main``) over the study's runs writes the table (table.md,
.txt, .csv), runs.json, the plots (accuracy_vs_gpu_hours.png, accuracy_vs_inference.png, pareto.png) and the Pareto
front under --out, and logs them to MLflow as a comparison run. A summary per model follows: parameters, GFLOPs per
test view, views, inference GFLOPs per video, GPU-hours and test top-1 per seed. Everything printed also goes to
<out>/study.log, the command that made it at its top.

    python benchmarks/table2_study.py                      # seeds 0 1, 180 s of one CPU process per run
    python benchmarks/table2_study.py --seeds 0 1 2 --budget-s 240 --steps 2000
    python benchmarks/table2_study.py --dry-run            # what it would make and run; nothing is written

Runs are one process each (``--nodes 1``: one rank, one thread), one at a time, so they do not compete for the
CPU with each other; the budget is wall time of that process, so a machine busy with other work gives every run
fewer steps alike.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = ("demo_order", "demo_order_i3d")  # TimeSformer (the reference), the 3D CNN of Table 2
EXPERIMENT = "table2-demo"
# The demo's data (pipeline/cli/demo.py): the videos' square and the ingest's shard size and transcode
SQUARE = 32
SAMPLES_PER_SHARD = 32
SHORT_SIDE = 64
KEYFRAME_INTERVAL = 8


class Log:
    """Print to the terminal and to the study's log file."""

    def __init__(self, path: Path | None):
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("w")

    def __call__(self, *parts: object) -> None:
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def dataset_ready(storage: Path) -> bool:
    """Whether the dataset root has a committed version (an index) to train on."""
    return any((storage / "indexes").glob("v*.json"))


def make_data(videos: Path, storage: Path, train_per_class: int, val_per_class: int, say) -> None:
    """The demo's videos and shards, made with the product's helpers as jobs/demo.py makes them (a rerun keeps
    the videos already made and commits nothing new when nothing changed)."""
    from pipeline.config import load_recipe
    from pipeline.data.synthetic import balanced_order_spec, make_corpus
    from pipeline.ingest.run import IngestConfig, run_ingest
    from pipeline.ingest.worker import TranscodeConfig

    recipe = load_recipe(RECIPES[0])
    spec = balanced_order_spec(recipe.data.sampling_rate / recipe.data.ref_fps, square=SQUARE)
    t0 = time.time()
    csv_path = make_corpus(videos, "order", {"train": train_per_class, "val": val_per_class}, spec)
    ingest = IngestConfig(dataset="demo-order", format="kinetics", annotations=[str(csv_path)],
                          source=str(videos / "videos"), output=str(storage), samples_per_shard=SAMPLES_PER_SHARD,
                          transcode=TranscodeConfig(short_side=SHORT_SIDE, fps=spec.fps,
                                                    keyframe_interval=KEYFRAME_INTERVAL))
    result = run_ingest(ingest)
    say(f"data: {result.message} ({time.time() - t0:.0f} s)")


def requests(args, storage: Path, stamp: str) -> list:
    """The study's launches: every recipe x seed, the same overrides but the seed."""
    from pipeline.train.launch import LaunchRequest

    common = [f"data.index={storage}", f"tracking.experiment={EXPERIMENT}", f"budget.gpu_hours={args.budget_s / 3600}",
              f"train.max_steps={args.steps}", f"train.val_every={args.val_every}", *args.set]
    return [LaunchRequest(recipe=recipe, nodes=args.nodes, local=True, name=f"t2-{recipe}-s{seed}-{stamp}",
                          runs_dir=str(args.runs_dir), overrides=[*common, f"train.seed={seed}"])
            for recipe in args.recipes for seed in args.seeds]


def describe(req) -> str:
    """One line: the resolved recipe's model, cost, steps and budget (refuses a bad override: ConfigError)."""
    from pipeline.config import batch_plan, load_recipe
    from pipeline.models.registry import family_of, flops_per_view, model_config, parameter_count

    cfg = load_recipe(req.recipe, req.overrides)
    mc = model_config(cfg)
    gflops = flops_per_view(mc, img_size=cfg.test.crop or cfg.data.crop) / 1e9
    views = cfg.test.temporal_clips * cfg.test.spatial_crops
    return (f"{req.name}: {cfg.model.variant} ({family_of(mc).name}), {parameter_count(mc):,} parameters, "
            f"{gflops:.4g} GFLOPs per {cfg.data.num_frames}x{cfg.test.crop or cfg.data.crop} view x {views} views; "
            f"{cfg.optim.name} lr {cfg.optim.lr:g} {cfg.optim.schedule}, {batch_plan(cfg, req.nodes or 1).describe()}"
            f", at most {cfg.train.max_steps} steps, budget {cfg.budget.gpu_hours:.5g} cpu-process-hours, "
            f"{cfg.train.engine} engine ZeRO {cfg.train.zero_stage} {cfg.train.precision}, seed {cfg.train.seed}")


def train(req, say) -> dict:
    """One run through the product's launcher, waited for; its outcome as the job returns it."""
    from pipeline.train.launch import launch

    t0 = time.time()
    info = launch(req, out=lambda *a: None)
    say(f"  launched {req.name}: job {info['job_id']}, run dir {info['run_dir']}")
    result = info["job"].results()[0]
    say(f"  {req.name}: {result.get('outcome')} at step {result.get('step')}, test top-1 "
        f"{result.get('test_top1', float('nan')):.1f}% ({time.time() - t0:.0f} s wall, launch to export)")
    return {"name": req.name, "recipe": req.recipe, "run_dir": info["run_dir"], **result}


def compare(uri: str, names: list[str], out: Path, say) -> int:
    """jobs/compare.py over the study's runs: its table, plots, Pareto front and MLflow comparison run."""
    from pipeline.cli.compare import main as compare_main

    argv = ["--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(out), "--runs", *names]
    say("$ python jobs/compare.py " + " ".join(shlex.quote(a) for a in argv))
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        rc = compare_main(argv)
    say(captured.getvalue().rstrip())
    return rc


def summary(out: Path, outcomes: list[dict], say) -> None:
    """Per model: parameters, GFLOPs per view, views, inference GFLOPs per video; GPU-hours, steps and test top-1
    per seed (from the report's runs.json, i.e. from MLflow)."""
    runs = {r["run"]: r for r in json.loads((out / "runs.json").read_text())}
    say("\nsummary per model (from MLflow, the report's runs.json):")
    for recipe in dict.fromkeys(o["recipe"] for o in outcomes):
        # each launched run with its report row (a run missing from the report is left out of both, together)
        pairs = [(o, runs[o["name"]]) for o in outcomes if o["recipe"] == recipe and o["name"] in runs]
        rows = [x for _, x in pairs]
        if not rows:
            say(f"  {recipe}: no run in the report")
            continue
        r = rows[0]
        views = r["views"]
        inference = r["inference_gflops"]
        tops = [x["top1"] for x in rows if x["top1"] is not None]
        cost = (f"{r['gflops_per_view']:.4g} GFLOPs per view x {views} views = {inference:.4g} GFLOPs per video"
                if inference is not None else "no inference cost (no FLOPs count, or a whole-video protocol)")
        say(f"  {recipe}: {r['model']} ({r['attention']}), {r['params_m'] * 1e6:,.0f} parameters, {cost}")
        for o, x in pairs:
            top1 = "-" if x["top1"] is None else f"{x['top1']:.1f}%"
            say(f"    seed {o['seed']}: {x['gpu_hours'] or 0:.5f} {x['gpu_hours_unit']}-hours, {o.get('outcome')} at "
                f"step {o.get('step')}, test top-1 {top1}, {x['status']}")
        if tops:
            say(f"    test top-1 mean {sum(tops) / len(tops):.1f}% (min {min(tops):.1f}, max {max(tops):.1f}) over "
                f"{len(tops)} seed(s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="train.seed values (default 0 1)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help=f"default: {' '.join(RECIPES)}")
    p.add_argument("--budget-s", type=float, default=180.0,
                   help="each run's budget: seconds of one CPU process (budget.gpu_hours = this / 3600; default 180)")
    p.add_argument("--steps", type=int, default=1200, help="train.max_steps, the cap (default 1200, the recipes')")
    p.add_argument("--val-every", type=int, default=100, help="train.val_every (default 100)")
    p.add_argument("--nodes", type=int, default=1, help="local ranks per run (default 1: one process)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more overrides, for every run")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "table2-demo",
                   help="run directories, mlflow.db and the demo data (default runs/table2-demo)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "table2-demo",
                   help="the report and study.log (default benchmarks/results/table2-demo)")
    p.add_argument("--train-per-class", type=int, default=96, help="the demo's: 96")
    p.add_argument("--val-per-class", type=int, default=24, help="the demo's: 24")
    p.add_argument("--dry-run", action="store_true", help="print what it would make and run, and stop")
    args = p.parse_args(argv)
    if args.budget_s <= 0 or args.steps < 1:
        p.error("--budget-s and --steps: expected positive numbers")
    from pipeline.config import ConfigError
    from pipeline.tracking.sink import default_tracking_uri

    args.runs_dir = args.runs_dir.resolve()
    videos, storage = args.runs_dir / "data" / "videos", args.runs_dir / "data" / "dataset"
    uri = default_tracking_uri(args.runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    say = Log(None if args.dry_run else args.out / "study.log")
    given = sys.argv[1:] if argv is None else argv
    say("$ " + " ".join(shlex.quote(a) for a in ["python", "benchmarks/table2_study.py", *given]))
    say(f"# {time.strftime('%a %d %b %Y %H:%M:%S %Z')}; recipes {', '.join(args.recipes)}; seeds {args.seeds}; "
        f"budget {args.budget_s:g} s of one process ({args.budget_s / 3600:.5g} cpu-process-hours) per run, at most "
        f"{args.steps} steps, validation every {args.val_every}; {args.nodes} local rank(s) per run, one run at a "
        f"time; experiment {EXPERIMENT!r} at {uri}")
    try:
        reqs = requests(args, storage, stamp)
        for req in reqs:  # a bad override or recipe is refused here, before anything is made
            say(describe(req))
    except ConfigError as e:
        say(f"table2_study: {e}")
        return 2
    ready = dataset_ready(storage)
    if args.dry_run:
        say(f"[dry run] data: {'use' if ready else 'make'} the demo's videos in {videos} and shards in {storage}"
            f" ({args.train_per_class} train + {args.val_per_class} val per class)")
        for req in reqs:
            say(f"[dry run] launch (local) {req.recipe} --name {req.name} --runs-dir {req.runs_dir} "
                + " ".join(req.overrides))
        say(f"[dry run] then python jobs/compare.py --experiment {EXPERIMENT} --tracking-uri {uri} --out {args.out} "
            f"--runs <the {len(reqs)} runs>, and the summary")
        return 0
    t0 = time.time()
    try:
        make_data(videos, storage, args.train_per_class, args.val_per_class, say)
        outcomes = []
        for i, req in enumerate(reqs):
            say(f"[{i + 1}/{len(reqs)}] train {req.recipe}, seed {req.overrides[-1].split('=')[1]}")
            outcomes.append({**train(req, say), "seed": int(req.overrides[-1].split("=")[1])})
        rc = compare(uri, [o["name"] for o in outcomes], args.out, say)
        if rc in (0, 1):  # 1: the report is written, MLflow did not take the comparison run
            summary(args.out, outcomes, say)
        (args.out / "outcomes.json").write_text(json.dumps(outcomes, indent=1, default=str))
        say(f"\ndone in {(time.time() - t0) / 60:.1f} min; report in {args.out}")
        return rc
    finally:
        say.close()


if __name__ == "__main__":
    sys.exit(main())
