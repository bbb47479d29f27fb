"""Sweeps: one recipe, several members (override sets), one job array, one GPU-hour budget, and optional
asynchronous successive halving (ASHA).

    python jobs/launch.py --recipe smoke --sweep model.attention_type=divided_space_time,joint_space_time,space_only \\
        --sweep-budget 3 --halving "rungs=0.25,0.5 eta=2" --array-parallelism 2

The sweep directory ``<runs_dir>/<sweep>/`` holds ``sweep.json`` (the members, their overrides, run directories,
budgets, every rung report and decision), the array's logs (``submitit/``) and each member's normal run directory
``<sweep>/<sweep>-<i>-<summary>/`` (a ``sweep_member.json`` there says which sweep it belongs to). MLflow: one parent
run for the sweep (tags ``kind=sweep``, ``sweep``, ``members``, ``total_budget``), each member a child run (its
``mlflow.parentRunId`` tag, set by ``pipeline.tracking.sink.create_run`` from ``sweep_member.json``).

**Budget.** A total budget (``--sweep-budget``) is split equally: each member's *base* budget. Without it, every
member keeps the recipe's ``budget.gpu_hours``. Hours a member does not use because halving stopped it are
*freed*: they go, in equal parts, to the members still training or still waiting to start (``alive``); a member
reads its current budget from ``sweep.json`` at each validation and whenever its own budget looks spent
(``SweepHours``), so a survivor trains on. Freed hours with no member alive to take them stay ``unallocated``.

**Successive halving.** Rungs are fractions of the *base* member budget, counted in the run's GPU-hours (the
account of ``pipeline.train.budget``: the same unit the budget and the comparison use, and the same mark for
every member whatever its speed per step: ASHA compares members at equal resource). At the first validation at
or past a rung, the member reports its validation accuracy (``val_top1``, or ``val_map`` for a multi-label model)
and decides at once, in its own process, against the members that have reported at that rung so far (including
itself): it continues only if it ranks among the top ``max(1, floor(n / eta))`` of those ``n``; equal scores rank
by arrival (the earlier first), so the first member to arrive continues and a later one must be strictly better
to displace it. Nobody waits for anyone (no deadlock whatever the array parallelism); the price, as in ASHA, is
that early arrivals are judged against fewer peers. A stopped member ends like a budget stop: checkpoint, the
test protocol, the export, the MLflow run FINISHED with ``stopped_by=halving``.

**Members that end early or die.** A member that ends before its budget is spent (its steps ran out, or its
plan ended with the planner's margin left) returns what it did not use, by the same rule (``finish`` decision).
A member whose job died without recording its end (killed, out of memory, a failed node, a Python exception) is
*reconciled* wherever the state is read for a decision or a report (``reconcile``: before a rung report, before
a member's end gives hours away, in ``jobs/launch.py --sweep-status``, ``--wait`` and ``jobs/compare.py
--sweep``): a member marked ``pending``/``running`` whose current job (the attempt running now: a member resumed
by hand records its new job) Slurm reports ended (``FAILED``, ``CANCELLED``, ``TIMEOUT``, ``OUT_OF_MEMORY``,
``NODE_FAIL``, ...: the controller first, ``squeue``, else ``scontrol``; ``sacct`` only for the jobs the
controller no longer knows) or whose local process is gone is recorded ``crashed`` with that state (``crash``
decision), its unused hours go to the survivors, its MLflow run is marked FAILED, and the last member to end
closes the parent run. A job the controller holds as pending, running, preempted or requeued is alive (a job
requeued after a node failure is, whatever accounting says); a job nobody can tell about (no Slurm command here,
a controller that does not answer within ``SLURM_PROBE_S``, another host's process) is left as it is. A crashed
member that runs again (``--resume``) keeps the budget sweep.json grants it, 0 included: nothing left is a stop.

Every decision is logged in ``sweep.json`` (``decisions``), in the member's run log, on its MLflow run (tag
``halving_rung<k>`` and metric ``sweep/rung<k>``) and on the parent (tag ``halving.<n>``, rung decisions and
crash/finish records alike, in order). The shared state is
read-modify-written under ``fcntl.flock`` on ``sweep.lock`` next to ``sweep.json``: members on several nodes need
the sweep directory on a shared file system with working POSIX locks (NFSv4, Lustre, GPFS do), as the run
directories themselves do.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError
from pipeline.train.budget import GpuHours, fake_step_seconds

log = logging.getLogger("pipeline.train")

SWEEP_FILE = "sweep.json"
LOCK_FILE = "sweep.lock"
MEMBER_FILE = "sweep_member.json"  # in a member's run directory (the name pipeline.tracking.sink reads)
ALIVE = ("pending", "running")
# a job in one of these states has ended (the first word of the controller's or accounting's state: "CANCELLED
# by 0"); PENDING, RUNNING, PREEMPTED, REQUEUED, REQUEUE_HOLD, SUSPENDED, COMPLETING, ... are alive when the
# controller says so (a preempted or requeued job runs again). COMPLETED counts too: a member still marked running
# ended without recording its end. GONE: neither the controller nor accounting knows the job any more; EXITED: a
# local member's process is gone;
# NOT_STARTED: a local member never started and the launcher that would start it is gone.
DEAD_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
               "COMPLETED", "GONE", "EXITED", "NOT_STARTED")
# after a state accounting told for a job the controller no longer knows (so it has ended, whatever the state's
# name: "PREEMPTED" under PreemptMode=CANCEL never runs again)
ENDED_NOTE = "(ended: the controller no longer knows the job)"
# one deadline for all the Slurm calls of one probe: a rung check's reconcile runs on rank 0 while the other ranks
# wait in a collective, so a hung controller must not hold it longer than this (unanswered jobs stay as they are)
SLURM_PROBE_S = 60.0
# keys one job array cannot vary: every task of an array has the same resources and script
ARRAY_FIXED = ("cluster.", "runs_dir", "name", "tracking.")


# -- what the sweep is -------------------------------------------------------------------------------------


@dataclass
class Halving:
    rungs: list[float]  # fractions of the base member budget, increasing, each in (0, 1)
    eta: float = 2.0  # a member continues past a rung if it is in the top 1/eta of those that reported there

    def __post_init__(self) -> None:
        if not self.rungs or any(not 0 < r < 1 for r in self.rungs) or sorted(set(self.rungs)) != list(self.rungs):
            raise ConfigError(f"halving rungs={self.rungs}: expected increasing fractions of the member budget, each "
                              f"between 0 and 1 (e.g. rungs=0.25,0.5)")
        if not (math.isfinite(self.eta) and self.eta > 1):
            raise ConfigError(f"halving eta={self.eta}: expected a finite number above 1 (2 keeps the top half at each "
                              f"rung)")


@dataclass
class SweepSpec:
    members: list[dict[str, str]]  # each member's overrides: key -> value as typed (YAML)
    name: str = ""
    total_budget: float | None = None  # GPU-hours for the whole sweep, split equally; None: the recipe's each
    halving: Halving | None = None
    array_parallelism: int | None = None
    source: str = "--sweep"  # where it came from, for messages

    def overrides(self, i: int) -> list[str]:
        return [f"{k}={v}" for k, v in self.members[i].items()]


def split_values(text: str, where: str = "--sweep") -> list[str]:
    """``a,b,[1,2],'x,y'`` -> ``['a', 'b', '[1,2]', "'x,y'"]``: commas inside brackets, braces or quotes do not
    split (a list value stays one value). An unclosed quote or bracket is refused (``ConfigError``): split
    anyway, it would make a member of a value nobody meant (``'0.2``)."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"{where} {text!r}: {ch!r} closes a bracket that was never opened")
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if quote:
        raise ConfigError(f"{where} {text!r}: the quote {quote} is never closed (quote a value whole, e.g. "
                          f"optim.lr=0.1,'0.2', or not at all)")
    if depth:
        raise ConfigError(f"{where} {text!r}: a bracket is never closed (a list value is whole: [32,40])")
    out.append(cur.strip())
    return out


def parse_axis(item: str) -> tuple[str, list[str]]:
    """``--sweep key=v1,v2`` -> (key, [v1, v2])."""
    key, sep, values = item.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ConfigError(f"--sweep {item!r}: expected key=value1,value2 (e.g. optim.lr=0.01,0.005)")
    vals = split_values(values, f"--sweep {key}=")
    if any(not v for v in vals):
        raise ConfigError(f"--sweep {item!r}: an empty value (two commas in a row, or a trailing comma)")
    if len(set(vals)) != len(vals):
        raise ConfigError(f"--sweep {item!r}: a value is listed twice")
    return key, vals


def grid(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """The product of the axes, the first axis varying slowest: ``{a: [1, 2], b: [x, y]}`` -> 4 members."""
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(axes[k] for k in keys))]


