"""Hostile and broken recipes, overrides, flags and launch requests: every one ends in a one-line error
that names the field (or flag), and a refused launch creates nothing (issue 13)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
import typing
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.config import (
    FLOAT_RANGES,
    INT_MINIMUMS,
    ConfigError,
    RunConfig,
    check_model,
    load_recipe,
    load_resolved,
)
from pipeline.train.launch import LaunchRequest, SubmissionError, launch, slurm_parameters
from tests.synthetic_data import write_dataset

REPO = Path(__file__).resolve().parents[2]


def schema_fields(tp: type) -> dict[str, type]:
    """``{"train.max_steps": int, ...}``: every leaf field of the config schema with its type."""
    out: dict[str, type] = {}
    for section, section_type in typing.get_type_hints(RunConfig).items():
        if dataclasses.is_dataclass(section_type):
            for f in dataclasses.fields(section_type):
                hint = typing.get_type_hints(section_type)[f.name]
                if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: an optional X
                    (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
                out[f"{section}.{f.name}"] = hint
    return {k: v for k, v in out.items() if v is tp}


def test_every_number_field_of_the_schema_has_a_declared_range():
    # a field added later without a range would accept -1 or NaN silently: this fails until it is declared
    assert set(schema_fields(int)) == set(INT_MINIMUMS)
    assert set(schema_fields(float)) == set(FLOAT_RANGES)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "nan", "inf", "1e999"])
def test_nan_and_infinite_numbers_are_refused_in_every_float_field(text):
    floats = list(schema_fields(float)) + ["optim.betas", "optim.lr_steps"]
    for key in floats:
        value = f"[0.9, {text}]" if key in ("optim.betas", "optim.lr_steps") else text
        with pytest.raises(ConfigError, match=rf"{key}(\[1\])?={'-' if text.startswith('-') else ''}(nan|inf).*"
                                              r"expected a finite number") as e:
            load_recipe("smoke", [f"{key}={value}"])
        assert "\n" not in str(e.value)


def test_nan_in_a_recipe_file_names_the_file_and_the_field(tmp_path):
    recipe = tmp_path / "nan.yaml"
    recipe.write_text("inherits: smoke\noptim: {lr: .nan}\n")
    with pytest.raises(ConfigError, match=r"nan\.yaml: optim\.lr=nan \(float\): expected a finite number"):
        load_recipe(str(recipe))
    recipe.write_text("inherits: smoke\nbudget: {gpu_hours: .inf}\n")
    with pytest.raises(ConfigError, match=r"nan\.yaml: budget\.gpu_hours=inf"):
        load_recipe(str(recipe))


def test_every_integer_field_refuses_a_value_below_its_minimum_and_takes_the_minimum():
    from pipeline.models.registry import FAMILIES

    cnn_only = FAMILIES["resnet3d"].field_names() - FAMILIES["timesformer"].field_names()
    for key, (low, _) in INT_MINIMUMS.items():
        recipe = "smoke_i3d" if key.split(".", 1)[1] in cnn_only else "smoke"  # a field of the recipe's model
        with pytest.raises(ConfigError, match=rf"{key}={low - 1}: expected") as e:
            load_recipe(recipe, [f"{key}={low - 1}"])
        assert "\n" not in str(e.value)
        load_recipe(recipe, [f"{key}={low}"])  # the documented floor itself is valid (0 = all, -1 = never, ...)
    assert load_recipe("smoke", ["train.val_every=-1"]).train.val_every == -1
    with pytest.raises(ConfigError, match=r"test\.max_videos=-1: expected an integer >= 0 \(0: every video\)"):
        load_recipe("smoke", ["test.max_videos=-1"])


@pytest.mark.parametrize("override, field", [
    ("model.drop_path_rate=1.0", "model.drop_path_rate"), ("model.drop_path_rate=-0.1", "model.drop_path_rate"),
    ("optim.momentum=1", "optim.momentum"), ("optim.momentum=-0.5", "optim.momentum"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay"), ("optim.lr_gamma=0", "optim.lr_gamma"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"), ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.betas=[0.9, 1.0]", "optim.betas"), ("optim.betas=[0.9]", "optim.betas"),
    ("optim.lr_steps=[-1, 2]", "optim.lr_steps"), ("optim.lr=0", "optim.lr"), ("train.epochs=-3", "train.epochs"),
    ("budget.gpu_hours=-1", "budget.gpu_hours"), ("data.ref_fps=0", "data.ref_fps"),
    ("data.scale=[0, 40]", "data.scale"), ("train.seed=-1", "train.seed"), ("data.train_split=''", "data.train_split"),
    ("cluster.partition='gpu\\n#SBATCH --wrap=x'", "cluster.partition"), ("cluster.qos='a b'", "cluster.qos"),
    ("cluster.env={'A B': x}", "cluster.env"), ("cluster.env={1A: x}", "cluster.env"),
    ("cluster.env={A: null}", "cluster.env"), ("cluster.env={A: [1]}", "cluster.env"),
    ("cluster.signal_delay_s=1200", "cluster.signal_delay_s"), ("name=../../x", "name"), ("name=a/b", "name"),
    ("model.depth=-1", "model.depth"), ("model.num_classes=0", "model.num_classes"),
])
def test_out_of_range_values_are_refused_with_the_field_named(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
        load_recipe("smoke", [override])
    assert "\n" not in str(e.value).replace("\\n", "")


def test_a_model_that_cannot_be_built_is_refused_before_launch():
    cfg = load_recipe("smoke", ["model.embed_dim=100", "model.num_heads=3"])  # each valid, together not
    with pytest.raises(ConfigError, match="the model cannot be built: .*embed_dim"):
        check_model(cfg)


@pytest.mark.parametrize("override", ["train.global_batch=[1,", "optim.lr={a: [}", "data.index='unclosed",
                                      "model.variant=" + "[" * 20000])
def test_yaml_errors_in_overrides_are_one_line_and_name_the_override(override):
    with pytest.raises(ConfigError, match="command line: .*not valid YAML") as e:
        load_recipe("smoke", [override])
    assert "\n" not in str(e.value) and len(str(e.value)) < 500 + len(override)


def test_broken_files_are_one_line_errors_naming_the_file(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("inherits: smoke\ntrain: {lr: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: this recipe is not valid YAML") as e:
        load_recipe(str(recipe))
    assert "\n" not in str(e.value)
    recipe.write_text("inherits: {smoke: 1}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: inherits=.*expected a recipe name"):
        load_recipe(str(recipe))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {variant: [\n")
    with pytest.raises(ConfigError, match=r"run/config\.yaml: this run config is not valid YAML") as e:
        load_resolved(run / "config.yaml")
    assert "\n" not in str(e.value)
    (run / "config.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=r"config\.yaml: cannot read this run config"):
        load_resolved(run / "config.yaml")
    (run / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: a run config is a mapping"):
        load_resolved(run / "config.yaml")
    with pytest.raises(ConfigError, match=r"nothere\.yaml: no such file"):
        load_resolved(tmp_path / "nothere.yaml")


# -- launch -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ds") / "colour"
    write_dataset(str(root), "colour", per_class={"train": 1, "val": 1})
    return str(root)


def request(tmp_path: Path, dataset: str, *overrides: str, **kw) -> LaunchRequest:
    kw.setdefault("local", True)
    kw.setdefault("name", "probe")
    return LaunchRequest(recipe="smoke", runs_dir=str(tmp_path / "runs"), overrides=[f"data.index={dataset}",
                                                                                      *overrides], **kw)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def fake_slurm(tmp_path: Path, sbatch_body: str) -> str:
    """A PATH whose sbatch runs ``sbatch_body`` (and an srun, which submitit looks for)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text("#!/bin/bash\n" + sbatch_body + "\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def bad_checkpoints(tmp_path: Path) -> dict[str, str]:
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (tmp_path / "payload.pth").write_bytes(pickle.dumps({"state": Payload()}))  # a plain pickle, not torch's format
    (tmp_path / "garbage.pth").write_bytes(os.urandom(4096))
    with zipfile.ZipFile(tmp_path / "notorch.pth", "w") as z:
        z.writestr("readme.txt", "a zip, not a checkpoint")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "truncated.safetensors").write_bytes(b"\xff\xff\xff\xff\xff\xff\x00\x00{")
    (tmp_path / "emptydir").mkdir()
    return {"missing": str(tmp_path / "nope.pth"), "payload": str(tmp_path / "payload.pth"),
            "garbage": str(tmp_path / "garbage.pth"), "notorch": str(tmp_path / "notorch.pth"),
            "empty": str(tmp_path / "empty.safetensors"), "truncated": str(tmp_path / "truncated.safetensors"),
            "dir": str(tmp_path / "emptydir"), "uri": "s3://bucket/model.pth"}


