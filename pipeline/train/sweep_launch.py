"""Launching a sweep (``jobs/launch.py --sweep``/``--sweep-file``): every member checked as a single launch would be,
then one Slurm job array (or local processes), its MLflow parent run, and waiting for it. The side of a sweep
that runs inside a member's process (its rung checks, its share of the budget) is ``pipeline.train.sweep``; this
module sits above the launcher, which that one must not import (the launcher imports the ranks' entry point)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, check_run_name
from pipeline.train.sweep import (
    ARRAY_FIXED,
    MEMBER_FILE,
    SWEEP_FILE,
    SweepSpec,
    SweepState,
    close_parent,
    local_process,
    mark_crashed,
    member_name,
    new_state,
    reconcile,
    split_budget,
    summary,
)

FAILED = ("crashed", "failed")  # a member that ended without recording its end ("failed": sweeps of before)

# -- launching ----------------------------------------------------------------------------------------


@dataclass
class SweepLaunch:
    """What ``launch_sweep`` made: the sweep directory, its members' launch infos, the jobs."""

    name: str
    sweep_dir: Path
    members: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[Any] = field(default_factory=list)
    state: dict[str, Any] | None = None


def _member_requests(spec: SweepSpec, base, sweep_name: str, sweep_dir: Path, budgets: list[float],
                     uri_override: list[str]):
    from dataclasses import replace

    reqs = []
    for i, over in enumerate(spec.members):
        name = member_name(sweep_name, i, over)
        extra = spec.overrides(i) + ([f"budget.gpu_hours={budgets[i]!r}"] if budgets[i] else []) + uri_override
        reqs.append(replace(base, name=name, runs_dir=str(sweep_dir), overrides=list(base.overrides) + extra))
    return reqs