def grid_from_args(items: list[str]) -> list[dict[str, str]]:
    axes: dict[str, list[str]] = {}
    for item in items:
        key, values = parse_axis(item)
        if key in axes:
            raise ConfigError(f"--sweep {key}=... is given twice: list every value in one --sweep {key}=v1,v2")
        axes[key] = values
    return grid(axes)


def parse_halving(text: str, where: str = "--halving") -> Halving:
    """``rungs=0.25,0.5 eta=2`` -> Halving."""
    fields: dict[str, str] = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if not sep or key not in ("rungs", "eta") or key in fields:
            raise ConfigError(f"{where} {text!r}: expected 'rungs=F1,F2,... [eta=N]' (e.g. rungs=0.25,0.5 eta=2)")
        fields[key] = value
    if "rungs" not in fields:
        raise ConfigError(f"{where} {text!r}: rungs=... is required (fractions of the member budget)")
    try:
        rungs = [float(v) for v in fields["rungs"].split(",")]
        eta = float(fields.get("eta", 2))
    except ValueError:
        raise ConfigError(f"{where} {text!r}: rungs and eta are numbers (rungs=0.25,0.5 eta=2)") from None
    return Halving(rungs, eta)


def _yaml_value(value: Any) -> str:
    """A sweep file's YAML value as an override's text (parsed back as YAML by the config)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def load_sweep_file(path: str | Path) -> SweepSpec:
    """A sweep file (YAML, read with the safe loader: nothing in it runs)::

        name: attn                      # optional: the sweep's name
        grid:                           # the product of these ...
          model.attention_type: [divided_space_time, joint_space_time, space_only]
        members:                        # ... or the members listed, each its overrides
          - {optim.lr: 0.01}
          - {optim.lr: 0.005, train.epochs: 30}
        budget: 3.0                     # optional: total GPU-hours, split across members
        halving: {rungs: [0.25, 0.5], eta: 2}
        array_parallelism: 2
    """
    where = f"sweep file {path}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with grid: or members: (see jobs/launch.py --help)")
    unknown = sorted(set(data) - {"name", "grid", "members", "budget", "halving", "array_parallelism"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected name, grid, members, budget, halving, "
                          f"array_parallelism")
    if ("grid" in data) == ("members" in data):
        raise ConfigError(f"{where}: give either grid: (a product of values) or members: (a list), one of them")
    if "grid" in data:
        g = data["grid"]
        if not isinstance(g, dict) or not g or any(not isinstance(v, list) or not v for v in g.values()):
            raise ConfigError(f"{where}: grid: expected key: [value, ...] entries, each with at least one value")
        axes = {str(k): [_yaml_value(v) for v in vs] for k, vs in g.items()}
        for k, vs in axes.items():
            twice = sorted({v for v in vs if vs.count(v) > 1})
            if twice:
                raise ConfigError(f"{where}: grid: {k}: {', '.join(twice)} listed twice (each value makes members of "
                                  f"its own: list it once)")
        members = grid(axes)
    else:
        m = data["members"]
        if not isinstance(m, list) or not m or any(not isinstance(x, dict) for x in m):
            raise ConfigError(f"{where}: members: expected a list of mappings (key: value overrides), at least one")
        members = [{str(k): _yaml_value(v) for k, v in x.items()} for x in m]
    halving = None
    if data.get("halving") is not None:
        h = data["halving"]
        if not isinstance(h, dict) or set(h) - {"rungs", "eta"} or "rungs" not in h:
            raise ConfigError(f"{where}: halving: expected {{rungs: [0.25, 0.5], eta: 2}}")
        try:
            rungs = [float(r) for r in (h["rungs"] if isinstance(h["rungs"], list) else [h["rungs"]])]
            eta = float(h.get("eta", 2))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: halving: rungs and eta are numbers") from None
        try:
            halving = Halving(rungs, eta)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    budget, par = data.get("budget"), data.get("array_parallelism")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget <= 0):
        raise ConfigError(f"{where}: budget={budget!r}: expected the sweep's total GPU-hours, a finite number above 0")
    if par is not None and (isinstance(par, bool) or not isinstance(par, int) or par < 1):
        raise ConfigError(f"{where}: array_parallelism={par!r}: expected a positive integer")
    name = data.get("name") or ""
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name={name!r}: expected a string")
    return SweepSpec(members, name=name, total_budget=float(budget) if budget is not None else None,
                     halving=halving, array_parallelism=par, source=where)


def member_name(sweep: str, index: int, overrides: dict[str, str], limit: int = 60) -> str:
    """``<sweep>-<i>-<summary>``: the last part of each key and its value, in characters a run name allows."""
    summary = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in overrides.items())
    summary = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", summary)).strip("-.")[:limit].rstrip("-.")
    return f"{sweep}-{index}" + (f"-{summary}" if summary else "")


def split_budget(total: float, members: int) -> list[float]:
    """Equal shares of a total budget."""
    return [total / members] * members


# -- the shared state: sweep.json under a lock --------------------------------------------------------------


class SweepState:
    """``sweep.json``, read and rewritten under an exclusive ``fcntl.flock`` on ``sweep.lock`` (a shared file
    system with POSIX locks when members run on several nodes). Writes go to a temporary file renamed over
    ``sweep.json``, so a reader without the lock sees the old state or the new one, never half of one."""

    def __init__(self, sweep_dir: str | Path) -> None:
        self.dir = Path(sweep_dir)
        self.path = self.dir / SWEEP_FILE

    def read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text())

    def write(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{SWEEP_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def update(self):
        """``with state.update() as s: ...`` -- s is the current state, written back when the block ends."""
        import fcntl

        with open(self.dir / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.read()
                yield state
                state["updated"] = time.time()
                self.write(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def new_state(name: str, spec: SweepSpec, recipe: str, members: list[dict[str, Any]], executor: str,
              parallelism: int | None) -> dict[str, Any]:
    """The initial ``sweep.json``. ``members``: name, overrides, run_dir, base budget of each."""
    halving = {"rungs": spec.halving.rungs, "eta": spec.halving.eta} if spec.halving else None
    return {"name": name, "recipe": recipe, "created": time.time(), "executor": executor,
            "array_parallelism": parallelism, "total_budget": sum(m["base_budget"] for m in members),
            "budget_split": "total" if spec.total_budget is not None else "recipe", "halving": halving,
            "members": [{"index": i, "status": "pending", "budget": m["base_budget"], "hours": 0.0, "rungs": {},
                         **m} for i, m in enumerate(members)],
            "rungs": [{"fraction": f, "reports": []} for f in (spec.halving.rungs if spec.halving else [])],
            "decisions": [], "unallocated": 0.0, "mlflow": None, "job_ids": []}


def rung_hours(state: dict[str, Any], member: int, rung: int) -> float:
    """Where rung ``rung`` is for ``member``: its fraction of the member's base budget, in GPU-hours."""
    return state["rungs"][rung]["fraction"] * state["members"][member]["base_budget"]


