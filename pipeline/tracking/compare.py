"""The paper's kind of comparison (Table 2: accuracy, cost, GPU-hours) from MLflow runs: a table (terminal,
CSV, Markdown) and a plot of accuracy against GPU-hours, one curve per run, with each run's budget.

Each run's MLflow status is a column: a run that did not finish (FAILED, KILLED, or still RUNNING, which
is also what a job killed without a word leaves) has partial numbers, so it is marked in the table and
drawn dotted in the plot; ``fetch(finished_only=True)`` leaves such runs out.

The accuracy column is each run's headline test metric: top-1 (with top-5) for a single-label model, mAP for a
multi-label one (``model.multi_label``; its curve is ``val_map``). Numbers of different metrics are never put in
one column or on one axis: runs scored by different metrics get a table (and a plot panel) each.

The paper's Table 2 weighs accuracy against two costs: training (GPU-hours, the plot above) and inference (TFLOPs
per view x views, the cost of classifying one video by the test protocol). The second has a column (``inference
GFLOPs/video``: the ``gflops_per_view`` tag, counted at the test view's size, times the protocol's views) and a plot
of its own, test accuracy against it on a log axis, one point per run (accuracy_vs_inference.png)."""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = [("run", "run"), ("dataset", "dataset"), ("model", "model"), ("attention", "attention"),
           ("clip", "frames x rate"), ("resolution", "res"), ("params_m", "params (M)"),
           ("tflops_views", "TFLOPs x views"), ("inference_gflops", "inference GFLOPs/video"),
           ("gpu_hours", "GPU-h"), ("score", "top-1"), ("top5", "top-5"), ("clips_per_s", "clips/s"),
           ("status", "status")]
FINISHED = "FINISHED"
# a run's headline metric: its column title, its plot axis, and what kind of model it scores
METRICS = {"top1": ("top-1", "top-1 (%)", "single-label"), "map": ("mAP", "mAP (%)", "multi-label")}


@dataclass
class RunSummary:
    run_id: str
    run: str
    model: str
    attention: str
    clip: str
    resolution: str
    params_m: float | None
    tflops_views: str
    gpu_hours: float | None
    gpu_hours_unit: str
    top1: float | None
    top5: float | None
    clips_per_s: float | None
    budget: float | None
    status: str
    curve: list[tuple[float, float]] = field(default_factory=list)  # (gpu_hours, val_top1 or val_map)
    dataset: str = "?"  # "<name> v<version>" the run trained on (its ``dataset`` tag)
    metric: str = "top1"  # the headline metric: top1, or map for a multi-label model (METRICS)
    map: float | None = None  # test mAP (%) of a multi-label model
    sweep: str = ""  # the sweep it is a member of (its ``sweep`` tag), "" for none
    halving: str = ""  # what successive halving did to it: "stopped at rung k", "continued", ""
    gflops_per_view: float | None = None  # inference cost of one test view (its ``gflops_per_view`` tag)
    views: int | None = None  # the test protocol's views per video; None for a long-video protocol (all of it)

    @property
    def score(self) -> float | None:
        """The headline test number: top-1, or mAP for a multi-label model."""
        return self.map if self.metric == "map" else self.top1

    @property
    def inference_gflops(self) -> float | None:
        """GFLOPs to classify one video by the test protocol: per view x views. None when the run has no FLOPs
        tag, or when its protocol reads the whole video (views then depend on each video's length)."""
        if self.gflops_per_view is None or self.views is None:
            return None
        return self.gflops_per_view * self.views


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def summarize(client, run) -> RunSummary:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    views = "all" if params.get("test.protocol") == "long_video" else str(
        int(params.get("test.temporal_clips", 1)) * int(params.get("test.spatial_crops", 1)))
    gflops = float(tags["gflops_per_view"]) if "gflops_per_view" in tags else None
    hours = _history(client, run.info.run_id, "gpu_hours")
    multi = params.get("model.multi_label") == "True" or "test_map" in metrics  # a multi-label model: mAP
    metric = "map" if multi else "top1"
    val = _history(client, run.info.run_id, f"val_{metric}")
    curve = sorted((hours[s], v) for s, v in val.items() if s in hours)
    speed = [m.value for m in client.get_metric_history(run.info.run_id, "clips_per_s")]
    budget = float(params.get("budget.gpu_hours", 0) or 0)
    return RunSummary(
        run_id=run.info.run_id, run=run.info.run_name or run.info.run_id[:8], model=tags.get("variant", "?"),
        attention=tags.get("attention_type", "?"),
        clip=f"{tags.get('frames', '?')} x {tags.get('sampling_rate', '?')}", resolution=tags.get("resolution", "?"),
        params_m=int(tags["params"]) / 1e6 if "params" in tags else None,
        tflops_views=f"{gflops / 1e3:.3g} x {views}" if gflops is not None else "?",
        gpu_hours=metrics.get("gpu_hours"), gpu_hours_unit=tags.get("gpu_hours_unit", "gpu"),
        top1=metrics.get("test_top1"), top5=metrics.get("test_top5"),
        clips_per_s=sum(speed) / len(speed) if speed else None, budget=budget or None,
        status=run.info.status, curve=curve, dataset=tags.get("dataset", "?"), metric=metric,
        map=metrics.get("test_map"), sweep=tags.get("sweep", ""),
        halving=(f"stopped at rung {tags['halving_stopped_at']}" if "halving_stopped_at" in tags else
                 "continued" if any(k.startswith("halving_rung") for k in tags) else ""),
        gflops_per_view=gflops, views=None if views == "all" else int(views))


