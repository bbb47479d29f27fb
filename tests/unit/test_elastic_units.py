"""Elastic resume's arithmetic: data layouts and stream positions, and the merge and re-partition of ZeRO optimizer
state (pipeline.train.elastic), without processes."""

from __future__ import annotations

import pytest
import torch

from pipeline.train import elastic
from pipeline.train.elastic import DataLayout, ElasticResumeError

# -- data layout and position -------------------------------------------------------------------------------------


def test_a_fresh_run_has_one_stream_per_rank_and_an_old_marker_had_as_many_streams_as_ranks():
    assert elastic.data_layout(None, 4, 0) == (DataLayout(4, 0), True)
    assert elastic.data_layout({"step": 8, "world_size": 2}, 2, 8) == (DataLayout(2, 0), True)


def test_a_world_size_that_divides_the_streams_keeps_them_and_one_that_does_not_re_splits_at_the_resume_step():
    marker = {"step": 8, "world_size": 2, "data_ranks": 4, "data_since": 0}
    assert elastic.data_layout(marker, 1, 8) == (DataLayout(4, 0), True)  # each rank plays 4 streams
    assert elastic.data_layout(marker, 2, 8) == (DataLayout(4, 0), True)
    assert elastic.data_layout(marker, 3, 8) == (DataLayout(3, 8), False)
    assert elastic.data_layout({**marker, "data_ranks": 2}, 4, 13) == (DataLayout(4, 13), False)  # growing
    with pytest.raises(ElasticResumeError, match="data_ranks"):
        elastic.data_layout({**marker, "data_ranks": "2"}, 1, 8)


def test_streams_are_shared_out_in_order():
    assert elastic.owned_streams(DataLayout(4), 2, 0) == [0, 1]
    assert elastic.owned_streams(DataLayout(4), 2, 1) == [2, 3]
    assert elastic.owned_streams(DataLayout(2), 1, 0) == [0, 1]
    with pytest.raises(ValueError):
        elastic.owned_streams(DataLayout(2), 4, 0)


def consumed(layout: DataLayout, world: int, accum: int, every: int, total: int) -> list[list[tuple]]:
    """Per step, the (data rank, interval start, micro batch number) every rank draws, following stream_plan the
    way interval_stream does: one stream after another, ``per`` micro batches each, from the skip on."""
    steps: list[list[tuple]] = []
    step = 0
    while step < total:
        plans = [elastic.stream_plan(step, every, layout, world, r, accum, total) for r in range(world)]
        end = plans[0][3]
        cursors = [{d: skip for d, skip in streams} for streams, *_ in plans]
        while step < end:
            drawn = []
            for r, (streams, per, start, _) in enumerate(plans):
                for d, _ in streams:
                    for _ in range(per):
                        drawn.append((d, start, cursors[r][d]))
                        cursors[r][d] += 1
            steps.append(sorted(drawn))
            step += 1
    return steps


def resumed(first: tuple[DataLayout, int, int], then: tuple[int, int], at: int, every: int, total: int):
    """The steps of a run on ``first`` (layout, world, accum) interrupted at ``at`` and resumed on ``then``
    (world, accum) with the layout data_layout gives, for the data arithmetic alone."""
    layout, world, accum = first
    before = consumed(layout, world, accum, every, total)[:at]
    marker = {"step": at, "world_size": world, **layout.marker()}
    new_layout, exact = elastic.data_layout(marker, then[0], at)
    plans = []
    step = at
    while step < total:
        ps = [elastic.stream_plan(step, every, new_layout, then[0], r, then[1], total) for r in range(then[0])]
        end = ps[0][3]
        cursors = [{d: skip for d, skip in streams} for streams, *_ in ps]
        while step < end:
            drawn = []
            for r, (streams, per, start, _) in enumerate(ps):
                for d, _ in streams:
                    for _ in range(per):
                        drawn.append((d, start, cursors[r][d]))
                        cursors[r][d] += 1
            plans.append(sorted(drawn))
            step += 1
    return before + plans, exact


@pytest.mark.parametrize("at", [8, 13])  # at a periodic checkpoint, and mid-interval (a signal's checkpoint)
def test_shrinking_2_to_1_rank_draws_exactly_the_uninterrupted_runs_micro_batches(at):
    every, total = 10, 30
    uninterrupted = consumed(DataLayout(2), 2, 2, every, total)
    got, exact = resumed((DataLayout(2), 2, 2), (1, 4), at, every, total)
    assert exact and got == uninterrupted
    assert all(len(step) == 4 for step in got)  # 4 micro batches of 2 clips: the global batch of 8


@pytest.mark.parametrize("at", [10, 13])
def test_growing_re_splits_and_never_replays_a_micro_batch_drawn_before(at):
    every, total = 10, 30
    got, exact = resumed((DataLayout(1), 1, 4), (2, 2), at, every, total)
    assert not exact
    flat = [mb for step in got for mb in step]
    assert len(flat) == len(set(flat))  # no (stream, seed, micro batch) drawn twice: no clip repeated
    assert all(len(step) == 4 for step in got)  # the global batch continues: 4 micro batches per step
    # the re-split interval is seeded by the resume step (13: a seed no periodic interval uses), then periodic
    assert {start for _, start, _ in got[at]} == {at}
    assert {start for _, start, _ in got[20]} == {20}