def asha_continues(earlier: list[float], value: float, eta: float) -> tuple[bool, int, int]:
    """The ASHA rule for a member arriving at a rung with ``value`` after ``earlier`` (the scores of those that
    reported there before it, in any order): (continues, its place from 1, how many reported). It continues when
    its place is within the top ``max(1, floor(n / eta))``; an equal score does not displace an earlier arrival."""
    place = 1 + sum(1 for v in earlier if v >= value)
    n = len(earlier) + 1
    keep = max(1, math.floor(n / eta))
    return place <= keep, place, n


def redistribute(state: dict[str, Any], giver: int, freed: float) -> dict[int, float]:
    """Give ``freed`` hours of member ``giver`` in equal parts to the members still alive (training or waiting);
    returns who got what (empty: nobody alive, the hours are ``unallocated``)."""
    takers = [m for m in state["members"] if m["status"] in ALIVE and m["index"] != giver]
    if freed <= 0:
        return {}
    if not takers:
        state["unallocated"] += freed
        return {}
    share = freed / len(takers)
    for m in takers:
        m["budget"] += share
    return {m["index"]: share for m in takers}


def report_rung(state: dict[str, Any], member: int, rung: int, value: float, hours: float, step: int,
                metric: str) -> dict[str, Any]:
    """Member ``member`` reached rung ``rung`` with ``value``: record the report, decide (``asha_continues``),
    and on a stop free what the member has not used and give it to the survivors. Returns the decision (also
    appended to ``state['decisions']``)."""
    eta = state["halving"]["eta"]
    reports = state["rungs"][rung]["reports"]
    go_on, place, n = asha_continues([r["value"] for r in reports], value, eta)
    m = state["members"][member]
    decision = {"time": time.time(), "member": member, "name": m["name"], "rung": rung,
                "fraction": state["rungs"][rung]["fraction"], "rung_hours": rung_hours(state, member, rung),
                "step": step, "hours": hours, "metric": metric, "value": value, "place": place, "reported": n,
                "keep": max(1, math.floor(n / eta)), "decision": "continue" if go_on else "stop"}
    reports.append({"member": member, "value": value, "step": step, "hours": hours, "decision": decision["decision"]})
    m["rungs"][str(rung)] = {"value": value, "step": step, "hours": hours, "decision": decision["decision"]}
    if not go_on:
        m.update(status="stopped", stopped_at={"rung": rung, "step": step, "hours": hours})
        return _give_back(state, member, hours, decision)  # its budget becomes what it used
    state["decisions"].append(decision)
    return decision