class MixedDatasetsError(ValueError):
    """The runs to compare trained on different datasets (or versions): their accuracies are not comparable."""


def check_one_dataset(summaries: list[RunSummary]) -> None:
    """Refuse runs of different datasets or dataset versions in one comparison; runs from before the
    ``dataset`` tag (``?``) are not held against the others."""
    by_dataset: dict[str, list[str]] = {}
    for s in summaries:
        if s.dataset != "?":
            by_dataset.setdefault(s.dataset, []).append(s.run)
    if len(by_dataset) > 1:
        listed = "; ".join(f"{d}: {', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}"
                           for d, runs in sorted(by_dataset.items()))
        raise MixedDatasetsError(f"the runs trained on {len(by_dataset)} datasets ({listed}): their accuracies "
                                 f"are not comparable; choose runs of one with --runs, or --mix-datasets to "
                                 f"compare them anyway (the table's dataset column says which is which)")


def fetch(tracking_uri: str, experiment: str, run_ids: list[str] | None = None,
          finished_only: bool = False, sweep: str | None = None) -> list[RunSummary]:
    """The training runs of ``experiment`` (or those of ``run_ids``), oldest first; with ``finished_only``,
    only those whose status is FINISHED."""
    from mlflow.tracking import MlflowClient

    from pipeline.secrets import redact_text

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no experiment {experiment!r} at {redact_text(tracking_uri)}; experiments there: {names}")
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    runs = [r for r in runs if r.data.tags.get("kind") not in ("comparison", "sweep")]
    if sweep is not None:  # a sweep's members: the child runs that name it
        runs = [r for r in runs if r.data.tags.get("sweep") == sweep]
        if not runs:
            raise ValueError(f"no member runs of sweep {sweep!r} in experiment {experiment!r}")
    if run_ids:
        wanted = set(run_ids)
        runs = [r for r in runs if r.info.run_id in wanted or r.info.run_name in wanted]
        missing = wanted - {r.info.run_id for r in runs} - {r.info.run_name for r in runs}
        if missing:
            raise ValueError(f"run(s) {sorted(missing)} not found in experiment {experiment!r}")
    if finished_only:
        runs = [r for r in runs if r.info.status == FINISHED]
    return [summarize(client, r) for r in runs]


def unfinished_note(summaries: list[RunSummary]) -> str | None:
    """A line naming the runs that did not finish, by status, or None when all did."""
    by_status: dict[str, list[str]] = {}
    for s in summaries:
        if s.status != FINISHED:
            by_status.setdefault(s.status, []).append(s.run)
    if not by_status:
        return None
    parts = "; ".join(f"{status}: {', '.join(names)}" for status, names in sorted(by_status.items()))
    running = " (RUNNING: still training, or stopped without marking its run)" if "RUNNING" in by_status else ""
    return (f"not finished, numbers partial: {parts}{running}; --finished-only leaves them out")


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    return str(value)


