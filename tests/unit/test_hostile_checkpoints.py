"""Hostile and broken checkpoints: no file runs code when loaded (model files, our engines' checkpoints,
DeepSpeed's own files, export), foreign config objects load as inert data, a safetensors metadata cannot
ask for a model bigger than its tensors, and checkpoint completeness survives crashes and stray entries.

Every hostile file is built here, at test time. A pickle payload creates a marker file when it runs; each
refusal test asserts a clear error naming the file and that the marker does not exist."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from pipeline.config import batch_plan, dump, load_recipe
from pipeline.models import convert
from pipeline.models.convert import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_safetensors,
    read_checkpoint,
    save_safetensors,
    to_official,
)
from pipeline.models.timesformer import TimeSformer, model_config, variant_config
from pipeline.train import checkpoint as ckpt
from pipeline.train.engine import TorchEngine, consolidated_state_dict

REPO = Path(__file__).resolve().parents[2]
TINY = dict(num_frames=2, img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def tiny_cfg(**overrides):
    return variant_config("timesformer_tiny", **{**TINY, **overrides})


class RunsCode:
    """Pickles as a call of ``exec``: unpickled the usual way (weights_only=False), it writes its marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "CODE_RAN"


def refused(excinfo, path: Path, marker: Path) -> str:
    """The refusal names the file and what it asked for, and the payload did not run."""
    message = str(excinfo.value)
    assert str(path) in message and "exec" in message and "refused" in message, message
    assert "weights_only=False" not in message  # no advice to load it unsafely
    assert not marker.exists(), "the pickle's code ran"
    return message