def test_launch_probes_end_in_one_line_errors_and_create_nothing(tmp_path, dataset, monkeypatch):
    (tmp_path / "runs").mkdir()
    probes = [
        (dict(nodes=0), "--nodes 0: expected a positive number"),
        (dict(nodes=-2), "--nodes -2: expected a positive number"),
        (dict(gpus_per_node=0), "--gpus-per-node 0"),
        (dict(gpus_per_node=-1), "--gpus-per-node -1"),
        (dict(time="0"), "--time '0': expected a time limit of at least a minute"),
        (dict(time="abc"), "--time 'abc'"),
        (dict(time="1:75:00"), "--time '1:75:00'"),
        (dict(partition="gpu\n#SBATCH --wrap=touch-x"), "cluster.partition"),
        (dict(name="../../x"), "--name='../../x': expected letters"),
        (dict(name="a/b"), "--name='a/b'"),
        (dict(name=".hidden"), "--name='.hidden'"),
        (dict(name="-rf"), "--name='-rf'"),
        (dict(name="tab\tname"), "--name"),
        (dict(name="x" * 200), "--name"),
        (dict(overrides_=["model.depth=-1"]), "model.depth=-1"),
        (dict(overrides_=["optim.lr=.nan"]), "optim.lr=nan"),
        (dict(overrides_=["model.num_classes=5"]), "model.num_classes=5 but dataset test-colour has 4 classes"),
        (dict(overrides_=["train.lr=[1,"]), "not valid YAML"),
    ]
    (tmp_path / "ckpt").mkdir()
    for path in bad_checkpoints(tmp_path / "ckpt").values():
        probes.append((dict(overrides_=[f"model.init={path}"]), f"model.init='{path}'"))
    before = tree(tmp_path / "runs")
    for kw, message in probes:
        extra = kw.pop("overrides_", [])
        with pytest.raises(ConfigError) as e:
            launch(request(tmp_path, dataset, *extra, **kw), out=lambda *_: None)
        assert message in str(e.value), (kw, extra, str(e.value))
        assert "\n" not in str(e.value), str(e.value)
        assert tree(tmp_path / "runs") == before, (kw, extra)  # no run directory, no MLflow store
    assert not (tmp_path / "ckpt" / "pickle-ran").exists()  # model.init was checked without unpickling it
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "x").exists()
    # without Slurm on PATH a Slurm launch is refused before anything is created
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ConfigError, match="Slurm is not available here .*sbatch"):
        launch(request(tmp_path, dataset, local=False), out=lambda *_: None)
    assert tree(tmp_path / "runs") == before