def by_metric(summaries: list[RunSummary]) -> list[tuple[str, list[RunSummary]]]:
    """The runs grouped by headline metric (in the order the metrics first appear): one table each."""
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(s.metric, []).append(s)
    return list(groups.items()) or [("top1", [])]


def columns(metric: str) -> list[tuple[str, str]]:
    """The table's columns for runs scored by ``metric``: the accuracy column titled by it (top-5 only with
    top-1)."""
    return [(key, METRICS[metric][0] if key == "score" else title) for key, title in COLUMNS
            if key != "top5" or metric == "top1"]


# columns whose numbers span orders of magnitude (a tiny CPU model's 0.07 GFLOPs, a K400 model's 1703): significant
# digits, not a fixed number of decimals
_SIGNIFICANT = {"inference_gflops"}


def rows(summaries: list[RunSummary], metric: str = "top1") -> list[list[str]]:
    return [[(f"{getattr(s, key):.4g}" if key in _SIGNIFICANT and getattr(s, key) is not None
              else _cell(getattr(s, key))) for key, _ in columns(metric)] for s in summaries]


def _mixed_note(groups: list[tuple[str, list[RunSummary]]]) -> str:
    return ("runs scored by different metrics are in separate tables: "
            + " and ".join(f"{METRICS[m][0]} ({METRICS[m][2]} models)" for m, _ in groups) + " do not compare")


def table_text(summaries: list[RunSummary]) -> str:
    groups = by_metric(summaries)
    lines: list[str] = []
    for metric, group in groups:
        if len(groups) > 1:
            lines += ([""] if lines else []) + [f"{METRICS[metric][0]} ({METRICS[metric][2]} models):"]
        header = [title for _, title in columns(metric)]
        body = rows(group, metric)
        widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
        lines += ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
                  "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    if len(groups) > 1:
        lines.append(f"({_mixed_note(groups)})")
    units = {s.gpu_hours_unit for s in summaries}
    if units - {"gpu"}:
        lines.append(f"(GPU-h counts {' / '.join(sorted(units))}-hours: runs on CPU count processes)")
    note = unfinished_note(summaries)
    if note:
        lines.append(f"({note})")
    return "\n".join(lines)


CSV_KEYS = ["top1" if key == "score" else key for key, _ in COLUMNS]  # every number its own column (map below)


def table_csv(summaries: list[RunSummary]) -> str:
    """Every run in one CSV, every number in its own column (top1, top5, map) and the headline ``metric``."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run_id"] + CSV_KEYS + ["metric", "map", "gpu_hours_unit", "budget"])
    for s in summaries:
        writer.writerow([s.run_id] + [getattr(s, key) for key in CSV_KEYS] + [s.metric, s.map, s.gpu_hours_unit,
                                                                              s.budget])
    return out.getvalue()


def table_markdown(summaries: list[RunSummary]) -> str:
    groups = by_metric(summaries)
    blocks = []
    for metric, group in groups:
        header = [title for _, title in columns(metric)]
        lines = [f"**{METRICS[metric][0]}** ({METRICS[metric][2]} models)\n"] if len(groups) > 1 else []
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows(group, metric)]
        blocks.append("\n".join(lines))
    notes = [_mixed_note(groups)] if len(groups) > 1 else []
    notes += [n for n in [unfinished_note(summaries)] if n]
    return "\n\n".join(blocks) + "\n" + "".join(f"\n*{n}*\n" for n in notes)


def plot(summaries: list[RunSummary], path: Path, title: str) -> Path:
    """The validation metric against GPU-hours, a curve per run; the final test number as a star; budgets
    dashed. Runs scored by different metrics (top-1, mAP) get a panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_metric(summaries)
    fig, axes = plt.subplots(1, len(groups), figsize=(8 * len(groups), 5), squeeze=False)
    colours = {id(s): f"C{i % 10}" for i, s in enumerate(summaries)}
    for ax, (metric, group) in zip(axes[0], groups, strict=True):
        for s in group:
            colour = colours[id(s)]
            finished = s.status == FINISHED
            label = f"{s.run} ({s.attention})" + ("" if finished else f" [{s.status}]")
            style = dict(ls="-" if finished else ":", alpha=1.0 if finished else 0.6)
            if s.curve:
                ax.plot([h for h, _ in s.curve], [a for _, a in s.curve], marker="o", color=colour, ms=3,
                        label=label, **style)
            if s.score is not None and s.gpu_hours is not None:
                ax.plot([s.gpu_hours], [s.score], "*", color=colour, ms=14, alpha=style["alpha"],
                        label=None if s.curve else label)
            if s.budget:
                ax.axvline(s.budget, color=colour, ls="--", lw=1)
        units = sorted({s.gpu_hours_unit for s in group})
        ax.set_xlabel(f"{' / '.join(units)}-hours")
        ax.set_ylabel(f"{METRICS[metric][1]}  - validation curve, * test protocol")
        ax.set_title(title if len(groups) == 1 else f"{title} ({METRICS[metric][2]})")
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=8)
    return _save(fig, path)