def test_the_payload_is_live(tmp_path, marker):
    """The payload used below does run when a file is unpickled the old way (so its absence means something)."""
    path = tmp_path / "x.pth"
    torch.save({"w": torch.zeros(1), "cfg": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


# ---------------------------------------------------------------------------------------------------
# Model files: read_checkpoint, load_checkpoint, model.init, jobs/export.py


@pytest.fixture
def hostile_pyth(tmp_path, marker) -> Path:
    """An original-format checkpoint whose real weights come with a payload in its config."""
    cfg = tiny_cfg()
    path = tmp_path / "checkpoint_epoch_00015.pyth"
    torch.save({**to_official(TimeSformer(cfg).state_dict(), cfg, epoch=15), "cfg": RunsCode(marker)}, path)
    return path


def test_reading_a_model_file_never_runs_its_pickle(hostile_pyth, marker):
    with pytest.raises(UnsafeCheckpointError) as e:
        read_checkpoint(hostile_pyth)
    refused(e, hostile_pyth, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(TimeSformer(tiny_cfg()), hostile_pyth)
    assert "re-save only its weights" in refused(e, hostile_pyth, marker)


def test_model_init_never_runs_the_pickle(hostile_pyth, marker):
    from pipeline.train.main import build_model

    cfg = load_recipe("smoke", ["data.index=unused"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=str(hostile_pyth)))
    with pytest.raises(UnsafeCheckpointError) as e:
        build_model(cfg)
    refused(e, hostile_pyth, marker)


class RunsShell:
    """Pickles as a call of ``os.system`` (torch blocks its module by name: another refusal path)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
@pytest.mark.parametrize("payload,asks_for", [(RunsCode, "exec"), (RunsShell, f"{os.name}.system")])
def test_every_kind_of_pickle_payload_is_refused_and_named(tmp_path, marker, writer, payload, asks_for):
    import pickle

    path = tmp_path / "weights.pth"
    if writer == "torch.save":
        torch.save({"w": torch.zeros(2), "extra": payload(marker)}, path)
    else:  # a plain pickle stream, no zip container (its tensors would need torch.storage._load_from_bytes,
        # itself refused: an unrestricted torch.load inside)
        path.write_bytes(pickle.dumps({"w": [0.0, 0.0], "extra": payload(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as e:
        read_checkpoint(path)
    assert f"asks for {asks_for}," in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()


def test_a_pickled_whole_model_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(TimeSformer(tiny_cfg()), path)  # the whole module object, not its state dict
    with pytest.raises(UnsafeCheckpointError, match=r"model\.pt: refused.*TimeSformer.*state_dict\(\)"):
        read_checkpoint(path)


def record_fsyncs(monkeypatch) -> list[str]:
    """From now on, the path of every file or directory fsynced, in order (each still fsynced)."""
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    return synced


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def torch_engine_run(tmp_path):
    """A run directory with one complete plain-engine checkpoint at step 0 (and its engine)."""
    cfg = load_recipe("smoke", [f"data.index={tmp_path / 'no-dataset'}", "train.engine=torch", "train.zero_stage=0"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump(cfg))
    torch.manual_seed(0)
    engine = TorchEngine(TimeSformer(model_config(cfg)), cfg, batch_plan(cfg, 1), per_epoch=1,
                         device=torch.device("cpu"))
    engine.save(ckpt.checkpoint_root(run), ckpt.tag_for(0), {"step": 0})
    ckpt.mark_complete(run, ckpt.tag_for(0), {"step": 0})
    return run, cfg, engine


def plant(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by the same contents plus a payload (what a swapped file would be)."""
    from pipeline.train.engine import load_deepspeed_file

    state = load_deepspeed_file(path)  # (a genuine file of ours or of DeepSpeed)
    state["extra"] = RunsCode(marker)
    torch.save(state, path)


def test_the_plain_engine_and_export_never_run_a_planted_pickle(torch_engine_run, marker, capsys):
    run, cfg, engine = torch_engine_run
    file = ckpt.checkpoint_root(run) / ckpt.tag_for(0) / "torch_engine.pt"
    assert engine.load(ckpt.checkpoint_root(run), ckpt.tag_for(0)) == {"step": 0}  # genuine: resumes
    assert consolidated_state_dict(ckpt.checkpoint_root(run), ckpt.tag_for(0)).keys() == \
        engine.module.state_dict().keys()
    plant(file, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        engine.load(ckpt.checkpoint_root(run), ckpt.tag_for(0))
    assert "not written by it, or was replaced" in refused(e, file, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        consolidated_state_dict(ckpt.checkpoint_root(run), ckpt.tag_for(0))
    refused(e, file, marker)

    assert load_job("export").main([str(run)]) == 2
    err = capsys.readouterr().err
    assert str(file) in err and "refused" in err and not marker.exists()
    assert not (run / "export" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------
# The original .pyth with a pickled config object (yacs/fvcore CfgNode)


def fake_fvcore(monkeypatch) -> type:
    """A class pickled under fvcore's name (a yacs-style CfgNode: a dict subclass with attributes), from
    modules that exist only while the file is written."""

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__()
            for k, v in (init or {}).items():
                self[k] = CfgNode(v) if isinstance(v, dict) else v
            self.__dict__["__immutable__"] = True
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__new_allowed__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "fvcore.common.config", "CfgNode"
    for name in ("fvcore", "fvcore.common", "fvcore.common.config"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["fvcore.common.config"].CfgNode = CfgNode
    return CfgNode


def test_an_original_pyth_with_a_pickled_cfgnode_loads_its_weights_and_runs_nothing(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    torch.manual_seed(1)
    model = TimeSformer(cfg).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, nesterov=True)
    model(torch.randn(1, 3, 2, 16, 16)).sum().backward()
    optimizer.step()  # a momentum buffer per parameter, as in a real .pyth
    CfgNode = fake_fvcore(monkeypatch)
    node = CfgNode({"MODEL": {"NUM_CLASSES": 3, "ARCH": "vit"}, "DATA": {"NUM_FRAMES": 2, "MEAN": [0.45] * 3},
                    "TRAIN": {"CHECKPOINT_PERIOD": 5, "ENABLE": True}})
    path = tmp_path / "TimeSformer_divST_tiny.pyth"
    torch.save({"epoch": 15, "model_state": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_state": optimizer.state_dict(), "cfg": node}, path)
    monkeypatch.undo()  # fvcore is gone: nothing of it can be imported or run at load time
    assert "fvcore" not in sys.modules and importlib.util.find_spec("fvcore") is None

    raw = read_checkpoint(path)
    assert raw["cfg"]["MODEL"]["NUM_CLASSES"] == 3 and raw["cfg"]["DATA"]["MEAN"] == [0.45] * 3
    assert type(raw["cfg"]) is type(raw["cfg"]["MODEL"]) and not isinstance(raw["cfg"], CfgNode)
    assert raw["optimizer_state"]["param_groups"][0]["nesterov"] is True
    loaded = load_checkpoint(TimeSformer(cfg), path).eval()
    x = torch.randn(2, 3, 2, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert "fvcore" not in sys.modules


def test_the_original_format_with_its_yaml_config_string_loads(tmp_path):
    """The original repository's save_checkpoint stores ``cfg.dump()``, a YAML string."""
    cfg = tiny_cfg()
    model = TimeSformer(cfg).eval()
    path = tmp_path / "checkpoint_epoch_00001.pyth"
    torch.save({"epoch": 1, "model_state": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_state": {}, "cfg": "MODEL:\n  NUM_CLASSES: 3\n"}, path)
    assert torch.equal(load_checkpoint(TimeSformer(cfg), path).head.weight, model.head.weight)


def test_a_payload_inside_a_cfgnode_is_still_refused(tmp_path, monkeypatch, marker):
    CfgNode = fake_fvcore(monkeypatch)
    path = tmp_path / "evil.pyth"
    torch.save({"model_state": TimeSformer(tiny_cfg()).state_dict(),
                "cfg": CfgNode({"MODEL": {"NUM_CLASSES": RunsCode(marker)}})}, path)
    monkeypatch.undo()
    with pytest.raises(UnsafeCheckpointError) as e:
        read_checkpoint(path)
    refused(e, path, marker)


# ---------------------------------------------------------------------------------------------------
# DeepSpeed's own checkpoints (one rank, gloo, on the CPU)


@pytest.fixture(scope="module", autouse=True)
def restore_linear():
    linear = torch.nn.functional.linear  # a ZeRO-3 engine replaces it process-wide (DeepSpeed: "will persist")
    yield
    torch.nn.functional.linear = linear  # so later tests in this process compute as before


def deepspeed_engine(stage: int, precision: str):
    from pipeline.train.engine import DeepSpeedEngine

    cfg = load_recipe("smoke", ["data.index=unused", "train.engine=deepspeed", f"train.zero_stage={stage}",
                                f"train.precision={precision}", "train.micro_batch=2", "train.global_batch=2",
                                "data.num_frames=2", "data.crop=16", "model.drop_path_rate=0.0"])
    torch.manual_seed(0)
    return DeepSpeedEngine(TimeSformer(model_config(cfg)), cfg, batch_plan(cfg, 1), per_epoch=100,
                           model_factory=lambda: TimeSformer(model_config(cfg)))


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 3, 2, 16, 16), dtype=torch.uint8, generator=g), torch.tensor([0, 2])


def weights(engine) -> dict[str, torch.Tensor]:
    with engine.eval_module() as (module, _):
        return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


DEEPSPEED_CASES = {  # ZeRO stage, precision -> the file a test replaces by one that carries a payload
    (0, "fp32"): "mp_rank_00_model_states.pt",
    (1, "bf16"): "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
    (2, "fp32"): "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    (3, "bf16"): "zero_pp_rank_0_mp_rank_00_model_states.pt",
}


@pytest.fixture(scope="module")
def deepspeed_checkpoint(deepspeed_rank, tmp_path_factory):
    """(stage, precision) -> a genuine checkpoint at step 2: its directory, what was fsynced while saving it,
    the weights, and the losses of the two steps after it. Made on first use, in the order the tests ask:
    a ZeRO-3 engine replaces torch.nn.functional.linear process-wide, which moves the bf16 losses of engines
    made after it by 1e-3, so each case's engines are all made before any ZeRO-3 one."""
    made = {}

    def get(stage: int, precision: str):
        if (stage, precision) not in made:
            engine = deepspeed_engine(stage, precision)
            for i in range(2):
                engine.train_micro_batch(*batch(i))
            root = tmp_path_factory.mktemp(f"zero{stage}-{precision}")
            with pytest.MonkeyPatch.context() as m:
                synced = record_fsyncs(m)
                engine.save(root, "step2", {"step": 2})
            saved = weights(engine)
            after = [float(engine.train_micro_batch(*batch(2 + i))) for i in range(2)]
            made[stage, precision] = root / "step2", synced, saved, after
        return made[stage, precision]

    return get


@pytest.mark.parametrize("stage,precision", list(DEEPSPEED_CASES))
def test_deepspeed_checkpoints_resume_and_consolidate_weights_only_and_refuse_a_planted_pickle(
        deepspeed_checkpoint, tmp_path, marker, stage, precision):
    genuine, synced, saved, after = deepspeed_checkpoint(stage, precision)
    files = sorted(genuine.iterdir())
    assert {str(f) for f in files} | {str(genuine)} <= set(synced)  # every file, and the directory, fsynced
    shutil.copytree(genuine, tmp_path / "step2")

    # genuine: resumes exactly and consolidates to the same weights, every file read weights-only
    resumed = deepspeed_engine(stage, precision)
    assert resumed.load(tmp_path, "step2")["step"] == 2 and resumed.global_step == 2
    for k, v in weights(resumed).items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    assert [float(resumed.train_micro_batch(*batch(2 + i))) for i in range(2)] == pytest.approx(after, rel=1e-6)
    full = consolidated_state_dict(tmp_path, "step2")
    assert full.keys() == saved.keys() and all(v.dtype == torch.float32 for v in full.values())
    torch.testing.assert_close(full["head.weight"], saved["head.weight"], rtol=0, atol=1e-2)  # fp32 master vs bf16

    # a file replaced by one that carries a payload: refused by resume and by consolidation, nothing runs
    planted = tmp_path / "step2" / DEEPSPEED_CASES[stage, precision]
    plant(planted, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        deepspeed_engine(stage, precision).load(tmp_path, "step2")
    refused(e, planted, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        consolidated_state_dict(tmp_path, "step2")
    refused(e, planted, marker)


def test_the_deepspeed_allow_list_is_exactly_what_its_checkpoints_need(deepspeed_checkpoint):
    """Every class DeepSpeed's checkpoints pickle is allowed, and nothing else is, save the fp16 loss scaler
    (fp16 runs on GPUs only); a DeepSpeed upgrade that stores something new fails here, not in a resume."""
    from pipeline.train.engine import deepspeed_checkpoint_globals

    seen = {name for case in DEEPSPEED_CASES for f in deepspeed_checkpoint(*case)[0].iterdir()
            for name in torch.serialization.get_unsafe_globals_in_checkpoint(f)}
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in deepspeed_checkpoint_globals()}
    assert seen == allowed - {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}  # noqa: SIM300


def test_an_fp16_zero_state_loads_with_its_dynamic_loss_scaler(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pipeline.train.engine import load_deepspeed_file

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, raise_error_at_min_scale=True, dtype=torch.float16)
    scaler.cur_scale = 2.0**12
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": scaler,
                                         "single_partition_of_fp32_groups": [torch.ones(4)]}}, path)
    state = load_deepspeed_file(path)["optimizer_state_dict"]
    assert state["zero_stage"] is ZeroStageEnum.gradients
    assert isinstance(state["loss_scaler"], DynamicLossScaler) and state["loss_scaler"].cur_scale == 2.0**12


# ---------------------------------------------------------------------------------------------------
# safetensors metadata that asks for a huge model


def forbid_construction(monkeypatch):
    def built(cfg):
        raise AssertionError(f"a model was built from the metadata: embed_dim {cfg.embed_dim}, depth {cfg.depth}")

    monkeypatch.setattr(convert, "TimeSformer", built)


def test_a_tiny_safetensors_cannot_ask_for_a_huge_model(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    huge = {**tiny_cfg().to_dict(), "embed_dim": 16384, "depth": 64, "num_heads": 16}  # ~5 GB of fp32
    path = tmp_path / "model.safetensors"
    save_file({"head.bias": torch.zeros(3)}, str(path),
              metadata={"format": "pt", "timesformer_config": json.dumps(huge)})
    assert path.stat().st_size < 1024
    forbid_construction(monkeypatch)  # the check must come first: building this model would take 5 GB
    with pytest.raises(CheckpointMismatchError) as e:
        load_safetensors(path)
    message = str(e.value)
    assert str(path) in message and "embed_dim 16384, depth 64" in message and "No model was built" in message
    assert "jobs/export.py" in message


def test_a_safetensors_whose_metadata_and_tensors_disagree_is_refused_before_construction(tmp_path, monkeypatch):
    real = save_safetensors(TimeSformer(tiny_cfg()), tmp_path / "real")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(real))
    for field, value, says in [("depth", 3, "the file has 2 blocks"), ("embed_dim", 64, "patch_embed.proj.weight"),
                               ("num_classes", 5, "head.weight")]:
        lying = {**tiny_cfg().to_dict(), field: value}
        path = tmp_path / f"{field}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt", "timesformer_config": json.dumps(lying)})
        with monkeypatch.context() as m:
            forbid_construction(m)
            with pytest.raises(CheckpointMismatchError, match=says):
                load_safetensors(path)
    assert load_safetensors(real).cfg == tiny_cfg()  # the genuine file still loads


def test_a_safetensors_header_that_claims_more_data_than_the_file_has_is_refused(tmp_path, monkeypatch):
    header = json.dumps({"__metadata__": {"timesformer_config": json.dumps(tiny_cfg().to_dict())},
                         "head.weight": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4 * 10**10]}})
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8)
    forbid_construction(monkeypatch)
    with pytest.raises(ValueError, match=f"{path}: cannot be read as a safetensors file"):
        load_safetensors(path)


def test_a_safetensors_config_that_is_not_json_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"timesformer_config": "{" * 100000})
    with pytest.raises(ValueError, match=f"{path}: the metadata's timesformer_config is not valid JSON"):
        load_safetensors(path)


# ---------------------------------------------------------------------------------------------------
# Durability: fsync, markers, foreign entries


def test_checkpoint_data_marker_and_directories_are_fsynced_in_order(torch_engine_run, monkeypatch):
    run, cfg, engine = torch_engine_run
    synced = record_fsyncs(monkeypatch)
    tag = ckpt.tag_for(1)
    directory = ckpt.checkpoint_root(run) / tag
    engine.save(ckpt.checkpoint_root(run), tag, {"step": 1})
    ckpt.mark_complete(run, tag, {"step": 1})
    data, tmp_marker = str(directory / "torch_engine.pt"), str(directory / "COMPLETE.tmp")
    assert data in synced and tmp_marker in synced
    assert synced.index(data) < synced.index(tmp_marker)  # the data is on disk before the marker is written
    after_marker = synced[synced.index(tmp_marker) + 1:]
    for d in (directory, ckpt.checkpoint_root(run), run):  # the rename, the tag's entry, checkpoints/ itself
        assert str(d) in after_marker, (d, synced)
    assert not Path(tmp_marker).exists() and ckpt.read_marker(run, tag)["step"] == 1


@pytest.mark.parametrize("content", ["", "   \n", '{"step": 2', "[2]", '{"step": "2"}', '{"step": 7}', "\udcff"])
def test_an_empty_or_invalid_marker_means_incomplete(tmp_path, caplog, content):
    root = ckpt.checkpoint_root(tmp_path)
    (root / ckpt.tag_for(1)).mkdir(parents=True)
    ckpt.mark_complete(tmp_path, ckpt.tag_for(1), {"step": 1})
    (root / ckpt.tag_for(2)).mkdir()
    (root / ckpt.tag_for(2) / "COMPLETE").write_bytes(content.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        assert ckpt.latest_complete(tmp_path) == (1, ckpt.tag_for(1))
    assert f"{root / ckpt.tag_for(2) / 'COMPLETE'}" in caplog.text and "incomplete" in caplog.text
    with pytest.raises(ckpt.CheckpointMarkerError, match=str(root / ckpt.tag_for(2) / "COMPLETE")):
        ckpt.read_marker(tmp_path, ckpt.tag_for(2))
    assert ckpt.prune(tmp_path, keep=1) == []  # newer than the newest complete one: left for the next save


def test_resume_and_export_skip_a_checkpoint_whose_marker_is_empty(torch_engine_run, capsys):
    from pipeline.train.main import resume

    run, cfg, engine = torch_engine_run
    engine.train_micro_batch(torch.randint(0, 256, (4, 3, 4, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    engine.save(ckpt.checkpoint_root(run), ckpt.tag_for(1), {"step": 1})
    (ckpt.checkpoint_root(run) / ckpt.tag_for(1) / "COMPLETE").write_text("")  # the node died mid-marker
    assert resume(engine, run, world_size=1) == 0  # from step 0, the newest complete one
    assert load_job("export").main([str(run)]) == 0
    assert "from step000000000" in capsys.readouterr().out


def test_foreign_entries_under_checkpoints_are_ignored_and_never_deleted(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    for step in (10, 20, 30):
        (root / ckpt.tag_for(step)).mkdir(parents=True)
        ckpt.mark_complete(tmp_path, ckpt.tag_for(step), {"step": step})
    (root / ckpt.tag_for(5)).mkdir()  # incomplete and old: pruned
    (root / "stepfoo").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "COMPLETE").write_text('{"step": 1}')
    (root / "step000000040").write_text("a file, not a checkpoint")
    (root / "zero_to_fp32.py").write_text("# DeepSpeed's helper")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (root / "step000000001").symlink_to(outside, target_is_directory=True)

    assert ckpt.complete_checkpoints(tmp_path) == [(10, "step000000010"), (20, "step000000020"), (30, "step000000030")]
    assert ckpt.latest_complete(tmp_path) == (30, "step000000030")
    for _ in range(2):  # prune runs at every save: it must not crash on any of these, ever
        ckpt.prune(tmp_path, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step000000001", "step000000030", "step000000040",
                                                      "stepfoo", "zero_to_fp32.py"]
    assert (outside / "precious").read_text() == "keep"