def test_a_readable_init_checkpoint_passes_the_launch_check(tmp_path, dataset):
    from pipeline.models.convert import save_safetensors
    from pipeline.models.timesformer import TimeSformer
    from pipeline.train.launch import check_init

    cfg = load_recipe("smoke", [f"data.index={dataset}"])
    model = TimeSformer(check_model(cfg))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    save_safetensors(model, tmp_path / "hf")
    for init in (tmp_path / "model.pth", tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        cfg.model.init = str(init)
        assert "checkpoint" in check_init(cfg) or "safetensors" in check_init(cfg)


def test_a_refused_submission_removes_its_run_directory_and_fails_its_mlflow_run(tmp_path, dataset, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sqlite store next to the run directories
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, 'echo "sbatch: error: invalid partition specified: nope" >&2\n'
                                                    "exit 1"))
    with pytest.raises(SubmissionError, match="invalid partition specified: nope.*removed") as e:
        launch(request(tmp_path, dataset, local=False, name="refused"), out=lambda *_: None)
    assert "marked FAILED" in str(e.value)
    runs = tmp_path / "runs"
    assert not (runs / "refused").exists()
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in found] == [("refused", "FAILED")]  # none left RUNNING
    assert "invalid partition" in found[0].data.tags["launch_error"]
    # the name can be used again once the cause is fixed
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, 'echo "Submitted batch job 77"'))
    info = launch(request(tmp_path, dataset, local=False, name="refused"), out=lambda *_: None)
    assert info["job_id"] == "77" and (runs / "refused" / "config.yaml").is_file()