def inference_points(summaries: list[RunSummary], metric: str) -> list[tuple[RunSummary, float, float]]:
    """The inference plot's points for runs scored by ``metric``: (run, inference GFLOPs per video, test accuracy),
    for each run that has both (a run without a test result, or without a FLOPs count, has no point)."""
    return [(s, s.inference_gflops, s.score) for s in summaries
            if s.metric == metric and s.inference_gflops is not None and s.score is not None]


def plot_inference(summaries: list[RunSummary], path: Path, title: str) -> Path:
    """Test accuracy against inference GFLOPs per video (per view x views, log axis): one point per run, a colour
    and a legend entry per model, each point labelled by its model; unfinished runs hollow. The paper's Table 2
    cost on the other axis than training's. Runs scored by different metrics get a panel each; runs that cannot
    be drawn (no test result, no FLOPs count, a whole-video protocol) are named under the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_metric(summaries)
    fig, axes = plt.subplots(1, len(groups), figsize=(8 * len(groups), 5), squeeze=False)
    models = list(dict.fromkeys(s.model for s in summaries))
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    for ax, (metric, group) in zip(axes[0], groups, strict=True):
        points = inference_points(group, metric)
        drawn = {id(s) for s, _, _ in points}
        missing = ", ".join(s.run for s in group if id(s) not in drawn)
        legend: set[str] = set()
        names: dict[tuple[str, float, float], list[str]] = {}  # runs drawn on one spot (seeds alike) share a name
        for s, gflops, acc in points:
            finished = s.status == FINISHED
            label = f"{s.model} ({s.attention})"
            ax.plot([gflops], [acc], "o", ms=9, color=colours[s.model], mfc=colours[s.model] if finished else "none",
                    label=None if label in legend else label)
            legend.add(label)
            names.setdefault((s.model, gflops, acc), []).append("" if finished else f" [{s.status}]")
        for (model, gflops, acc), marks in names.items():
            ax.annotate(model + (f" x{len(marks)}" if len(marks) > 1 else "") + "".join(marks), (gflops, acc),
                        textcoords="offset points", xytext=(6, 4), fontsize=7, color=colours[model])
        ax.set_xscale("log")
        if points:  # a point alone still gets a decade around it (a log axis needs a positive range)
            xs = [g for _, g, _ in points]
            ax.set_xlim(min(xs) / 2, max(xs) * 2)
            ax.legend(fontsize=8)
        ax.set_xlabel("inference GFLOPs per video (per view x views of the test protocol, log scale)")
        ax.set_ylabel(f"test {METRICS[metric][1]}")
        ax.set_title((title if len(groups) == 1 else f"{title} ({METRICS[metric][2]})") + (
            f"\nnot drawn (no test result, or no FLOPs count per video): "
            f"{missing if len(missing) <= 100 else missing[:100] + ' ...'}" if missing else ""), fontsize=9)
        ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def write_report(summaries: list[RunSummary], out_dir: Path, experiment: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"table.txt": table_text(summaries), "table.csv": table_csv(summaries),
             "table.md": table_markdown(summaries),
             "runs.json": json.dumps([{**asdict(s), "inference_gflops": s.inference_gflops} for s in summaries],
                                     indent=1)}
    paths = {}
    for name, text in files.items():
        (out_dir / name).write_text(text)
        paths[name] = out_dir / name
    paths["accuracy_vs_gpu_hours.png"] = plot(summaries, out_dir / "accuracy_vs_gpu_hours.png",
                                              f"{experiment}: accuracy against GPU-hours")
    paths["accuracy_vs_inference.png"] = plot_inference(summaries, out_dir / "accuracy_vs_inference.png",
                                                        f"{experiment}: accuracy against inference cost")
    return paths


# MLflow refuses a tag value over 8000 characters (mlflow.utils.validation.MAX_TAG_VAL_LENGTH): a comparison of
# fifty runs has a longer table. Cut to fit, saying so; the full table is the run's table.md artifact.
_TAG_LIMIT = 8000


def _tag(text: str, suffix: str = "") -> str:
    if len(text) + len(suffix) <= _TAG_LIMIT:
        return text + suffix
    more = " ... (cut: the full list is in the artifacts)"
    return text[:_TAG_LIMIT - len(more) - len(suffix)] + more + suffix


def _note(table: str) -> str:
    return _tag("```\n" + table, "\n```")


def log_comparison(tracking_uri: str, experiment: str, summaries: list[RunSummary], paths: dict[str, Path]) -> str:
    """The comparison as its own MLflow run (tag kind=comparison) with the table and the plot as artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id, run_name=f"comparison-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"kind": "comparison", "compared_runs": _tag(",".join(s.run_id for s in summaries)),
                                  "mlflow.note.content": _note(table_text(summaries))})
    for path in paths.values():
        client.log_artifact(run.info.run_id, str(path), "comparison")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