def test_with_one_stream_per_rank_since_step_0_the_plan_is_the_loops_own_interval_stream():
    # loop._interval_stream: start = (step // every) * every, skip = (step - start) * accum, end = start + every
    for step in (0, 7, 10, 19, 25):
        streams, per, start, end = elastic.stream_plan(step, 10, DataLayout(2), 2, 1, 3, 28)
        assert (streams, per, start, end) == ([(1, (step - step // 10 * 10) * 3)], 3, step // 10 * 10,
                                              min(step // 10 * 10 + 10, 28))


# -- optimizer state ------------------------------------------------------------------------------------------------


def zero_states(full: dict[str, torch.Tensor], world: int, bf16: bool = False, align: int = 4) -> list[dict]:
    """What DeepSpeed's ZeRO-1/2 (or bf16) optimizer files hold for one flat group of ``full["fp32"]`` over
    ``world`` ranks: equal partitions, the last padded; ZeRO-1/2 save their fp32 partition with the padding cut."""
    n = full["fp32"].numel()
    padded = -(-n // (align * world)) * align * world
    size = padded // world
    out = []
    for r in range(world):
        keep = max(0, min(size, n - r * size))
        part = {k: elastic.partition_of(v, r, size) for k, v in full.items()}
        fp32 = part["fp32"] if bf16 else part["fp32"][:keep]
        out.append({elastic.FP32_GROUPS: [fp32], elastic.PADDINGS: [size - keep],
                    elastic.ALIGNMENT_PADDINGS: [[0, 0]],
                    elastic.BASE_STATE: {"state": {0: {"step": torch.tensor(7.0), "exp_avg": part["exp_avg"],
                                                       "exp_avg_sq": part["exp_avg_sq"]}},
                                         "param_groups": [{"lr": 0.5, "initial_lr": 1.0, "params": [0]}]}})
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("bf16", [False, True])
def test_partitions_merge_into_the_world_size_independent_flat_group(world, bf16):
    g = torch.Generator().manual_seed(0)
    full = {k: torch.randn(37, generator=g) for k in ("fp32", "exp_avg", "exp_avg_sq")}
    merged = elastic.merge_partitions(zero_states(full, world, bf16), bf16)
    assert len(merged) == 1
    torch.testing.assert_close(merged[0]["fp32"], full["fp32"], rtol=0, atol=0)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(merged[0]["state"][key], full[key], rtol=0, atol=0)
    assert float(merged[0]["state"]["step"]) == 7.0 and merged[0]["group"] == {"lr": 0.5, "initial_lr": 1.0}


@pytest.mark.parametrize("saved,new", [(2, 1), (1, 2), (4, 3), (3, 4)])
def test_re_partitioning_for_another_world_size_gives_what_that_world_size_would_have_saved(saved, new):
    g = torch.Generator().manual_seed(1)
    full = {k: torch.randn(53, generator=g) for k in ("fp32", "exp_avg", "exp_avg_sq")}
    merged = elastic.merge_partitions(zero_states(full, saved), False)[0]
    expected = zero_states(full, new)
    size = expected[0][elastic.BASE_STATE]["state"][0]["exp_avg"].numel()  # the partition length, padding included
    for r in range(new):
        part = elastic.partition_of(merged["state"]["exp_avg"], r, size)
        torch.testing.assert_close(part, expected[r][elastic.BASE_STATE]["state"][0]["exp_avg"], rtol=0, atol=0)
    joined = torch.cat([elastic.partition_of(merged["fp32"], r, size) for r in range(new)])
    torch.testing.assert_close(joined[:53], full["fp32"], rtol=0, atol=0)
    assert not joined[53:].any()  # the padding is zeros


def test_states_that_disagree_or_pad_inside_a_group_are_refused():
    full = {k: torch.arange(10.0) for k in ("fp32", "exp_avg", "exp_avg_sq")}
    states = zero_states(full, 2)
    states[1][elastic.BASE_STATE]["state"][0]["step"] = torch.tensor(6.0)
    with pytest.raises(ElasticResumeError, match="'step' of group 0 differs between ranks"):
        elastic.merge_partitions(states, False)
    states = zero_states(full, 2)
    states[0][elastic.ALIGNMENT_PADDINGS] = [[0, 3]]
    with pytest.raises(ElasticResumeError, match="parameter_alignment"):
        elastic.merge_partitions(states, False)


def test_a_checkpoint_with_a_missing_rank_file_or_of_zero3_is_named(tmp_path):
    for r in (0, 2):
        (tmp_path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ElasticResumeError, match=r"ranks \[0, 2\]: some rank's file is missing"):
        elastic.saved_ranks(tmp_path)
    (tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    (tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    assert elastic.saved_ranks(tmp_path) == (3, False, True)
    message = str(elastic.zero3_refusal(tmp_path, 3, 2))
    assert "ZeRO-3" in message and "N x G = 3" in message and "jobs/export.py" in message


# -- launch ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_launch_names_an_elastic_resume_and_refuses_zero3_on_another_world_size(tmp_path, stage):
    from pipeline.config import ConfigError, load_recipe
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.launch import resume_world_note

    cfg = load_recipe("smoke", ["data.index=unused", f"train.zero_stage={stage}", "train.micro_batch=2"])
    (ckpt.checkpoint_root(tmp_path) / "step000000008").mkdir(parents=True)
    ckpt.mark_complete(tmp_path, "step000000008", {"step": 8, "world_size": 2, "zero_stage": stage})
    assert resume_world_note(cfg, tmp_path, 2) == ""
    if stage == 3:
        with pytest.raises(ConfigError, match="ZeRO-3.*N x G = 2"):
            resume_world_note(cfg, tmp_path, 1)
    else:
        note = resume_world_note(cfg, tmp_path, 1)
        assert "written by 2 rank(s) on 1" in note and "accumulation 2 x 2 rank(s) before" in note
