"""Second round of hostile probes (checkpoints, shards): inputs that still got through after issue 13's first
pass. Every hostile file is built here, at test time.

* a pickle of a few hundred bytes asking for ``bytearray(n)``, which torch's weights-only unpickler allows and
  fills with n zero bytes as it builds it (any n: a 1 KB file held 1 GiB);
* a pickle calling a legacy tensor constructor (``torch.BFloat16Tensor(n)``): an allocation of any size that
  the first copy or cast fills (an export's ``float()``, an inflation's ``clone()``);
* a state dict holding a number or a string where a weight belongs (was an ``AttributeError`` traceback);
* a safetensors metadata with a NaN ``mlp_ratio`` (was a ValueError that named no file);
* a shard (matching its index) with a sparse member: 10 KB of tar that reads as any size of zeros.
"""

from __future__ import annotations

import io
import json
import resource
import tarfile
import zipfile

import pytest
import torch

from pipeline.data.loader import FaultTally, make_loader
from pipeline.data.shards import ShardError, read_shard
from pipeline.data.storage import LocalStorage
from pipeline.models.convert import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_safetensors,
    read_checkpoint,
    save_safetensors,
)
from pipeline.models.timesformer import TimeSformer, variant_config

from .test_hostile_data import CLIP, commit, drain, good

