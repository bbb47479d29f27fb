"""Initial weights from the Hugging Face Hub (``hf-hub:<org>/<name>``), resolved by the real code against a hub
cache laid out on disk as huggingface_hub lays it out (tests/hub_cache.py), offline: resolution, loading (a
timm ViT inflated, a Hugging Face TimeSformer from model.safetensors and from pytorch_model.bin), the
normalisation the source records, launch's check (accepting, refusing with the fix, resolving before anything
is created), ``create_model(pretrained=True)``, and a pytorch_model.bin that carries code."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_recipe
from pipeline.models import registry as registry_module
from pipeline.models.convert import (
    UnsafeCheckpointError,
    checkpoint_normalization,
    from_hf,
    inflate_vit,
    load_checkpoint,
    read_checkpoint,
)
from pipeline.models.factory import create_model
from pipeline.models.hub import SourceError, resolve_source
from pipeline.models.registry import Variant
from pipeline.models.timesformer import TimeSformer
from pipeline.train.launch import LaunchRequest, check_init, launch
from tests.hub_cache import (
    HALF,
    TINY,
    hf_timesformer,
    put_hf_timesformer,
    put_repo,
    put_timm_vit,
    tiny_cfg,
    tiny_vit_state,
    torch_bytes,
)
from tests.synthetic_data import write_dataset

VIT = "acme/vit_tiny_patch8_16.in21k_ft_in1k"
TSF = "acme/timesformer-tiny-finetuned-k3"
TSF_BIN = "acme/timesformer-tiny-finetuned-k3-bin"
ORIGINAL = ((0.45,) * 3, (0.225,) * 3)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding a tiny timm ViT and a tiny HF TimeSformer (safetensors and .bin copies)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    put_timm_vit(cache, VIT, tmp_path)
    model = hf_timesformer()
    put_hf_timesformer(cache, TSF, tmp_path, model)
    put_hf_timesformer(cache, TSF_BIN, tmp_path, model, weights="pytorch_model.bin")
    return cache


def hf_weights() -> dict[str, torch.Tensor]:
    return from_hf(hf_timesformer().state_dict())


def assert_state_equal(model: TimeSformer, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    got = model.state_dict()
    keys = [k for k in expected if not k.startswith(skip)]
    assert keys and all(torch.equal(got[k], expected[k]) for k in keys), [
        k for k in keys if not torch.equal(got[k], expected[k])]


# ---------------------------------------------------------------------------------------------------
# resolution


def test_a_hub_reference_resolves_to_its_cached_snapshot_offline(hub):
    snap = resolve_source(f"hf-hub:{VIT}")
    assert snap.parent.parent == hub / "models--acme--vit_tiny_patch8_16.in21k_ft_in1k"
    assert (snap / "model.safetensors").is_symlink() and (snap / "config.json").is_file()
    commit = snap.name
    assert resolve_source(f"hf-hub:{VIT}@{commit}") == snap  # a pinned commit
    assert resolve_source(f"hf-hub:{VIT}@main") == snap
    assert resolve_source(str(snap / "model.safetensors")) == snap / "model.safetensors"  # a path: as is


def test_offline_and_not_cached_says_which_command_to_run_and_where_the_cache_goes(hub):
    with pytest.raises(SourceError) as e:
        resolve_source("hf-hub:acme/never-downloaded@v2")
    message = str(e.value)
    assert "HF_HUB_OFFLINE=1" in message and "HF_HUB_OFFLINE=0" in message
    assert f"hf download acme/never-downloaded config.json model.safetensors --revision v2 --cache-dir {hub}" in message
    assert str(hub / "models--acme--never-downloaded") in message


def test_bad_references_and_missing_paths_are_named(hub, tmp_path):
    for bad in ("hf-hub:no-slash", "hf-hub:a/b/c", "hf-hub:../etc", "hf-hub:a/b@"):
        with pytest.raises(SourceError, match="expected hf-hub:<org>/<name>"):
            resolve_source(bad)
    with pytest.raises(SourceError, match="no such file or directory"):
        resolve_source(str(tmp_path / "missing.pth"))
    with pytest.raises(SourceError, match="unsupported scheme"):
        resolve_source("gs://bucket/model.pth")


def test_a_repository_without_a_weights_file_is_refused_with_what_it_holds(hub, tmp_path):
    put_repo(hub, "acme/config-only", {"config.json": b"{}", "README.md": b"# card"})
    with pytest.raises(SourceError, match=r"no weights file \(model.safetensors or pytorch_model.bin\).*README.md"):
        resolve_source("hf-hub:acme/config-only")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_says_so_and_gives_the_download_command(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(SourceError) as e:
        resolve_source("hf-hub:acme/never-downloaded")
    assert "cannot be reached" in str(e.value) and "hf download acme/never-downloaded" in str(e.value)
    assert "Connection refused" in str(e.value) and "offline" not in str(e.value).lower()
    assert resolve_source(f"hf-hub:{VIT}").is_dir()  # what is cached still resolves with the Hub unreachable


class _NoSuchRepo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 -- http.server's name; the Hub's answer for a repository that does not exist
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    def do_HEAD(self):  # noqa: N802 -- http.server's name
        self.do_GET()

    def log_message(self, *args):
        pass


def test_an_unknown_repository_online_is_named(hub, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(SourceError, match="no repository acme/no-such-model on http://127.0.0.1.*check the name"):
            resolve_source("hf-hub:acme/no-such-model")
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------------
# loading and normalisation


def test_a_timm_vit_from_the_hub_is_inflated_and_records_its_normalisation(hub):
    snap = resolve_source(f"hf-hub:{VIT}")
    assert checkpoint_normalization(snap) == (tuple(HALF), tuple(HALF))  # config.json's pretrained_cfg
    model = load_checkpoint(TimeSformer(tiny_cfg(mean=HALF, std=HALF)), snap)
    expected = inflate_vit(tiny_vit_state(), TimeSformer(tiny_cfg()))
    assert_state_equal(model, expected, skip=("head.",))  # a 7-class ImageNet head is not the video model's 3
    vit = tiny_vit_state()
    assert torch.equal(model.blocks[0].temporal_attn.qkv.weight, vit["blocks.0.attn.qkv.weight"])
    again = load_checkpoint(TimeSformer(tiny_cfg()), f"hf-hub:{VIT}")  # the reference itself, as timm takes it
    assert_state_equal(again, expected, skip=("head.",))


def test_top_level_mean_and_std_in_a_model_config_are_read(tmp_path):
    (tmp_path / "config.json").write_text('{"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}')
    assert checkpoint_normalization(tmp_path) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


@pytest.mark.parametrize("repo", [TSF, TSF_BIN])
def test_a_hugging_face_timesformer_loads_from_safetensors_and_from_pytorch_model_bin(hub, repo):
    snap = resolve_source(f"hf-hub:{repo}")
    weights = "model.safetensors" if repo == TSF else "pytorch_model.bin"
    assert sorted(p.name for p in snap.iterdir()) == sorted(["config.json", "preprocessor_config.json", weights])
    assert set(read_checkpoint(snap)) == set(hf_timesformer().state_dict())
    assert checkpoint_normalization(snap) == ORIGINAL  # preprocessor_config.json
    assert_state_equal(load_checkpoint(TimeSformer(tiny_cfg()), snap), hf_weights())


def test_a_pytorch_model_bin_that_carries_code_is_refused_and_nothing_runs(hub, tmp_path):
    from tests.unit.test_hostile_checkpoints import RunsCode

    marker = tmp_path / "CODE_RAN"
    state = {k: v.detach().clone() for k, v in hf_timesformer().state_dict().items()}
    put_repo(hub, "acme/hostile", {"config.json": b"{}", "pytorch_model.bin": torch_bytes(
        {**state, "timesformer.payload": RunsCode(marker)}, tmp_path)})
    snap = resolve_source("hf-hub:acme/hostile")  # fetching a file runs nothing
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model.bin: refused to load.*exec"):
        load_checkpoint(TimeSformer(tiny_cfg()), snap)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        create_model("timesformer_tiny", pretrained="hf-hub:acme/hostile", **TINY)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# create_model(pretrained=True)


@pytest.fixture
def tiny_variants(monkeypatch):
    """Two variants of the tiny model whose default weights are the cache's repositories (removed after)."""
    shape = {k: v for k, v in TINY.items() if k != "num_classes"}
    monkeypatch.setitem(registry_module.MODELS, "tiny_from_k3",
                        Variant("tiny, from the tiny HF TimeSformer", shape, pretrained=f"hf-hub:{TSF_BIN}"))
    monkeypatch.setitem(registry_module.MODELS, "tiny_from_vit",
                        Variant("tiny, from the tiny ViT", shape, pretrained=f"hf-hub:{VIT}"))