def _give_back(state: dict[str, Any], member: int, hours: float, decision: dict[str, Any]) -> dict[str, Any]:
    """Member ``member`` is done with ``hours`` used: what its budget held beyond them goes to the members alive
    (``redistribute``), its budget becomes what it used, and ``decision`` (with ``freed`` and ``given_to``) is
    appended to the decisions."""
    m = state["members"][member]
    freed = max(0.0, m["budget"] - hours)
    if freed > 0:
        m["budget"] = hours
    decision.update(freed=freed, given_to={state["members"][i]["name"]: share
                                           for i, share in redistribute(state, member, freed).items()})
    state["decisions"].append(decision)
    return decision


def record_end(state: dict[str, Any], member: int, outcome: str, hours: float) -> dict[str, Any] | None:
    """Member ``member`` ended (``outcome``: done, budget, halted) after ``hours``: its final state; a member that
    was not stopped by halving and ended before its budget was spent gives the rest back (a ``finish`` decision,
    returned; None when there was nothing to give)."""
    m = state["members"][member]
    m["hours"], m["outcome"] = hours, outcome
    if m["status"] == "stopped":  # halving freed its rest already
        return None
    m["status"] = "finished"
    if m["budget"] - hours <= 0:
        return None
    return _give_back(state, member, hours, {
        "kind": "finish", "time": time.time(), "member": member, "name": m["name"], "outcome": outcome,
        "hours": hours, "budget": m["budget"], "decision": "finished early"})


def record_crash(state: dict[str, Any], member: int, job_state: str, hours: float,
                 was: str | None = None) -> dict[str, Any]:
    """Member ``member``'s job ended (``job_state``) without the member recording its end: it is ``crashed``, and
    the hours it had not used (``hours``: what its account last saved) go to the members alive (a ``crash``
    decision, returned). ``was``: its status before (when the caller marked several crashed first, so that none
    of them receives another's hours)."""
    m = state["members"][member]
    hours = max(hours, float(m.get("hours") or 0.0))
    crash = {"job_state": job_state, "job_id": m.get("job_id"), "time": time.time(), "hours": hours,
             "was": was or m["status"]}
    m.update(status="crashed", hours=hours, crashed=crash)
    return _give_back(state, member, hours, {
        "kind": "crash", "time": crash["time"], "member": member, "name": m["name"], "job_id": m.get("job_id"),
        "job_state": job_state, "was": crash["was"], "hours": hours, "budget": m["budget"], "decision": "crashed"})


def describe(decision: dict[str, Any]) -> str:
    """One line for the run log, an MLflow tag and the comparison."""
    d = decision
    kind = d.get("kind", "rung")
    if kind in ("crash", "finish"):
        given = ", ".join(f"{k} +{v:.4g} h" for k, v in d["given_to"].items()) or \
            ("nobody alive: unallocated" if d["freed"] > 0 else "nothing to give")
        if kind == "crash":
            text = (f"{d['name']} CRASHED: its job {d.get('job_id') or '?'} is {d['job_state']} ({d['was']} in "
                    f"sweep.json) after {d['hours']:.4g} h")
        else:
            text = f"{d['name']} FINISHED EARLY ({d['outcome']}) after {d['hours']:.4g} h of its {d['budget']:.4g} h"
        return text + f"; {d['freed']:.4g} h freed ({given})"
    if kind == "resume":
        left = d["budget"] - d.get("hours", 0.0)
        return (f"{d['name']} RESUMED after it was recorded crashed ({d['job_state']}): its freed hours stay with the "
                f"others; it continues with {d['budget']:.4g} h"
                + (f" of which {d['hours']:.4g} h used" if d.get("hours") else "")
                + ("" if left > 0 else ": nothing left, it stops at its first step"))
    text = (f"{d['name']} at rung {d['rung']} ({d['fraction']:g} of its budget, {d['rung_hours']:.4g} h; step "
            f"{d['step']}): {d['metric']}={d['value']:.4g}, place {d['place']} of {d['reported']} reported, top "
            f"{d['keep']} continue -> {d['decision'].upper()}")
    if d["decision"] == "stop":
        given = ", ".join(f"{k} +{v:.4g} h" for k, v in d["given_to"].items()) or "nobody alive: unallocated"
        text += f"; {d['freed']:.4g} h freed ({given})"
    return text


# -- is a member's job alive? (reconciling sweep.json with the scheduler) -----------------------------------


def _first_word(state: str) -> str:
    return (state.split() or ["UNKNOWN"])[0].rstrip("+").upper()  # "CANCELLED by 0" -> CANCELLED


def _call(cmd: list[str], end: float) -> subprocess.CompletedProcess | None:
    """``cmd`` run until the monotonic time ``end`` at the latest; None when it could not run or ran out of time."""
    left = end - time.monotonic()
    if left <= 0:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=left)
    except (OSError, subprocess.SubprocessError):
        return None


def _controller_states(ids: list[str], end: float) -> tuple[dict[str, str], list[str]]:
    """What the Slurm controller says of ``ids``: (the state of each job it knows, the jobs it answered it does
    not know). ``squeue`` in one call (``--array``: one line per array task, ``123_4``; ``--states=all``: ended
    jobs it still holds too), else ``scontrol show job`` per job. A controller that cannot be asked (no command,
    no answer before ``end``, an error that is not "invalid job id") knows nothing and denies nothing."""
    if shutil.which("squeue"):
        p = _call(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={','.join(ids)}"],
                  end)
        if p is None:
            return {}, []
        known: dict[str, str] = {}
        for line in p.stdout.splitlines():
            job, _, state = line.strip().partition("|")
            if job in ids and state.strip():
                known[job] = _first_word(state)
        # several ids: squeue lists those it knows (rc 0); one id it does not know: "Invalid job id specified"
        if p.returncode == 0 or "invalid job id" in (p.stderr + p.stdout).lower():
            return known, [j for j in ids if j not in known]
        return known, []
    if shutil.which("scontrol"):
        known, unknown = {}, []
        for job in ids:
            p = _call(["scontrol", "show", "job", "-o", job], end)
            if p is None:
                continue
            found = re.search(r"\bJobState=(\S+)", p.stdout)
            if p.returncode == 0 and found:
                known[job] = _first_word(found.group(1))
            elif "invalid job id" in (p.stderr + p.stdout).lower():
                unknown.append(job)
        return known, unknown
    return {}, []