# -- the cost view: Pareto front and accuracy at a GPU-hour mark ------------------------------------------------


def final_accuracy(s: RunSummary) -> tuple[float | None, str]:
    """A run's accuracy for the cost view and where it comes from: the test protocol's headline, else (no test:
    a run stopped early, or test.enabled=false) its last validation."""
    if s.score is not None:
        return s.score, "test"
    if s.curve:
        return s.curve[-1][1], "val"
    return None, ""


def final_hours(s: RunSummary) -> float | None:
    return s.gpu_hours if s.gpu_hours is not None else (s.curve[-1][0] if s.curve else None)


def pareto_front(summaries: list[RunSummary]) -> list[RunSummary]:
    """The runs no other run beats on both axes: none with at most its GPU-hours and at least its accuracy (one of
    them strictly). Ordered by GPU-hours; runs without an accuracy or hours are never on it."""
    points = [(final_hours(s), final_accuracy(s)[0], s) for s in summaries]
    points = [(h, a, s) for h, a, s in points if h is not None and a is not None]
    front = [s for h, a, s in points
             if not any(h2 <= h and a2 >= a and (h2 < h or a2 > a) for h2, a2, _ in points)]
    return sorted(front, key=lambda s: final_hours(s))


def accuracy_at(s: RunSummary, hours: float) -> tuple[float | None, str]:
    """A run's validation accuracy at ``hours`` GPU-hours: the last validation at or before the mark, and a note:
    "" when the run got past the mark, "never reached" when it ended before it (the value is then its last),
    "no validation by then" when it validated only later."""
    before = [(h, a) for h, a in s.curve if h <= hours]
    end = final_hours(s)
    reached = end is not None and end >= hours
    if not before:
        return None, "no validation by then" if reached else "never reached"
    return before[-1][1], "" if reached else f"never reached (ended at {end:.4g} h)"


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body])


def pareto_text(summaries: list[RunSummary]) -> str:
    """Every run by GPU-hours with its accuracy, the front marked ``*``, and what halving did to it."""
    on = {s.run_id for s in pareto_front(summaries)}
    body = []
    for s in sorted(summaries, key=lambda s: (final_hours(s) is None, final_hours(s) or 0)):
        acc, src = final_accuracy(s)
        body.append(["*" if s.run_id in on else "", s.run, s.attention, _cell(final_hours(s), 4),
                     f"{_cell(acc)} ({src})" if acc is not None else "-", s.halving or "-", s.status])
    units = " / ".join(sorted({s.gpu_hours_unit for s in summaries}))
    return (f"Pareto front of accuracy against {units}-hours (* on the front: no run has fewer hours and a higher "
            f"accuracy)\n" + _table(["front", "run", "attention", "GPU-h", "accuracy", "halving", "status"], body))