def test_create_model_pretrained_takes_the_variants_source_its_classes_and_normalisation(hub, tiny_variants):
    model = create_model("tiny_from_k3", pretrained=True)
    assert model.cfg.num_classes == 3 and (model.cfg.mean, model.cfg.std) == ORIGINAL
    assert_state_equal(model, hf_weights())
    fresh_head = create_model("tiny_from_k3", pretrained=True, num_classes=5)  # fine-tuning on other classes
    assert fresh_head.head.weight.shape == (5, 32)
    assert_state_equal(fresh_head, hf_weights(), skip=("head.",))
    with pytest.raises(ValueError, match=r"trained on inputs normalised with mean \[0.45.*leave them out"):
        create_model("tiny_from_k3", pretrained=True, mean=HALF)
    vit = create_model("tiny_from_vit", pretrained=True, num_classes=3)
    assert (vit.cfg.mean, vit.cfg.std) == (tuple(HALF), tuple(HALF))
    assert_state_equal(vit, inflate_vit(tiny_vit_state(), TimeSformer(tiny_cfg())), skip=("head.",))
    assert create_model("tiny_from_vit").cfg.mean == ORIGINAL[0]  # pretrained=False: the variant, untouched


def test_the_registered_variants_name_their_default_weights():
    from pipeline.models.registry import IMAGENET_VIT, VARIANTS

    assert VARIANTS["timesformer_base"].pretrained == "hf-hub:facebook/timesformer-base-finetuned-k400"
    assert VARIANTS["timesformer_hr"].pretrained == "hf-hub:facebook/timesformer-hr-finetuned-k400"
    assert VARIANTS["timesformer_l"].pretrained == IMAGENET_VIT == "hf-hub:timm/vit_base_patch16_224.orig_in21k_ft_in1k"
    with pytest.raises(ValueError, match="has no default weights"):
        create_model("timesformer_tiny", pretrained=True)