TINY = dict(num_frames=2, img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def tiny_model(**overrides) -> TimeSformer:
    return TimeSformer(variant_config("timesformer_tiny", **{**TINY, **overrides}))


def torch_file_with_pickle(path, pickle_bytes: bytes) -> None:
    """A real torch zip file whose ``data.pkl`` is replaced by ``pickle_bytes``."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    original = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info in original.infolist():
            data = original.read(info.filename)
            z.writestr(info.filename, pickle_bytes if info.filename.endswith("data.pkl") else data)


def call_pickle(module: str, name: str, n: int) -> bytes:
    """Protocol 2: ``{"w": module.name(n)}`` (GLOBAL, BININT, TUPLE1, REDUCE), as torch.save would write it."""
    return (b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01c" + f"{module}\n{name}\n".encode() + b"q\x02J"
            + n.to_bytes(4, "little", signed=True) + b"\x85q\x03Rq\x04s.")


def test_a_pickle_asking_for_a_bytearray_of_any_size_is_refused_before_it_is_built(tmp_path):
    path = tmp_path / "tiny.pth"
    n = 256 << 20
    torch_file_with_pickle(path, call_pickle("builtins", "bytearray", n))
    assert path.stat().st_size < 2048
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UnsafeCheckpointError) as e:
        read_checkpoint(path)  # used to return {"w": bytearray(256 MiB)}, zero-filled
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert str(path) in str(e.value) and "builtins.bytearray" in str(e.value)
    assert grown_kib < (n >> 10) // 2, f"the process grew by {grown_kib} KiB: the bytearray was built"
    with pytest.raises(UnsafeCheckpointError):  # the same through the model.init entry point
        load_checkpoint(tiny_model(), path)


@pytest.mark.parametrize("ctor", ["FloatTensor", "BFloat16Tensor"])
def test_a_tensor_bigger_than_its_file_is_refused(tmp_path, ctor):
    """A legacy constructor asked for 2**26 elements: the storage is allocated uninitialised (cheap here),
    and the first cast or clone would fill it; a file of under 1 KB cannot hold those bytes."""
    path = tmp_path / f"{ctor}.pth"
    torch_file_with_pickle(path, call_pickle("torch", ctor, 1 << 26))
    with pytest.raises(UnsafeCheckpointError) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and "more than the file" in str(e.value)


def test_real_checkpoints_still_load_under_the_size_check(tmp_path):
    """Tensors sharing one storage (views, tied weights) are counted once: a genuine file is never refused."""
    model = tiny_model()
    state = model.state_dict()
    state["head.weight"] = state["head.weight"].clone()
    path = tmp_path / "ok.pth"
    torch.save({"model": state, "view": state["pos_embed"][:, :2], "epoch": 3}, path)
    loaded = read_checkpoint(path)
    assert torch.equal(loaded["model"]["cls_token"], state["cls_token"])
    load_checkpoint(tiny_model(), path)


@pytest.mark.parametrize("layout", ["ours", "official", "timm_vit"])
def test_a_number_where_a_weight_belongs_is_named_not_an_attribute_error(tmp_path, layout):
    model = tiny_model()
    state = dict(model.state_dict())
    if layout == "timm_vit":
        state = {k: v for k, v in state.items() if k != "time_embed" and "temporal" not in k}
        state["blocks.0.attn.qkv.weight"] = 5
    else:
        state["cls_token"] = 5
    if layout == "official":
        state = {"model_state": {f"model.{k}": v for k, v in state.items()}, "epoch": 1}
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tiny_model(), path)  # used to be AttributeError: 'int' object has no attribute ...
    key = "blocks.0.attn.qkv.weight" if layout == "timm_vit" else "cls_token"
    assert str(path) in str(e.value) and repr(key) in str(e.value) and "(int)" in str(e.value)


def test_a_stride_zero_view_posing_as_a_huge_weight_is_refused_before_inflation_clones_it(tmp_path):
    """An image-ViT checkpoint whose qkv weight is one stored float expanded to 2**28 elements: the file is
    tiny, and ViT inflation clones attention weights before any shape check, which would fill 1 GiB."""
    vit = {k: v for k, v in tiny_model(attention_type="space_only").state_dict().items()}
    vit["blocks.0.attn.qkv.weight"] = torch.zeros(1).expand(1 << 14, 1 << 14)
    path = tmp_path / "posing.pth"
    torch.save(vit, path)
    assert path.stat().st_size < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tiny_model(), path, fmt="timm_vit")
    assert str(path) in str(e.value) and "blocks.0.attn.qkv.weight" in str(e.value) and "views larger" in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # KiB: nothing was filled


def test_a_non_string_key_is_named(tmp_path):
    path = tmp_path / "intkey.pth"
    torch.save({1: torch.zeros(1)}, path)
    with pytest.raises(CheckpointMismatchError, match="not a tensor under a string key: 1 "):
        load_checkpoint(tiny_model(), path)  # used to be TypeError from a str.join


def test_a_nan_in_a_safetensors_config_names_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    good_path = save_safetensors(model, tmp_path / "good.safetensors")
    cfg = model.cfg.to_dict()
    cfg["mlp_ratio"] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(load_file(str(good_path)), str(path), metadata={"format": "pt", "timesformer_config": json.dumps(cfg)})
    with pytest.raises(ValueError) as e:
        load_safetensors(path)  # used to be "cannot convert float NaN to integer", no file named
    assert str(path) in str(e.value)


# -- a sparse member in a shard ------------------------------------------------------------------


def member(name: str, payload: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT) + payload + b"\0" * (-len(payload) % 512)


def sparse_member(name: str, realsize: int) -> bytes:
    """A GNU sparse header with no data blocks: tarfile reads it as ``realsize`` bytes of zeros."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = 0, 0, 0o644
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def sparse_shard(realsize: int) -> bytes:
    (_, video), (_, meta) = good("a", 0, 1)
    return (sparse_member("a.mp4", realsize) + member("a.json", meta)
            + member("b.mp4", video) + member("b.json", meta) + b"\0" * 1024)


def test_the_sparse_shard_helper_really_claims_its_size():
    data = sparse_shard(1 << 20)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        m = tar.getmember("a.mp4")
        assert m.issparse() and m.size == 1 << 20 and len(tar.extractfile(m).read()) == 1 << 20
    assert len(data) < 16 << 10


def test_a_sparse_member_is_skipped_as_not_a_file_without_being_read(tmp_path):
    realsize = 256 << 20
    data = sparse_shard(realsize)
    storage = LocalStorage(tmp_path / "ds")
    index = commit(storage, {"shards/s.tar": (data, ["a", "b"])}, split="val")  # it matches its index
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    items, error = drain(make_loader(index, storage, "val", train=False, batch_size=2, num_workers=0, clip=CLIP))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert error is None
    tally = FaultTally()
    for item in items:
        tally.add(item.get("faults"))
    assert [k for item in items if "video" in item for k in item["key"]] == ["b"]
    assert tally.by_reason == {"not_a_file": 1}  # used to be read as 256 MiB of zeros, then "undecodable"
    assert grown_kib < (realsize >> 10) // 2, f"the process grew by {grown_kib} KiB: the member was read"


def test_read_shard_refuses_a_sparse_member_by_name():
    with pytest.raises(ShardError, match="a.mp4 is a sparse file"):
        list(read_shard(io.BytesIO(sparse_shard(1 << 20)), "s.tar"))
