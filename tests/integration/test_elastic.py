"""Elastic resume for real: a 2-rank DeepSpeed ZeRO-2 run (gloo, CPU, fp32, the tiny model) stopped after its
checkpoint at step 8 continues on 1 rank to step 24, with the recipe's global batch (accumulation 2 -> 4), the
uninterrupted run's clips at every step (each rank plays both data streams) and its Adam state re-partitioned.

Tolerances, measured (docs/training.md "Resuming on another world size"): over steps 9-24 the losses of the 1-rank
continuation differ from the uninterrupted 2-rank run's by at most ~1e-6 (float summation order: 4 micro batches
summed on one rank vs 2 + 2 averaged by gloo), the final weights by at most ~1e-5; the same continuation with the
Adam moments reset differs by ~1e-2 in loss, so the checks below can tell a carried state from a lost one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from pipeline.train.engine import consolidated_state_dict, load_deepspeed_file
from pipeline.train.launch import LaunchRequest, launch
from tests.synthetic_data import write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# 24 steps of 8 clips (2 ranks x micro batch 2 x accumulation 2; on 1 rank accumulation 4), a checkpoint every 8
RECIPE = ["train.max_steps=24", "train.ckpt_every=8", "train.log_every=1", "train.val_every=-1",
          "train.micro_batch=2", "train.keep_checkpoints=0", "test.enabled=false", "train.zero_stage=2"]
LOSS_TOL = 2e-5  # measured max |diff| ~1e-6 (see the module docstring); a reset Adam state gives ~1e-2
# the final weights: |w - w_ref| / |w_ref - w_ref(step 8)| (L2 over every weight). Measured 4.5e-4: most tensors
# agree to ~1e-7, but a spatial attention's key bias (whose gradient is rounding noise: softmax ignores it) is moved by
# Adam at lr scale whatever the noise's sign, so it drifts by up to ~3e-4 in absolute terms
WEIGHT_TOL = 5e-3


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_after(run_dir: Path, step: int) -> dict[int, float]:
    """The losses logged from the last restart at ``step`` on (an attempt killed after a checkpoint logged some
    of these steps before; the resumed attempt logs them again)."""
    all_rows = rows(run_dir)
    restart = [i for i, r in enumerate(all_rows) if r["step"] == step + 1 and "loss" in r][-1]
    return {r["step"]: r["loss"] for r in all_rows[restart:] if "loss" in r}


def start(tmp_path: Path, name: str, index: str, nodes: int, wait: bool = True) -> dict:
    info = launch(LaunchRequest(recipe="smoke", nodes=nodes, local=True, name=name, runs_dir=str(tmp_path),
                                overrides=[f"data.index={index}", *RECIPE]), out=lambda *a: None)
    if wait:
        info["results"] = info["job"].results()
    return info


def kill_after_checkpoint(info: dict, step: int) -> Path:
    """Wait for checkpoint ``step`` to be complete, SIGKILL every rank (a node lost), and move newer checkpoints
    away (the resume point is then exactly ``step``, whatever the ranks reached before they died)."""
    run_dir = Path(info["run_dir"])
    marker = run_dir / "checkpoints" / f"step{step:09d}" / "COMPLETE"
    deadline = time.time() + 180
    while not marker.exists():
        assert time.time() < deadline, f"{run_dir} did not complete checkpoint {step}"
        time.sleep(0.02)
    for pid_file in sorted((run_dir / "pids").glob("rank*.json")):
        with contextlib.suppress(ProcessLookupError):  # a rank that already died
            os.kill(json.loads(pid_file.read_text())["pid"], signal.SIGKILL)
    with pytest.raises(Exception):  # noqa: B017 -- the job failed: its ranks died
        info["job"].results()
    for d in (run_dir / "checkpoints").iterdir():
        if d.name.startswith("step") and int(d.name[4:]) > step:
            shutil.rmtree(d)
    (run_dir / "result.json").unlink(missing_ok=True)
    return run_dir


def relative_weight_diff(run_dir: Path, final: dict, start: dict) -> float:
    mine = consolidated_state_dict(run_dir / "checkpoints", "step000000024")
    assert mine.keys() == final.keys()
    diff = sum(float((mine[k] - final[k]).detach().norm()) ** 2 for k in final) ** 0.5
    return diff / sum(float((final[k] - start[k]).detach().norm()) ** 2 for k in final) ** 0.5


def reset_adam(run_dir: Path, tag: str) -> None:
    """The counterfactual: the same checkpoint with the optimizer's moments and step count zeroed."""
    for f in (run_dir / "checkpoints" / tag).glob("zero_pp_rank_*_optim_states.pt"):
        state = load_deepspeed_file(f)
        for per_param in state["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
            for key, value in per_param.items():
                per_param[key] = torch.zeros_like(value)
        torch.save(state, f)


@pytest.fixture(scope="module")
def colour_index(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("colour")
    write_dataset(str(root), "colour")
    return str(root)


def test_a_two_rank_zero2_run_continues_on_one_rank_with_the_same_batch_data_and_optimizer_state(
        tmp_path, colour_index):
    reference = start(tmp_path, "reference", colour_index, nodes=2)
    assert reference["results"][0]["outcome"] == "done"
    ref_dir = Path(reference["run_dir"])
    ref = losses_after(ref_dir, 0)
    assert sorted(ref) == list(range(1, 25))

    run_dir = kill_after_checkpoint(start(tmp_path, "elastic", colour_index, nodes=2, wait=False), 8)
    counterfactual = tmp_path / "reset"
    shutil.copytree(run_dir, counterfactual, ignore=shutil.ignore_patterns("mlflow.json"))

    resumed = launch(LaunchRequest(resume=str(run_dir), nodes=1, local=True), out=lambda *a: None)
    assert "written by 2 rank(s) on 1" in resumed["batch"]
    result = resumed["job"].results()[0]
    assert result["outcome"] == "done" and result["resumed_from"] == 8 and result["step"] == 24

    # the global batch is the recipe's: 2 x 2 x 2 before, 2 x 4 x 1 after (DeepSpeed's config, the markers, metrics)
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (8, 4)
    marker = json.loads((run_dir / "checkpoints" / "step000000024" / "COMPLETE").read_text())
    assert (marker["world_size"], marker["global_batch"], marker["data_ranks"], marker["data_since"]) == (1, 8, 2, 0)
    before = json.loads((run_dir / "checkpoints" / "step000000008" / "COMPLETE").read_text())
    assert (before["world_size"], before["global_batch"]) == (2, 8)
    plan = [r for r in rows(run_dir) if "batch/global" in r][-1]
    assert plan == {**plan, "step": 8, "batch/global": 8, "batch/grad_accum": 4, "batch/world_size": 1}
    logs = "".join(p.read_text() for p in (run_dir / "submitit").rglob("*_0_log.out"))
    assert "global batch 8 = micro batch 2 x accumulation 4 x 1 rank(s)" in logs
    assert "re-partitioned from 2 to 1 rank(s)" in logs and "each rank plays 2 of the run's 2 data streams" in logs
    # GPU-hours (CPU processes here) keep counting across the attempts, each with its own device count
    account = json.loads((run_dir / "gpu_hours.json").read_text())
    assert [a["devices"] for a in account["attempts"]] == [2, 1]
    assert account["hours"] >= sum(a["seconds"] * a["devices"] for a in account["attempts"]) / 3600 * 0.99

    # the losses follow the uninterrupted run's, step for step, and the final weights agree
    got = losses_after(run_dir, 8)
    assert sorted(got) == list(range(9, 25))
    loss_diff = max(abs(got[s] - ref[s]) for s in got)
    print(f"elastic 2->1: max |loss diff| over steps 9-24 = {loss_diff:.3g}")
    assert loss_diff <= LOSS_TOL, {s: (got[s], ref[s]) for s in got}
    start_weights = consolidated_state_dict(ref_dir / "checkpoints", "step000000008")
    final = consolidated_state_dict(ref_dir / "checkpoints", "step000000024")
    weight_diff = relative_weight_diff(run_dir, final, start_weights)
    print(f"elastic 2->1: |weights - uninterrupted| / |uninterrupted's change since step 8| = {weight_diff:.3g}")
    assert weight_diff <= WEIGHT_TOL

    # a lost optimizer state would fail the same check: the counterfactual with Adam's moments zeroed
    reset_adam(counterfactual, "step000000008")
    launch(LaunchRequest(resume=str(counterfactual), nodes=1, local=True), out=lambda *a: None)["job"].results()
    lost = losses_after(counterfactual, 8)
    reset_diff = max(abs(lost[s] - ref[s]) for s in lost)
    print(f"elastic 2->1 with Adam reset: max |loss diff| = {reset_diff:.3g}")
    reset_weights = relative_weight_diff(counterfactual, final, start_weights)
    print(f"elastic 2->1 with Adam reset: relative weight diff = {reset_weights:.3g}")
    assert reset_diff > 20 * LOSS_TOL and reset_weights > 10 * WEIGHT_TOL