def _accounting_states(ids: list[str], end: float) -> dict[str, str]:
    """What Slurm's accounting (``sacct``, one call; parsable rows ``JobID|State``) says of ``ids``."""
    states: dict[str, str] = {}
    if not ids or not shutil.which("sacct"):
        return states
    p = _call(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)], end)
    for line in p.stdout.splitlines() if p is not None and p.returncode == 0 else []:
        job, _, state = line.strip().partition("|")
        if job in ids and state:
            states[job] = _first_word(state.split("|")[0])
    return states


def has_ended(state: str) -> bool:
    """Whether a job state a probe told (``job_states``) means the job has ended."""
    return _first_word(state) in DEAD_STATES or state.endswith(ENDED_NOTE)


def slurm_job_states(job_ids: list[str], deadline_s: float | None = None) -> dict[str, str]:
    """The state of each Slurm job (``<array>_<task>`` or a plain id) that Slurm can tell about. The controller
    is asked first (``_controller_states``): it holds every job that is pending, running or requeued (a job
    requeued after ``NODE_FAIL`` keeps its id and is ``PENDING`` there while accounting may still say
    ``NODE_FAIL``), so its answer wins. Only for the jobs it answers it does not know (ended and purged) is
    accounting (``sacct``) asked how they ended; whatever accounting says, such a job has ended: a state that
    is not an end (``PREEMPTED`` under ``PreemptMode=CANCEL``, which never runs again; a stale ``RUNNING``) is
    told with ``ENDED_NOTE``, and a job accounting does not know either is ``GONE``. A job missing from the
    answer could not be told (no Slurm command here, a controller that did not answer): the caller leaves that
    member as it is. Every call together stops at ``deadline_s`` (default ``SLURM_PROBE_S``: a rung check's
    reconcile runs on rank 0 while the other ranks wait in a collective): what is not told by then is not told."""
    ids = list(dict.fromkeys(str(j) for j in job_ids if j))
    if not ids:
        return {}
    end = time.monotonic() + (SLURM_PROBE_S if deadline_s is None else deadline_s)
    states, unknown = _controller_states(ids, end)
    accounting = _accounting_states(unknown, end)
    for job in unknown:
        told = accounting.get(job)
        if told is None:
            states[job] = "GONE"
        else:
            states[job] = told if told in DEAD_STATES else f"{told} {ENDED_NOTE}"
    return states


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks) of a local process, None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # after "pid (comm)": the command may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def local_process(pid: int) -> dict[str, Any]:
    """What identifies a local process later (its host and start time: a pid is reused once it is gone). The start
    is None when there was no such process to read (it had already ended when it was recorded)."""
    stat = _proc_stat(pid)
    return {"host": socket.gethostname(), "pid": pid, "start": stat[1] if stat else None}


def local_alive(record: dict[str, Any] | None) -> bool | None:
    """Whether the process ``local_process`` described is still running: None when it cannot be told here
    (another host, no /proc); a zombie (ended, not yet reaped) or a reused pid is dead. A record without a start
    time is dead too, whatever runs under its pid now: on a host with /proc (the same host: this one has it)
    ``local_process`` reads a start for every process that exists, so the one it recorded had ended already, and
    a process running under that pid now is another one (otherwise a reused pid would read alive for ever)."""
    if not record or record.get("host") != socket.gethostname() or not Path("/proc/self/stat").exists():
        return None
    if record.get("start") is None:
        return False
    stat = _proc_stat(int(record["pid"]))
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return stat[1] == record["start"]


def current_job() -> tuple[str, dict[str, Any] | None]:
    """This process's job as ``reconcile`` probes it: (job id, local process record). Under Slurm (and not a
    local submitit job inside an allocation), the job ``<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>`` for an
    array task (the id the array's launch recorded), else ``SLURM_JOB_ID``, and no process: the scheduler's state
    is the member's (a preempted job's process is gone while the job, requeued, is alive). Otherwise the local
    job's controlling process (``SUBMITIT_LOCAL_JOB_ID``, the pid a local launch records), else this process."""
    local = os.environ.get("SUBMITIT_LOCAL_JOB_ID", "").strip()
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    slurm = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    if slurm and not local:
        return slurm, None
    pid = int(local) if local.isdigit() else os.getpid()
    record = local_process(pid)
    if record["start"] is None:  # not a process of this host's /proc: this one runs the member
        pid, record = os.getpid(), local_process(os.getpid())
    return str(pid), record


def job_states(state: dict[str, Any], members: list[dict[str, Any]],
               deadline_s: float | None = None) -> dict[int, str]:
    """The job state of each of ``members`` that can be told, by what its current attempt runs as
    (``current_job``): a member with a local process record is RUNNING while that process runs, EXITED once it
    is gone; one with a job id and no process is a Slurm job (``slurm_job_states``, within ``deadline_s``); in a
    local sweep, a member still pending whose launcher is gone is NOT_STARTED."""
    out: dict[int, str] = {}
    launcher = local_alive(state.get("launcher")) if state.get("executor") == "local" else None
    by_job: dict[str, int] = {}
    for m in members:
        if m.get("process"):
            alive = local_alive(m["process"])
            if alive is not None:
                out[m["index"]] = "RUNNING" if alive else "EXITED"
        elif m.get("job_id"):
            by_job[str(m["job_id"])] = m["index"]
        elif m["status"] == "pending" and launcher is False:
            out[m["index"]] = "NOT_STARTED"
    for job, st in slurm_job_states(list(by_job), deadline_s).items():
        out[by_job[job]] = st
    return out