# ---------------------------------------------------------------------------------------------------
# launch


def tiny_recipe(*overrides: str):
    return load_recipe("smoke", ["data.num_frames=2", "data.crop=16", "model.patch_size=8", "model.embed_dim=32",
                                 "model.num_heads=2", "model.num_classes=3", *overrides])


def test_launch_resolves_a_hub_source_once_and_hands_the_ranks_its_path(hub):
    cfg = tiny_recipe(f"model.init=hf-hub:{VIT}", "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]")
    line = check_init(cfg)
    snap = resolve_source(f"hf-hub:{VIT}")
    # the source is pinned to the snapshot (commit) it resolved to: a later re-resolution gets the same weights
    assert cfg.model.init == str(snap.resolve()) and cfg.model.init_source == f"hf-hub:{VIT}@{snap.name}"
    assert line.startswith(f"hf-hub:{VIT}@{snap.name} -> {snap.resolve()}/model.safetensors (safetensors")
    assert "normalised with mean [0.5, 0.5, 0.5]" in line
    assert check_init(cfg).startswith(str(snap.resolve()))  # checked again (--resume): a path now, kept as is
    cfg = tiny_recipe(f"model.init=hf-hub:{TSF_BIN}")  # the original's 0.45/0.225, the recipe's too
    assert "pytorch_model.bin (torch checkpoint" in check_init(cfg)


def test_launch_refuses_a_hub_vit_on_other_normalisation_with_the_fix(hub):
    cfg = tiny_recipe(f"model.init=hf-hub:{VIT}")  # 0.45/0.225, and the ViT learnt on 0.5/0.5
    with pytest.raises(ConfigError, match=rf"model.init='hf-hub:{VIT}@[0-9a-f]{{40}} \(.*\)' was trained on inputs "
                                          r"normalised with mean \[0.5, 0.5, 0.5\].*set model.mean=\[0.5,0.5,0.5\] "
                                          r"model.std=\[0.5,0.5,0.5\]"):
        check_init(cfg)


def test_a_missing_source_fails_launch_before_the_run_directory_exists(hub, tmp_path):
    dataset = tmp_path / "ds"
    write_dataset(str(dataset), "colour", per_class={"train": 1, "val": 1})
    runs = tmp_path / "runs"
    req = LaunchRequest(recipe="smoke", local=True, runs_dir=str(runs), name="hub-missing",
                        overrides=[f"data.index={dataset}", "model.init=hf-hub:acme/never-downloaded"])
    with pytest.raises(ConfigError, match=r"model.init='hf-hub:acme/never-downloaded' cannot be resolved.*"
                                          r"hf download acme/never-downloaded"):
        launch(req, out=lambda *_: None)
    assert not (runs / "hub-missing").exists()
    printed: list[str] = []
    launch(LaunchRequest(recipe="smoke", dry_run=True, local=True, runs_dir=str(runs), overrides=req.overrides),
           out=printed.append)  # a dry run reports it, as it reports an unreadable dataset, and goes on
    assert "init        NOT READABLE from here (model.init='hf-hub:acme/never-downloaded' cannot be resolved" in \
        "\n".join(printed)
    assert not runs.exists() or not any(runs.iterdir())