def plan_sweep(spec: SweepSpec, base) -> tuple[str, Path, list, list[float], list[dict[str, Any]]]:
    """Check every member as a single launch would (nothing is created) and return the sweep's name and
    directory, the member requests, their base budgets and each check's info."""
    from dataclasses import replace

    from pipeline.tracking.sink import default_tracking_uri
    from pipeline.train.launch import launch, resolve

    if base.resume:
        raise ConfigError("--resume and --sweep: resume a member with --resume <its run directory>")
    if base.name:
        check_run_name(base.name, "--name")
    if not base.recipe:
        raise ConfigError("--recipe is required with --sweep")
    n = len(spec.members)
    if n < 1:
        raise ConfigError(f"{spec.source}: no members")
    keys = sorted({k for m in spec.members for k in m})
    bad = [k for k in keys if k == "name" or k == "runs_dir"]
    if bad:
        raise ConfigError(f"{spec.source}: {bad} cannot vary within a sweep (members are named after the sweep)")
    if not base.local:
        fixed = [k for k in keys if k.startswith(ARRAY_FIXED)]
        if fixed:
            raise ConfigError(f"{spec.source}: {fixed} cannot vary within one Slurm job array (every task has the "
                              f"same resources, script and tracking); launch separate sweeps")
    cfg0, run0 = resolve(replace(base, overrides=list(base.overrides) + spec.overrides(0)))
    runs_root = run0.parent
    sweep_name = base.name or spec.name or f"{cfg0.recipe}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    check_run_name(sweep_name, "the sweep name (--name or the sweep file's name:)")
    sweep_dir = runs_root / sweep_name
    if spec.total_budget is not None:
        if any(k == "budget.gpu_hours" for k in keys):
            raise ConfigError(f"{spec.source}: budget.gpu_hours varies across members and a total budget is given: "
                              f"choose one")
        budgets = split_budget(spec.total_budget, n)
    else:
        budgets = [0.0] * n  # each member's own recipe budget (read below)
    uri_override = [] if (cfg0.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")) else \
        [f"tracking.uri={default_tracking_uri(runs_root)}"]  # one store for the sweep: next to the runs, not in it
    reqs = _member_requests(spec, base, sweep_name, sweep_dir, budgets, uri_override)
    infos, experiments = [], set()
    for i, req in enumerate(reqs):
        try:
            info = launch(replace(req, check_only=True), out=lambda *a: None)
        except ConfigError as e:
            raise ConfigError(f"sweep member {i} ({req.name}, {' '.join(spec.overrides(i))}): {e}") from None
        infos.append(info)
        experiments.add(info["experiment"])
        if not budgets[i]:
            budgets[i] = info["budget"]
    if len(experiments) > 1:
        raise ConfigError(f"the members would log to different MLflow experiments {sorted(experiments)}: a sweep's "
                          f"parent and children share one")
    if spec.halving and not all(b > 0 for b in budgets):
        raise ConfigError("halving needs a budget: its rungs are fractions of each member's GPU-hours; give "
                          "--sweep-budget TOTAL or a recipe with budget.gpu_hours")
    return sweep_name, sweep_dir, reqs, budgets, infos


def launch_sweep(spec: SweepSpec, base, out=print, parallelism: int | None = None) -> SweepLaunch:
    """Check every member, then create the sweep directory, its parent MLflow run and the members' run
    directories, and submit: one Slurm job array through submitit (``parallelism``: the array's
    ``%N``), or (``base.local``) local processes, ``parallelism`` at a time (default 1), this process
    scheduling them until all have ended. A refused submission leaves nothing behind but FAILED MLflow runs."""
    from dataclasses import replace

    from pipeline.tracking.sink import create_run
    from pipeline.train.launch import _undo_launch

    parallelism = parallelism or spec.array_parallelism
    name, sweep_dir, reqs, budgets, infos = plan_sweep(spec, base)
    n = len(reqs)
    executor = "local" if base.local else "slurm"
    rows = [{"name": r.name, "overrides": spec.overrides(i), "run_dir": str(sweep_dir / r.name),
             "base_budget": budgets[i]} for i, r in enumerate(reqs)]
    unit = infos[0]["unit"]
    out(f"sweep       {name}: {n} member(s) of recipe {infos[0]['recipe']}, {executor}"
        f"{f', {parallelism} at a time' if parallelism else ''}\nsweep dir   {sweep_dir}")
    total = sum(budgets)
    out(f"budget      {total:.6g} {unit}-hours in all" + (" (--sweep-budget, split equally)" if spec.total_budget
                                                         else " (each member's recipe budget)" if total else ""))
    if spec.halving:
        out(f"halving     rungs at {spec.halving.rungs} of each member's budget, eta {spec.halving.eta:g} (ASHA: the "
            f"top max(1, n/eta) of those reported so far continue)")
    for i, row in enumerate(rows):
        out(f"  [{i}] {row['name']:48s} {' '.join(row['overrides']) or '(the recipe)'}  budget "
            f"{row['base_budget']:.6g} {unit}-h")
    result = SweepLaunch(name, sweep_dir)
    if base.dry_run:
        result.state = new_state(name, spec, infos[0]["recipe"], rows, executor, parallelism)
        return result
    if sweep_dir.exists():
        raise ConfigError(f"sweep directory {sweep_dir} exists: choose another --name")
    sweep_dir.mkdir(parents=True)
    state = SweepState(sweep_dir)
    s = new_state(name, spec, infos[0]["recipe"], rows, executor, parallelism)
    state.write(s)
    uri = infos[0]["tracking_uri"]
    parent = create_run(sweep_dir, uri, infos[0]["experiment"], name,
                        {"kind": "sweep", "sweep": name, "members": str(n), "recipe": infos[0]["recipe"],
                         "total_budget": f"{total:.6g}", "budget_unit": unit, "executor": executor,
                         "halving_config": json.dumps(s["halving"]),
                         "member_names": ",".join(r["name"] for r in rows)[:5000],
                         "mlflow.note.content": "sweep of " + "; ".join(
                             f"{r['name']}: {' '.join(r['overrides'])}" for r in rows)[:5000]})
    with state.update() as st:
        st["mlflow"] = parent
    if parent:
        out(f"mlflow      parent run {parent['run_id']} in experiment {parent['experiment']!r}")

    def member_files(i: int) -> dict[str, str]:
        return {MEMBER_FILE: json.dumps({"sweep": name, "sweep_dir": str(sweep_dir), "index": i,
                                         "parent_run_id": parent["run_id"] if parent else None}, indent=1)}

    held: list[dict[str, Any]] = []
    try:
        if base.local:
            return _run_local(result, reqs, member_files, state, parallelism or 1, out)
        for i, req in enumerate(reqs):
            held.append(_launch_quiet(replace(req, hold=True, files=member_files(i))))
        jobs = submit_array(held, sweep_dir, name, parallelism)
    except BaseException as e:
        for info in held:
            _undo_launch(Path(info["run_dir"]), True, info.get("created_tracking"), info["real_uri"], e)
        if parent:
            close_parent(state, parent, "FAILED")
        if not any(Path(info["run_dir"]).exists() for info in held):
            import shutil

            shutil.rmtree(sweep_dir, ignore_errors=True)
        if isinstance(e, (ConfigError, KeyboardInterrupt)):
            raise
        from pipeline.train.launch import SubmissionError

        raise SubmissionError(f"the sweep's job array could not be submitted: {' '.join(str(e).split())[-1500:]}") \
            from e
    from pipeline.train.launch import record_submission

    for info, job in zip(held, jobs, strict=True):
        record_submission(info, job)
    with state.update() as st:
        st["job_ids"] = [str(j.job_id) for j in jobs]
        for m, job in zip(st["members"], jobs, strict=True):
            m["job_id"] = str(job.job_id)
    result.members, result.jobs = held, jobs
    out(f"submitted   job array {str(jobs[0].job_id).split('_')[0]} ({n} task(s)"
        f"{f', {parallelism} at a time' if parallelism else ''}); logs under {sweep_dir / 'submitit'}")
    return result


def _launch_quiet(req) -> dict[str, Any]:
    from pipeline.train.launch import launch

    return launch(req, out=lambda *a: None)


def submit_array(held: list[dict[str, Any]], sweep_dir: Path, name: str, parallelism: int | None) -> list[Any]:
    """One submitit job array over the members' held run directories: one script, each task importing its own
    member's code snapshot (a ``case`` on ``$SLURM_ARRAY_TASK_ID``)."""
    import submitit

    from pipeline.train.launch import check_slurm, job_environment, slurm_parameters
    from pipeline.train.main import TrainJob
    from pipeline.train.snapshot import shell_exports

    check_slurm()
    first = held[0]
    cfg, nodes = first["stored"], first["nodes"]
    params = slurm_parameters(cfg, nodes, sweep_dir)
    params["job_name"] = name
    cases = " ".join(f"{i}) {shell_exports(Path(info['code_dir']))[0]} ;;" for i, info in enumerate(held)
                     if info.get("code_dir"))
    if cases:
        params["setup"] = list(params["setup"]) + [f'case "${{SLURM_ARRAY_TASK_ID:-0}}" in {cases} esac',
                                                   "export PYTHONSAFEPATH=1"]
    if parallelism:
        params["array_parallelism"] = parallelism
    ex = submitit.SlurmExecutor(folder=sweep_dir / "submitit" / "%j", max_num_timeout=cfg.cluster.max_requeues)
    ex.update_parameters(**params)
    with job_environment(first["job_env"]), ex.batch():  # submitted as one array when the block ends
        jobs = [ex.submit(TrainJob(info["run_dir"])) for info in held]
    return jobs


def _run_local(result: SweepLaunch, reqs, member_files, state: SweepState, parallelism: int, out) -> SweepLaunch:
    """Local members, ``parallelism`` at a time, each a normal local launch; this process waits for them."""
    from dataclasses import replace

    pending = list(range(len(reqs)))
    running: dict[int, dict[str, Any]] = {}
    with state.update() as st:  # a member still pending once this process is gone never starts (reconcile)
        st["launcher"] = local_process(os.getpid())
    while pending or running:
        while pending and len(running) < parallelism:
            i = pending.pop(0)
            info = _launch_quiet(replace(reqs[i], files=member_files(i)))
            running[i] = info
            result.members.append(info)
            result.jobs.append(info["job"])
            with state.update() as st:
                st["members"][i].update(job_id=info["job_id"], process=local_process(int(info["job_id"])))
            out(f"  [{i}] started   {reqs[i].name} (local job {info['job_id']})")
        time.sleep(0.5)
        for i, info in list(running.items()):
            if info["job"].done():
                del running[i]
                ok = (Path(info["run_dir"]) / "result.json").exists()
                if not ok:  # submitit says FINISHED for any exit code: one without a result is a failure
                    told = str(info["job"].state)
                    mark_crashed(state, i, "FAILED" if told == "FINISHED" else told, info["job_id"])
                    ok = state.read()["members"][i]["status"] not in FAILED  # it had recorded its end
                m = state.read()["members"][i]
                out(f"  [{i}] {'ended' if ok else 'FAILED'}     {reqs[i].name}: {m['status']}, {m['hours']:.4g} of "
                    f"{m['budget']:.4g} h")
    st = state.read()
    if st.get("mlflow") and not st.get("parent_closed"):  # every member failed before closing it
        with state.update() as s:
            s["parent_closed"] = True
        close_parent(state, st["mlflow"], "FAILED" if any(m["status"] in FAILED for m in st["members"])
                     else "FINISHED")
    result.state = state.read()
    return result


def wait_sweep(launched: SweepLaunch, out=print, poll_s: float = 2.0) -> int:
    """Wait for a Slurm sweep's jobs (requeues included); 0 when every member wrote its result."""
    pending = dict(enumerate(launched.jobs))
    failed = 0
    state = SweepState(launched.sweep_dir)
    while pending:
        for i, job in list(pending.items()):
            if job.done():
                del pending[i]
                run_dir = Path(launched.members[i]["run_dir"])
                if not (run_dir / "result.json").exists():
                    failed += 1
                    mark_crashed(state, i, _ended_state(job), str(job.job_id))
                m = state.read()["members"][i]
                out(f"  [{i}] {m['name']}: {m['status']}, {m['hours']:.4g} of {m['budget']:.4g} h")
        time.sleep(poll_s)
    st = state.read()
    if st.get("mlflow") and not st.get("parent_closed"):
        with state.update() as s:
            s["parent_closed"] = True
        close_parent(state, st["mlflow"], "FAILED" if failed else "FINISHED")
    launched.state = state.read()
    return 1 if failed else 0



def _ended_state(job) -> str:
    """The state of a Slurm job that submitit says is done (sacct through submitit; UNKNOWN if it cannot say)."""
    try:
        return str(job.state).split()[0] or "UNKNOWN"
    except Exception:  # noqa: BLE001 -- the job is done either way
        return "UNKNOWN"


def find_sweep(target: str, runs_dir: str | None = None) -> Path:
    """A sweep's directory: ``target`` itself when it holds sweep.json, else ``<runs_dir>/<target>``."""
    for d in (Path(target), Path(runs_dir or "runs") / target):
        if (d / SWEEP_FILE).is_file():
            return d
    raise ConfigError(f"no sweep {target!r}: neither {Path(target) / SWEEP_FILE} nor "
                      f"{Path(runs_dir or 'runs') / target / SWEEP_FILE} exists (give the sweep's directory, or its "
                      f"name with the --runs-dir it was launched with)")


def sweep_status(target: str, runs_dir: str | None = None, out=print, probe=None) -> dict[str, Any]:
    """``jobs/launch.py --sweep-status NAME``: reconcile the sweep with its jobs (members whose job died are
    recorded ``crashed``, their hours given to the survivors), then print every member (status, GPU-hours used
    of those granted, job and its state) and every decision. Returns the state."""
    state = SweepState(find_sweep(target, runs_dir))
    seen: dict[int, str] = {}
    try:
        reconcile(state, probe=probe, seen=seen)
        current = state.read()
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{state.path} cannot be read ({type(e).__name__}: {e})") from None
    out(summary(current, seen))
    return current