def at_hours_text(summaries: list[RunSummary], hours: float) -> str:
    """Every run's validation accuracy at the same GPU-hour mark (budget-matched)."""
    body = []
    for s in summaries:
        acc, note = accuracy_at(s, hours)
        body.append([s.run, s.attention, _cell(acc), note or "-", _cell(final_hours(s), 4)])
    return (f"validation accuracy at {hours:g} GPU-hours (the last validation at or before it)\n"
            + _table(["run", "attention", f"acc@{hours:g}h", "note", "ended at (h)"], body))


def plot_pareto(summaries: list[RunSummary], path: Path, title: str, at_hours: float | None = None) -> Path:
    """Each run's final accuracy against its GPU-hours (test as a star, validation as a circle), the Pareto front
    as a step line; with ``at_hours`` the mark as a vertical line and each run's accuracy there as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, s in enumerate(summaries):
        acc, src = final_accuracy(s)
        h = final_hours(s)
        colour = f"C{i % 10}"
        if s.curve:
            ax.plot([p[0] for p in s.curve], [p[1] for p in s.curve], color=colour, alpha=0.35, lw=1)
        if acc is not None and h is not None:
            ax.plot([h], [acc], "*" if src == "test" else "o", color=colour, ms=12 if src == "test" else 7,
                    label=f"{s.run}" + (f" [{s.halving}]" if s.halving.startswith("stopped") else ""))
        if at_hours is not None:
            value, _ = accuracy_at(s, at_hours)
            if value is not None:
                ax.plot([at_hours], [value], "x", color=colour, ms=9)
    front = pareto_front(summaries)
    if front:
        xs = [final_hours(s) for s in front]
        ys = [final_accuracy(s)[0] for s in front]
        ax.step(xs, ys, where="post", color="black", lw=2, label="Pareto front")
    if at_hours is not None:
        ax.axvline(at_hours, color="grey", ls="--", lw=1, label=f"{at_hours:g} h")
    units = " / ".join(sorted({s.gpu_hours_unit for s in summaries}))
    ax.set_xlabel(f"{units}-hours")
    ax.set_ylabel("accuracy (%): * test, o last validation")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_cost_report(summaries: list[RunSummary], out_dir: Path, title: str, at_hours: float | None = None,
                      decisions: list[str] | None = None) -> dict[str, Path]:
    """The cost view's files: pareto.txt (with the halving decisions of a sweep), at_<H>h.txt, pareto.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = pareto_text(summaries)
    if decisions:
        text += "\n\nhalving decisions:\n" + "\n".join(f"  {d}" for d in decisions)
    paths = {"pareto.txt": out_dir / "pareto.txt"}
    paths["pareto.txt"].write_text(text + "\n")
    if at_hours is not None:
        name = f"at_{at_hours:g}h.txt"
        paths[name] = out_dir / name
        paths[name].write_text(at_hours_text(summaries, at_hours) + "\n")
    paths["pareto.png"] = plot_pareto(summaries, out_dir / "pareto.png", f"{title}: accuracy against GPU-hours",
                                      at_hours)
    return paths


def sweep_parent(tracking_uri: str, experiment: str, sweep: str) -> tuple[str | None, list[str]]:
    """The sweep's parent run id and its halving decisions (its ``halving.<n>`` tags, in order). A sweep's name is
    a run name (``check_run_name``: no quote, no space), which is what makes it safe inside MLflow's filter; any
    other name is refused, as is an experiment that does not exist (``ValueError``)."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import ConfigError, check_run_name
    from pipeline.secrets import redact_text

    try:
        check_run_name(sweep, "sweep")
    except ConfigError as e:
        raise ValueError(f"{e} (a sweep is named like a run)") from None
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no experiment {experiment!r} at {redact_text(tracking_uri)}; experiments there: {names}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.kind = 'sweep' and tags.sweep = '{sweep}'")
    if not runs:
        return None, []
    tags = runs[0].data.tags
    return runs[0].info.run_id, [tags[k] for k in sorted(k for k in tags if k.startswith("halving."))]


def log_to_run(tracking_uri: str, run_id: str, paths: dict[str, Path], tags: dict[str, str]) -> None:
    """A sweep's comparison as artifacts (``comparison/``) and tags of its parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for path in paths.values():
        client.log_artifact(run_id, str(path), "comparison")
    for k, v in tags.items():
        client.set_tag(run_id, k, _tag(v))


def _save(fig, path: Path) -> Path:
    """Write a comparison figure and free it (figures are not closed by the garbage collector)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