def member_hours(member: dict[str, Any]) -> float:
    """What a member has used so far: its run directory's GPU-hour account (saved at its checkpoints and metric
    lines), or what sweep.json last heard from it."""
    hours = float(member.get("hours") or 0.0)
    try:
        saved = json.loads((Path(member["run_dir"]) / "gpu_hours.json").read_text())
        hours = max(hours, float(saved.get("hours", 0.0)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return hours


def reconcile(sweep: SweepState, probe=None, me: int | None = None, seen: dict[int, str] | None = None,
              ended: bool = False) -> list[dict[str, Any]]:
    """Members marked alive (pending, running) whose job has ended without them recording their end become
    ``crashed`` (``record_crash``: their unused hours go to the survivors), each a logged decision; their MLflow
    runs are marked FAILED, the parent gets the decisions as tags, and when nobody is left alive the parent run
    is closed. ``probe(state, members) -> {index: job state}`` (default ``job_states``) is asked outside the
    lock; under it, a member that ended, started again or was stopped in the meantime is left alone. ``me``:
    the calling member, never judged. ``seen`` receives every job state the probe told. ``ended``: every job
    the probe tells about has ended, whatever its state's name (a launcher that saw it end). Returns the new
    decisions."""
    try:
        s = sweep.read()
    except (OSError, ValueError) as e:
        log.warning("sweep state %s unreadable (%s): not reconciled", sweep.path, e)
        return []
    suspects = [m for m in s["members"] if m["status"] in ALIVE and m["index"] != me]
    if not suspects:
        return []
    states = (probe or job_states)(s, suspects)
    if seen is not None:
        seen.update(states)
    dead = {m["index"]: (states[m["index"]], member_hours(m), len(m.get("attempts", [])))
            for m in suspects if m["index"] in states and (ended or has_ended(states[m["index"]]))}
    if not dead:
        return []
    decisions: list[tuple[int, dict[str, Any]]] = []
    with sweep.update() as s:
        was = {}
        for i, (_, _, attempts) in dead.items():
            m = s["members"][i]
            if m["status"] in ALIVE and len(m.get("attempts", [])) == attempts:  # else it ended, or started again
                was[i], m["status"] = m["status"], "crashed"  # all of them first: none takes another's hours
        for i, status in was.items():
            job_state, hours, _ = dead[i]
            decisions.append((len(s["decisions"]) + 1, record_crash(s, i, _first_word(job_state), hours, status)))
        last = bool(decisions) and all(x["status"] not in ALIVE for x in s["members"]) and not s.get("parent_closed")
        if last:
            s["parent_closed"] = True
        record = s.get("mlflow")
    for seq, d in decisions:
        text = describe(d)
        log.warning("sweep %s: %s", s["name"], text)
        _member_run_failed(s["members"][d["member"]], d)
        if record:
            _on_parent(record, lambda c, seq=seq, text=text: c.set_tag(record["run_id"], f"halving.{seq:03d}",
                                                                        text[:5000]))
    if last and record:
        close_parent(sweep, record, "FAILED")
    return [d for _, d in decisions]


def _member_run_failed(member: dict[str, Any], decision: dict[str, Any]) -> None:
    """A crashed member's MLflow run: FAILED (it would stay RUNNING), with the job's state as tags."""
    try:
        from pipeline.tracking.sink import end_run

        end_run(member["run_dir"], "FAILED", {"crashed": decision["job_state"], "outcome": "crashed",
                                              "sweep_decision": describe(decision)[:5000]})
    except Exception as e:  # noqa: BLE001 -- tracking never stops the sweep's bookkeeping
        log.warning("sweep: the MLflow run of %s could not be marked FAILED (%s)", member["name"], str(e)[:300])


def _on_parent(record: dict[str, Any], call) -> None:
    """``call(client)`` on the parent MLflow run's server; a server that refuses is a warning (sweep.json has it
    all)."""
    try:
        from pipeline.tracking.sink import mlflow_client

        call(mlflow_client(record["tracking_uri"]))
    except Exception as e:  # noqa: BLE001 -- tracking never stops training
        from pipeline.secrets import redact_text

        log.warning("sweep: the parent MLflow run could not be updated (%s); sweep.json has the decision",
                    redact_text(str(e))[:300])


def mark_crashed(sweep: SweepState, index: int, job_state: str, job_id: str | None = None) -> dict[str, Any] | None:
    """Member ``index``'s job ended (``job_state``, as its launcher saw it) without it recording its end: as
    ``reconcile`` would record it. ``job_id``: the job the launcher saw end; a member that runs as another job
    now (resumed by hand) is left alone. None when it had recorded its end after all (or runs again)."""
    def probe(s: dict[str, Any], members: list[dict[str, Any]]) -> dict[int, str]:
        return {m["index"]: job_state for m in members
                if m["index"] == index and (job_id is None or str(m.get("job_id")) == str(job_id))}

    decisions = reconcile(sweep, probe=probe, ended=True)
    return decisions[0] if decisions else None


def reconcile_sweep(runs_dir: str | Path, name: str) -> list[dict[str, Any]]:
    """``reconcile`` the sweep ``name`` under ``runs_dir`` when its sweep.json is there (``jobs/compare.py
    --sweep``: before it reads the members' MLflow runs); nothing when it is not (a comparison run elsewhere)."""
    from pipeline.config import check_run_name

    check_run_name(name, "sweep")
    sweep_dir = Path(runs_dir) / name
    return reconcile(SweepState(sweep_dir)) if (sweep_dir / SWEEP_FILE).is_file() else []


# -- in a member's process ----------------------------------------------------------------------------------


def read_member(run_dir: str | Path) -> dict[str, Any] | None:
    """``sweep_member.json`` of a run directory, or None outside a sweep."""
    path = Path(run_dir) / MEMBER_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        int(record["index"]), str(record["sweep_dir"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {e}): the run's sweep membership is "
                          f"damaged; restore it, or delete it to run this member on its own") from None
    return record


class SweepHours(GpuHours):
    """A sweep member's GPU-hour account: when its budget looks spent, it reads its current budget from the
    sweep state first (survivors receive the hours stopped members freed)."""

    member: SweepMember

    @classmethod
    def adopt(cls, account: GpuHours, member: SweepMember) -> SweepHours:
        new = cls.__new__(cls)
        new.__dict__.update(account.__dict__)
        new.member = member
        return new

    @property
    def this_attempt_hours(self) -> float:
        per_step = fake_step_seconds()  # a test seam (PIPELINE_FAKE_CLOCK): None in production
        if per_step is None:
            return super().this_attempt_hours
        trainer = self.member.trainer
        engine = getattr(trainer, "engine", None)  # made after the account: no step before it exists
        steps = engine.global_step - getattr(trainer, "resumed", 0) if engine is not None else 0
        return steps * per_step * self.devices / 3600

    @property
    def exhausted(self) -> bool:
        """Spent: in a budgeted sweep a budget of 0 is nothing left (a stop), not a run without a budget."""
        if (self.budget > 0 or self.member.budgeted) and self.hours >= self.budget:
            self.member.refresh_budget()
        return (self.budget > 0 or self.member.budgeted) and self.hours >= self.budget


class SweepMember:
    """One member's side of the sweep: its budget from the shared state, the rung checks at validation time
    (``check``, which every rank calls; rank 0 decides and the others follow), and the end of the member
    (``ended``; the last member to end closes the parent MLflow run)."""

    def __init__(self, record: dict[str, Any], trainer) -> None:
        self.record = record
        self.index = int(record["index"])
        self.state = SweepState(record["sweep_dir"])
        self.trainer = trainer
        self.is_main = trainer.denv.is_main
        self.device = trainer.device
        self.step = 0
        self.stopped = False
        self.budgeted = False  # the member has a GPU-hour budget in sweep.json (its base budget is above 0)
        if self.is_main:
            revived = None
            job, process = current_job()
            with self.state.update() as s:
                m = s["members"][self.index]
                if m["status"] == "crashed":  # recorded crashed, and running again (a --resume of the member)
                    m["status"] = "running"
                    revived = {"kind": "resume", "time": time.time(), "member": self.index, "name": m["name"],
                               "job_state": m["crashed"]["job_state"], "budget": m["budget"],
                               "hours": m.get("hours") or 0.0, "job_id": job, "decision": "resumed"}
                    s["decisions"].append(revived)
                    s["parent_closed"] = False
                if m["status"] == "pending":
                    m["status"] = "running"
                # reconcile probes the attempt running now, not the job or process of the first launch
                m["job_id"], m["process"] = job, process
                m.setdefault("attempts", []).append({"started": time.time(), "job": job,
                                                     "process": process or local_process(os.getpid())})
                self.halving = s["halving"]
                self.stopped = m["status"] == "stopped"
                self.budgeted = float(m.get("base_budget") or 0.0) > 0
            if revived:
                log.warning("sweep %s: %s", record.get("sweep"), describe(revived))
            self.refresh_budget()
        else:
            self.halving = self.state.read()["halving"]

    # budget ----------------------------------------------------------------------------------------------

    def refresh_budget(self) -> None:
        """Rank 0: the account's budget from the sweep state (it grows when other members are stopped). In a
        budgeted sweep it is set whatever it is, 0 included: a member recorded crashed before it used anything
        that runs after all (a revival) has nothing left, which is a stop (``SweepHours.exhausted``), not the "no
        budget" a 0 means to a run alone, or it would spend the hours it gave away again."""
        account = self.trainer.account
        try:
            m = self.state.read()["members"][self.index]
            budget, self.budgeted = float(m["budget"]), float(m.get("base_budget") or 0.0) > 0
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            log.warning("sweep state %s unreadable (%s): the budget stays %.4g", self.state.path, e, account.budget)
            return
        if budget != account.budget and (budget > 0 or self.budgeted):
            if account.budget:
                why = ("hours freed by other members" if budget > account.budget else
                       "what sweep.json grants it: its unused hours went to the others when it was recorded crashed"
                       + (" -- nothing left, it stops" if budget <= 0 else ""))
                log.info("sweep: budget %.4g -> %.4g %s-hours (%s)", account.budget, budget, account.unit, why)
            account.budget = budget
            self.trainer.sinks.log_metrics({"sweep/budget": budget}, self.step)

    # rungs -----------------------------------------------------------------------------------------------

    def check(self, step: int, metrics: dict[str, float]) -> bool:
        """At a validation (every rank, same step): report at each rung passed since the last check; True when
        halving stops this member here. Rank 0 decides; a one-number all-reduce tells the others."""
        self.step = step
        stop = budget = 0.0
        if self.is_main:
            stop = float(self._decide(step, metrics))
            budget = float(self.trainer.account.budget)
        stop, budget = self._agree([stop, budget])
        self.stopped = self.stopped or stop > 0
        if not self.stopped:
            self.follow_budget(budget)
        return stop > 0

    def _agree(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank (the others pass zeros; every rank calls this at the same point)."""
        import torch

        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            t = torch.tensor(values, dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return [float(v) for v in t.tolist()]
        return values

    def follow_budget(self, budget: float) -> None:
        """Every rank, at the same step: the member's current budget (rank 0's, read from the sweep state) becomes
        the run's ``budget.gpu_hours``, which the budget plan (``train.plan_by=budget``, ``BudgetPlanner``) fits
        to: a member granted freed hours re-fits its schedule to its grown budget at this validation, every
        rank to the same total."""
        cfg = self.trainer.cfg
        if budget > 0 and budget != cfg.budget.gpu_hours:
            cfg.budget.gpu_hours = budget
            if not self.is_main:  # rank 0's account reads the sweep state itself (SweepHours)
                self.trainer.account.budget = budget

    def _decide(self, step: int, metrics: dict[str, float]) -> bool:
        self.refresh_budget()
        if not self.halving or self.stopped:
            return self.stopped
        metric = next((k for k in ("val_top1", "val_map") if metrics.get(k) is not None
                       and math.isfinite(metrics[k])), None)
        if metric is None:
            return False
        hours = self.trainer.account.hours
        try:
            before = self.state.read()
            done = before["members"][self.index]["rungs"]
            due = any(str(r) not in done and hours >= rung_hours(before, self.index, r)
                      for r in range(len(before["rungs"])))
        except (OSError, ValueError, KeyError, IndexError):
            due = True
        if due:  # a stop here gives hours away: not to members whose jobs have died
            reconcile(self.state, probe=self._probe(), me=self.index)
        decisions = []
        with self.state.update() as s:
            m = s["members"][self.index]
            m["hours"] = max(float(m.get("hours") or 0.0), hours)  # what a crash report would count
            for r in range(len(s["rungs"])):
                if str(r) in m["rungs"] or hours < rung_hours(s, self.index, r):
                    continue
                d = report_rung(s, self.index, r, float(metrics[metric]), hours, step, metric)
                decisions.append(d)
                if d["decision"] == "stop":
                    break
            parent = (s.get("mlflow") or {}).get("run_id")
            seq = len(s["decisions"])
        for d in decisions:
            self._log(d, parent, seq - len(decisions) + decisions.index(d) + 1)
        self.stopped = any(d["decision"] == "stop" for d in decisions)
        if self.stopped:
            self.trainer.account.budget = hours  # what it used is what it had
        return self.stopped

    def _probe(self):
        """``job_states`` within a deadline the other ranks, waiting in a collective, can afford: ``SLURM_PROBE_S``,
        or a quarter of the run's collective timeout (``train.dist_timeout_s``) when that is shorter."""
        limit = getattr(getattr(getattr(self.trainer, "cfg", None), "train", None), "dist_timeout_s", None)
        deadline = min(SLURM_PROBE_S, limit / 4) if isinstance(limit, (int, float)) and limit > 0 else SLURM_PROBE_S
        return lambda s, members: job_states(s, members, deadline)

    def _log(self, d: dict[str, Any], parent: str | None, seq: int) -> None:
        text = describe(d)
        (log.warning if d["decision"] == "stop" else log.info)("sweep %s: %s", self.record.get("sweep"), text)
        sinks = self.trainer.sinks
        sinks.set_tags({f"halving_rung{d['rung']}": text[:5000],
                        **({"stopped_by": "halving", "halving_stopped_at": str(d["rung"])}
                           if d["decision"] == "stop" else {})})
        sinks.log_metrics({f"sweep/rung{d['rung']}": d["value"], "sweep/continue": float(d["decision"] == "continue")},
                          d["step"])
        if parent:
            self._parent(lambda c: c.set_tag(parent, f"halving.{seq:03d}", text[:5000]))

    def _parent(self, call) -> None:
        """A call on the parent MLflow run; a server that refuses is a warning (sweep.json has it all)."""
        try:
            record = self.state.read()["mlflow"]
        except (OSError, ValueError, KeyError) as e:
            log.warning("sweep: the parent MLflow run could not be updated (%s); sweep.json has the decision", e)
            return
        if record:
            _on_parent(record, call)

    # end -------------------------------------------------------------------------------------------------

    def ended(self, outcome: str, hours: float) -> None:
        """Rank 0, after the member's test and export: its final state, and what it did not use of its budget
        back to the members still alive (``record_end``: after ``reconcile``, so none goes to a dead one); the
        last member to end closes the parent MLflow run (sweep.json as its artifact)."""
        reconcile(self.state, probe=self._probe(), me=self.index)
        with self.state.update() as s:
            d = record_end(s, self.index, outcome, hours)
            seq = len(s["decisions"])
            last = all(x["status"] not in ALIVE for x in s["members"]) and not s.get("parent_closed")
            if last:
                s["parent_closed"] = True
            record = s.get("mlflow")
            crashed = any(x["status"] in ("crashed", "failed") for x in s["members"])
        if d is not None:
            text = describe(d)
            log.info("sweep %s: %s", self.record.get("sweep"), text)
            self.trainer.sinks.set_tags({"sweep_returned_hours": f"{d['freed']:.6g}"})
            if record:
                _on_parent(record, lambda c: c.set_tag(record["run_id"], f"halving.{seq:03d}", text[:5000]))
        if last and record:
            close_parent(self.state, record, "FAILED" if crashed else "FINISHED")


def close_parent(state: SweepState, record: dict[str, Any], status: str) -> None:
    """The parent MLflow run: summary tags, ``sweep.json`` as an artifact, terminated with ``status``."""
    try:
        from pipeline.tracking.sink import mlflow_client

        s = state.read()
        client = mlflow_client(record["tracking_uri"])
        stopped = [m["name"] for m in s["members"] if m["status"] == "stopped"]
        client.set_tag(record["run_id"], "stopped_members", ",".join(stopped)[:5000] or "-")
        crashed = [f"{m['name']} ({m.get('crashed', {}).get('job_state', '?')})" for m in s["members"]
                   if m["status"] in ("crashed", "failed")]
        client.set_tag(record["run_id"], "crashed_members", ",".join(crashed)[:5000] or "-")
        client.set_tag(record["run_id"], "gpu_hours_used", f"{sum(m['hours'] for m in s['members']):.6g}")
        client.set_tag(record["run_id"], "unallocated_hours", f"{s['unallocated']:.6g}")
        client.log_artifact(record["run_id"], str(state.path), "sweep")
        client.set_terminated(record["run_id"], status)
    except Exception as e:  # noqa: BLE001 -- tracking never fails a run
        from pipeline.secrets import redact_text

        log.warning("sweep: the parent MLflow run could not be closed (%s)", redact_text(str(e))[:300])


def attach_member(trainer) -> SweepMember | None:
    """The Trainer's hook: None outside a sweep; else the member, with rank 0's account made a ``SweepHours``
    (its budget follows the sweep state)."""
    record = read_member(trainer.run_dir)
    if record is None:
        return None
    member = SweepMember(record, trainer)
    if trainer.denv.is_main:
        trainer.account = SweepHours.adopt(trainer.account, member)
        member.refresh_budget()
    # every rank starts from rank 0's budget (a restarted member's budget may have grown): the plan fits to it
    member.follow_budget(member._agree([float(trainer.account.budget) if trainer.denv.is_main else 0.0])[0])
    return member


def summary(state: dict[str, Any], jobs: dict[int, str] | None = None) -> str:
    """The sweep's members (status, GPU-hours used of those granted, the base share, the job and, in ``jobs``,
    its state as the scheduler tells it) and every decision, for a person. A member still alive shows what its
    run directory's account last saved."""
    jobs = jobs or {}
    lines = [f"sweep {state['name']}: {len(state['members'])} member(s), {state['total_budget']:.6g} h in all"
             + (f", {state['unallocated']:.4g} h unallocated" if state.get("unallocated") else "")]
    for m in state["members"]:
        hours = member_hours(m) if m["status"] in ALIVE else m["hours"]
        job = f"job {m['job_id']}" if m.get("job_id") else "no job yet"
        told = jobs.get(m["index"]) or (m.get("crashed") or {}).get("job_state")
        lines.append(f"  [{m['index']}] {m['name']:48s} {m['status']:9s} {hours:.4g} of {m['budget']:.4g} h "
                     f"(base {m['base_budget']:.4g})  {job}{f' {told}' if told else ''}")
    lines += [f"  - {describe(d)}" for d in state.get("decisions", [])]
    return "\n".join(lines)