def test_the_pinned_source_gets_the_same_weights_after_the_repository_moved_on(hub, tmp_path):
    cfg = tiny_recipe(f"model.init=hf-hub:{VIT}", "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]")
    check_init(cfg)
    first = Path(cfg.model.init)
    moved = put_timm_vit(hub, VIT, tmp_path, state=tiny_vit_state(1))  # a new commit on main
    assert resolve_source(f"hf-hub:{VIT}") == moved != first
    cfg.model.init = str(tmp_path / "cleaned-away")  # the recorded path is gone: fetched again from the source
    assert check_init(cfg).startswith(f"hf-hub:{VIT}@{first.name} -> {first}")
    assert Path(cfg.model.init) == first.resolve()  # the snapshot the run started from, not main's new one


def test_an_empty_init_with_an_init_source_is_refused(hub):
    cfg = tiny_recipe("model.init_source=hf-hub:org/claimed")
    with pytest.raises(ConfigError, match=r"model.init_source='hf-hub:org/claimed' with an empty model.init"):
        check_init(cfg)
    assert check_init(tiny_recipe()) == "random initialisation"


def test_credentials_in_hf_endpoint_never_reach_an_error(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://user:s3cr3t-pw@127.0.0.1:9")
    with pytest.raises(SourceError) as e:
        resolve_source("hf-hub:acme/never-downloaded")
    assert "s3cr3t-pw" not in str(e.value) and "http://user:***@127.0.0.1:9" in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_init(tiny_recipe("model.init=hf-hub:acme/never-downloaded"))
    assert "s3cr3t-pw" not in str(e.value) and "cannot be resolved" in str(e.value)


def test_a_resumed_run_with_a_checkpoint_neither_resolves_nor_loads_model_init(hub, tmp_path):
    """On --resume (and a requeue) the checkpoint replaces every weight: a cleaned cache and an offline hub do not
    stop the run; without a checkpoint yet, the error says the init is still needed."""
    import shutil
    from types import SimpleNamespace

    from pipeline.config import batch_plan, dump
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.engine import TorchEngine
    from pipeline.train.main import Trainer, build_model

    dataset = tmp_path / "ds"
    write_dataset(str(dataset), "colour", per_class={"train": 1, "val": 1})
    cfg = tiny_recipe(f"model.init=hf-hub:{VIT}", "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]",
                      "train.engine=torch", "train.zero_stage=0", "train.activation_checkpointing=none",
                      f"data.index={dataset}", "name=r1")
    check_init(cfg)  # launch: resolved into the hub cache
    run, fresh = tmp_path / "runs" / "r1", tmp_path / "runs" / "r2"
    for d in (run, fresh):
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(dump(cfg))
        (d / "launch.json").write_text(json.dumps({"jobs": [{"nodes": 1}]}))
    model = build_model(cfg)
    engine = TorchEngine(model, cfg, batch_plan(cfg, 1), per_epoch=1, device=torch.device("cpu"))
    for _ in range(2):  # a global batch of 8 in micro-batches of 4: one step
        engine.train_micro_batch(torch.randn(4, 3, 2, 16, 16), torch.tensor([0, 1, 2, 0]))
    assert engine.global_step == 1
    engine.save(ckpt.checkpoint_root(run), ckpt.tag_for(1), {"step": 1})
    ckpt.mark_complete(run, ckpt.tag_for(1), {"step": 1})
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    shutil.rmtree(hub)  # the cache was cleaned, and the hub is offline

    printed: list[str] = []
    launch(LaunchRequest(resume=str(run), local=True, dry_run=True), out=printed.append)
    assert f"init        not loaded: the run resumes from its checkpoint {ckpt.tag_for(1)}" in "\n".join(printed)
    with pytest.raises(ConfigError, match=r"--resume: the run has no complete checkpoint yet, so it starts again "
                                          r"from model.init and needs these weights"):
        check_init(cfg, fresh)

    def ranks_build(run_dir: Path) -> Trainer:  # what every rank of the resumed job does to get its model
        trainer = Trainer.__new__(Trainer)
        trainer.cfg, trainer.run_dir, trainer.device = cfg, run_dir, torch.device("cpu")
        trainer.denv = SimpleNamespace(is_main=True, world_size=1)
        trainer.plan, trainer.per_epoch = batch_plan(cfg, 1), 1
        trainer._build()
        return trainer

    trainer = ranks_build(run)
    assert trainer.resumed == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint to resume from, so it needs these weights"):
        ranks_build(fresh)
