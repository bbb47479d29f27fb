"""Second round of hostile probes on config, launch, evaluation, comparison and secrets (issue 13): each test
builds its hostile input here and fails on the code before its fix."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import time
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.config import ConfigError, batch_plan, check_model, dump, load_recipe
from pipeline.secrets import redact_text, write_private
from pipeline.train.launch import LaunchRequest, launch
from tests.synthetic_data import write_dataset

REPO = Path(__file__).resolve().parents[2]


def job(name: str) -> ModuleType:
    """``jobs/<name>.py`` as a module (its main() runs in this process, so its imports can be patched)."""
    spec = importlib.util.spec_from_file_location(f"probe_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ds") / "colour"
    write_dataset(str(root), "colour", per_class={"train": 1, "val": 1})
    return str(root)


# -- config ---------------------------------------------------------------------------------------------


def test_a_yaml_alias_bomb_in_a_valid_field_is_a_short_error(tmp_path):
    # 9^6 = 531,441 strings from 400 bytes of YAML; the message used to repeat all of them (at depth 9: a
    # MemoryError traceback after gigabytes)
    lines = ["description:", '  - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcde", "bcdef", strict=True):
        lines.append(f"  - &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: description=\[.*expected a string") as e:
        load_recipe(str(tmp_path / "bomb.yaml"))
    assert len(str(e.value)) < 1000 and "\n" not in str(e.value)
    assert time.monotonic() - started < 5
    (tmp_path / "inh.yaml").write_text("\n".join(lines).replace("description:", "inherits:") + "\n")
    with pytest.raises(ConfigError, match=r"inh\.yaml: inherits=\[.*expected a recipe name") as e:
        load_recipe(str(tmp_path / "inh.yaml"))  # inherits holding the same bomb: named, and short
    assert len(str(e.value)) < 1000


def test_a_key_given_twice_is_refused_instead_of_silently_dropping_the_first(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("inherits: smoke\noptim: {lr: 0.001}\ntrain: {seed: 1}\noptim: {lr: 0.5}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: .*the key 'optim' appears twice in one mapping \(first at "
                                          r"line 2\) at line 4") as e:
        load_recipe(str(recipe))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"command line: .*the key 'lr' appears twice"):
        load_recipe("smoke", ["optim={lr: 0.1, lr: 0.2}"])
    # YAML's own override (a merge key) is not a duplicate
    recipe.write_text("inherits: smoke\noptim: {<<: {lr: 0.2, momentum: 0.5}, lr: 0.3}\n")
    cfg = load_recipe(str(recipe))
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.3, 0.5)


@pytest.mark.timeout(20)  # before the fix: hours
def test_a_huge_global_batch_is_refused_at_once():
    cfg = load_recipe("smoke", ["train.global_batch=1000000000000"])  # 10^12: the hint used to try every divisor
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot be met on 3 rank\(s\).*world sizes that work with micro batch 4: "
                                          r"\[1, 2, 4, 5,"):
        batch_plan(cfg, 3)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("override, message", [
    ("data.num_frames=600", r"data\.num_frames=600: expected at most 512 frames per clip \(the decode limit "
                            r"max_clip_frames"),
    ("data.num_workers=100000", r"data\.num_workers=100000: expected at most 256 DataLoader workers"),
])
def test_values_that_would_only_fail_on_the_ranks_are_refused_in_the_recipe(override, message):
    # num_frames 600: every clip refused by the decoder, counted as bad data, the run stopped blaming the
    # shards; num_workers 100000: 100000 processes per rank
    with pytest.raises(ConfigError, match=message):
        load_recipe("smoke", [override])


def test_a_model_no_node_could_hold_is_refused_before_launch():
    cfg = load_recipe("smoke", ["model.embed_dim=10000000", "model.num_heads=1"])  # 3.4e15 parameters
    with pytest.raises(ConfigError, match=r"the model would have 3\.4e\+15 parameters \(embed_dim 10000000"):
        check_model(cfg)
    assert check_model(load_recipe("k400_long")).depth == 12  # the largest recipe passes


# -- launch --resume of a damaged run directory ------------------------------------------------------------


def test_resume_names_launch_json_when_its_node_count_is_damaged(tmp_path, dataset):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump(load_recipe("smoke", [f"data.index={dataset}", "name=r1"])))
    for nodes in (-3, 0, "many", 10**30, 2.5):
        (run / "launch.json").write_text(json.dumps({"jobs": [{"nodes": nodes}]}))
        with pytest.raises(ConfigError, match=r"--resume: .*launch\.json cannot be read .*give --nodes"):
            launch(LaunchRequest(resume=str(run), local=True, dry_run=True), out=lambda *_: None)
    (run / "launch.json").write_text(json.dumps({"jobs": [{"nodes": 1}]}))
    launch(LaunchRequest(resume=str(run), local=True, dry_run=True), out=lambda *_: None)
    (run / "result.json").write_text(json.dumps({"outcome": "done"}))  # the run finished
    with pytest.raises(ConfigError, match=r"this run finished \(result\.json\).*jobs/evaluate\.py"):
        launch(LaunchRequest(resume=str(run), local=True), out=lambda *_: None)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "launch.json", "result.json"]


# -- jobs/evaluate.py ----------------------------------------------------------------------------------------


@pytest.fixture
def eval_run(tmp_path, dataset, monkeypatch):
    """A run directory with a config and a (pretended) complete checkpoint, no export; the export and the
    test pass are recorded instead of run."""
    import pipeline.train.checkpoint as ckpt
    import pipeline.train.evaluate as evaluate_mod
    import pipeline.train.export as export_mod

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump(load_recipe("smoke", [f"data.index={dataset}", "name=run"])))
    calls: dict[str, list] = {"export": [], "pass": []}

    def export_model(run_dir, cfg, **kw):
        calls["export"].append(cfg)
        raise RuntimeError("Error(s) in loading state_dict for TimeSformer:\n\tsize mismatch for time_embed")

    def test_protocol(*args, **kw):
        calls["pass"].append(kw)
        raise AssertionError("the pass must not start")

    monkeypatch.setattr(ckpt, "latest_complete", lambda run_dir: (4, "step000000004"))
    monkeypatch.setattr(export_mod, "export_model", export_model)
    monkeypatch.setattr(evaluate_mod, "test_protocol", test_protocol)
    return run, calls


def test_evaluate_exports_a_run_with_its_own_config_and_a_mismatch_is_one_line(eval_run, dataset, capsys):
    run, calls = eval_run
    # --recipe chooses data and protocol; the run's model is the one of its config.yaml (here the demo's 8x8
    # patches and 8 frames would have been built and, where shapes agree, written as this run's export)
    rc = job("evaluate").main([str(run), "--recipe", "demo_order", f"data.index={dataset}", "model.num_classes=4"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert [c.recipe for c in calls["export"]] == ["smoke"]
    assert "its newest checkpoint does not fit the model of its config.yaml" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_evaluate_checks_every_input_before_making_an_export(eval_run, tmp_path, capsys):
    run, calls = eval_run
    rc = job("evaluate").main([str(run), f"data.index={tmp_path / 'no-such-dataset'}"])
    assert rc == 2
    assert calls["export"] == []  # the dataset was refused first: nothing written into the run directory
    assert not (run / "export").exists()


def test_evaluate_refuses_a_report_path_it_cannot_write_before_the_pass(tmp_path, dataset, capsys, monkeypatch):
    import pipeline.train.evaluate as evaluate_mod
    from pipeline.models.convert import save_safetensors
    from pipeline.models.timesformer import TimeSformer, model_config

    cfg = load_recipe("smoke", [f"data.index={dataset}"])
    model = save_safetensors(TimeSformer(model_config(cfg)), tmp_path / "model.safetensors",
                             classes=["red", "green", "blue", "yellow"])
    passes = []
    monkeypatch.setattr(evaluate_mod, "test_protocol", lambda *a, **k: passes.append(1) or {})
    (tmp_path / "afile").write_text("not a directory")
    for out in (tmp_path / "afile" / "report.json", tmp_path / "afile" / "deeper" / "report.json"):
        rc = job("evaluate").main([str(model), "--recipe", "smoke", f"data.index={dataset}", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"the report cannot be written to {out}" in err and "is a file" in err
        assert "Traceback" not in err
    assert passes == []  # refused before the pass: the pass used to run, then fail writing (a traceback)


# -- jobs/compare.py -----------------------------------------------------------------------------------------


def test_compare_never_prints_the_credentials_of_its_tracking_uri(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = "http://alice:hunter2@127.0.0.1:9/?token=tok-9f8e7d"  # nothing listens on port 9
    started = time.monotonic()
    rc = job("compare").main(["--experiment", "smoke", "--tracking-uri", uri, "--no-log"])
    out = capsys.readouterr()
    assert rc == 2
    assert "hunter2" not in out.err + out.out and "tok-9f8e7d" not in out.err + out.out
    assert out.err.startswith("compare: ") and "Traceback" not in out.err
    assert time.monotonic() - started < 60  # one refused connection, not minutes of retries


def test_compare_reading_a_missing_database_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded default (mlflow may have set it)
    runs = tmp_path / "no-runs-here"
    rc = job("compare").main(["--experiment", "smoke", "--runs-dir", str(runs), "--no-log"])
    assert rc == 2
    assert f"no MLflow database at {runs / 'mlflow.db'}" in capsys.readouterr().err
    assert not runs.exists()  # MLflow used to create the directory's database with its tables


def test_compare_with_an_unwritable_out_is_one_line(tmp_path, capsys, monkeypatch):
    import pipeline.tracking.compare as compare_mod
    from pipeline.tracking.compare import RunSummary

    runs = tmp_path / "runs"
    runs.mkdir()
    sqlite3.connect(runs / "mlflow.db").close()  # exists; fetch is replaced below
    summary = RunSummary("id1", "r1", "tiny", "divided", "4 x 8", "32", 0.1, "1e-05 x 6", 0.1, "gpu", 50.0,
                         100.0, 10.0, None, "FINISHED")
    monkeypatch.setattr(compare_mod, "fetch", lambda *a, **k: [summary])
    (tmp_path / "afile").write_text("x")
    rc = job("compare").main(["--experiment", "smoke", "--runs-dir", str(runs), "--no-log",
                              "--out", str(tmp_path / "afile" / "cmp")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("compare: cannot write the report to") and "Traceback" not in err


def test_the_comparison_note_fits_mlflows_tag_limit():
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    from pipeline.tracking.compare import RunSummary, _note, _tag, table_text

    many = [RunSummary(f"{i:032x}", f"k400_attn_space_only-2026112{i % 10}-1015{i:02d}", "timesformer_base",
                       "divided_space_time", "8 x 32", "224", 121.4, "0.59 x 3", 1234.5, "gpu", 77.7, 93.4, 55.5,
                       None, "FINISHED") for i in range(80)]
    table = table_text(many)
    assert len(table) > MAX_TAG_VAL_LENGTH  # the note used to be the whole table: MLflow refused the run
    assert len(_note(table)) <= MAX_TAG_VAL_LENGTH and _note(table).endswith("\n```")
    assert len(_tag(",".join(s.run_id for s in many * 3))) <= MAX_TAG_VAL_LENGTH


# -- secrets ---------------------------------------------------------------------------------------------------


def test_write_private_does_not_follow_a_planted_temporary_file(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # someone who can write the (shared /tmp) state directory plants the old fixed temporary name as a link
    (state / ".env.json.tmp").symlink_to(victim)
    write_private(state / "env.json", '{"AWS_SECRET_ACCESS_KEY": "k"}')
    assert victim.read_text() == "precious"  # the secret used to be written through the link
    assert (state / "env.json").read_text() == '{"AWS_SECRET_ACCESS_KEY": "k"}'
    assert (state / "env.json").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in state.iterdir()) == [".env.json.tmp", "env.json"]  # no temporary left


@pytest.mark.parametrize("text, secret", [
    ('curl -H "Authorization: Bearer eyJhbGciOi.eyJzdWIi.c2ln" https://x', "eyJhbGciOi"),
    ("curl -H 'Authorization: Basic dXNlcjpwYXNz' https://x", "dXNlcjpwYXNz"),
    ("export DB_PASS=hunter2", "hunter2"),
    ("export PASS=hunter2", "hunter2"),
])
def test_http_credentials_and_pass_variables_are_redacted(text, secret):
    assert secret not in redact_text(text)
    assert "***" in redact_text(text)


def test_prose_that_looks_like_a_scheme_is_kept():
    for text in ("Basic authentication is off", "BYPASS=1", "PASSTHROUGH=yes", "compass: north"):
        assert redact_text(text) == text


def test_a_setup_line_with_a_bearer_token_is_refused_at_launch(tmp_path, dataset):
    req = LaunchRequest(recipe="smoke", runs_dir=str(tmp_path / "runs"), local=True, name="p",
                        overrides=[f"data.index={dataset}",
                                   'cluster.setup=["curl -H \\"Authorization: Bearer ghp_0123456789abcdef\\" x"]'])
    with pytest.raises(ConfigError, match=r"cluster\.setup hold\(s\) a credential") as e:
        launch(req, out=lambda *_: None)
    assert "ghp_0123456789abcdef" not in str(e.value)
    assert not (tmp_path / "runs").exists()



def test_a_run_made_before_the_name_rule_still_loads_but_new_runs_follow_it(tmp_path, dataset):
    """Run directories named before the rule (``k400 lr=1e-4``) must still resume, evaluate and export; only
    names that leave the runs directory are refused there. New runs get the full rule, from any source."""
    from pipeline.config import from_dict

    cfg = load_recipe("smoke", [f"data.index={dataset}"])
    old = cfg.to_dict() | {"name": "k400 lr=1e-4"}
    assert from_dict(old, where="runs/k400 lr=1e-4/config.yaml").name == "k400 lr=1e-4"
    for escaping in ("../x", "a/b", ".."):
        with pytest.raises(ConfigError, match="name="):
            from_dict(cfg.to_dict() | {"name": escaping}, where="config.yaml")
    runs = tmp_path / "runs"
    for request in (LaunchRequest(recipe="smoke", local=True, runs_dir=str(runs),
                                  overrides=[f"data.index={dataset}", "name=k400 lr=1e-4"]),
                    LaunchRequest(recipe="smoke", local=True, runs_dir=str(runs), name="a b",
                                  overrides=[f"data.index={dataset}"]),
                    LaunchRequest(recipe="smoke", local=True, runs_dir=str(runs),
                                  overrides=[f"data.index={dataset}", "name=.hidden"])):
        with pytest.raises(ConfigError, match="expected letters, digits"):
            launch(request, out=lambda *a: None)
    assert not runs.exists() or not any(runs.iterdir())