def test_sbatch_exports_are_quoted_so_values_neither_break_nor_inject(tmp_path):
    marker = tmp_path / "pwned"
    values = {"SPACED": f"a b; touch {marker}", "SUBST": f"$(touch {marker})`touch {marker}`", "QUOTE": "it's \"x\"",
              "NEWLINE": f"one\ntouch {marker}", "EMPTY": ""}
    cfg = load_recipe("smoke", ["data.index=/x"])
    cfg.cluster.env = dict(values)
    setup = slurm_parameters(cfg, 1, tmp_path)["setup"]
    script = "\n".join(setup) + "\n" + "".join(f'printf "%s\\0" "${k}"\n' for k in values)
    out = subprocess.run(["bash", "-c", script], capture_output=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split("\0")[:-1] == list(values.values())  # each variable holds its exact string
    assert not marker.exists()  # and nothing ran


def test_the_dry_run_sbatch_script_carries_the_quoted_exports(tmp_path, dataset):
    lines: list[str] = []
    launch(request(tmp_path, dataset, "cluster.env={NCCL_X: 'a b; c'}", local=False, dry_run=True), out=lines.append)
    assert "export NCCL_X='a b; c'" in "\n".join(lines)
    assert not (tmp_path / "runs").exists()


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "launch.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env={**os.environ, **(env or {})})


def test_the_command_line_prints_one_line_without_a_traceback_and_exits_2(tmp_path, dataset):
    runs = tmp_path / "runs"
    for args in (["--nodes", "-2", "--name", "../../x"], ["train.global_batch=[1,"]):  # the rest: in-process above
        p = cli("--recipe", "smoke", "--local", "--runs-dir", str(runs), f"data.index={dataset}", *args, cwd=tmp_path)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1 and p.stderr.startswith("launch: "), p.stderr
    assert not runs.exists() and not (tmp_path.parent / "x").exists()


def test_a_submitted_run_records_its_argv_without_secrets(tmp_path, dataset, monkeypatch):
    # the launch record is written after submission: its argv is redacted too
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, 'echo "Submitted batch job 5"'))
    monkeypatch.setattr(sys, "argv", ["jobs/launch.py", "cluster.env={HF_TOKEN: hf_tok-XYZ}"])
    launch(request(tmp_path, dataset, "cluster.env={HF_TOKEN: hf_tok-XYZ}", local=False, name="argv"),
           out=lambda *_: None)
    record = json.loads((tmp_path / "runs" / "argv" / "launch.json").read_text())
    assert record["jobs"][0]["argv"] == ["jobs/launch.py", "cluster.env={HF_TOKEN: ***}"]
    assert record["jobs"][0]["secrets_by_environment"] == ["HF_TOKEN"]


def test_a_run_stays_on_the_dataset_version_it_started_on(tmp_path, monkeypatch):
    """data.version 0 (the newest) is resolved at launch and written into the run's config, so a version
    committed later changes neither a resume nor a requeue; a run directory from before this pin resumes on the
    version its ranks recorded at first start, and a rank refuses to train on another."""
    import dataclasses

    from pipeline.data.shards import commit_index
    from pipeline.data.storage import open_storage
    from pipeline.train.main import record_dataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, 'echo "Submitted batch job 5"'))
    root = tmp_path / "colour"
    v1 = write_dataset(str(root), "colour", per_class={"train": 1, "val": 1})
    lines: list[str] = []
    info = launch(request(tmp_path, str(root), local=False, name="pinned"), out=lines.append)
    run_dir = Path(info["run_dir"])
    assert load_resolved(run_dir / "config.yaml").data.version == 1
    assert any("pinned to it, data.version=1" in line for line in lines)
    v2 = dataclasses.replace(v1, version=2, shards=v1.shards[:-1])
    commit_index(open_storage(str(root)), v2)
    launch(LaunchRequest(resume=str(run_dir)), out=lines.append)
    assert load_resolved(run_dir / "config.yaml").data.version == 1  # still the version it started on
    # a run directory launched before the pin: config.yaml says 0, its ranks recorded v1 at first start
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("  version: 1\n", "  version: 0\n"))
    record_dataset(run_dir, v1, write=True)
    launch(LaunchRequest(resume=str(run_dir)), out=lines.append)
    assert load_resolved(run_dir / "config.yaml").data.version == 1
    with pytest.raises(ConfigError, match="started on test-colour v1, and this start reads v2"):
        record_dataset(run_dir, v2, write=False)
    # an index file names its version: an explicit data.version that differs is refused, not silently replaced
    with pytest.raises(ConfigError, match="is dataset version 1, and data.version=2"):
        launch(request(tmp_path, str(root / "indexes" / "v000001.json"), "data.version=2", name="clash",
                       local=False), out=lines.append)
