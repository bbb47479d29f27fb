"""Where a model's initial weights come from: ``model.init`` and ``create_model(name, pretrained=True)``.

``resolve_source(ref)`` turns a reference into a local path (a file or a directory) that
``pipeline.models.convert.load_checkpoint`` reads:

* a local path: taken as is (it must exist);
* ``s3://bucket/key``: an object, or a "directory" of model files under that prefix (a run's export), downloaded
  once through the storage layer (``pipeline.data.storage``: its endpoint and credentials, ``AWS_*``) into a cache
  directory. Each version of the object gets its own folder (named from its ETag and size), so a path handed to
  the ranks never changes under them and a rewritten object is downloaded again;
* ``hf-hub:<org>/<name>[@revision]``: a Hugging Face Hub repository, through huggingface_hub's own cache
  (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), only its weights and configs
  (``model.safetensors``, or ``pytorch_model.bin`` where there is none; ``config.json``,
  ``preprocessor_config.json``). ``HF_HUB_OFFLINE=1`` reads the cache only. Two kinds of repository load: timm
  image ViTs (``hf-hub:timm/vit_base_patch16_224.orig_in21k_ft_in1k``: timm key names, ``config.json``'s
  ``pretrained_cfg`` holds the normalisation) and Hugging Face ``TimesformerForVideoClassification``
  (``hf-hub:facebook/timesformer-base-finetuned-k400``). What the directory holds is told apart by
  ``load_checkpoint`` from the weights' key names.

Nothing is unpickled here: the files are only fetched (a ``pytorch_model.bin`` is read later, weights-only, by
``pipeline.models.convert.safe_torch_load``). Every error says what to do (``SourceError``).

The environment is read at each call (not when huggingface_hub was imported), so a launch, a test or a notebook
that sets ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` / ``HF_HOME`` / ``HF_ENDPOINT`` is obeyed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
from pathlib import Path

HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference: safetensors runs no pickle
CONFIG_FILES = ("config.json", "preprocessor_config.json")
# Where s3:// sources are downloaded when the caller names no cache (launch uses the runs directory's, which the
# ranks see)
INIT_CACHE_ENV = "TIMESFORMER_INIT_CACHE"

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


class SourceError(ValueError):
    """A model source cannot be resolved to a local path: says which, why, and what to do."""


def is_reference(ref: str) -> bool:
    """A source that must be resolved (downloaded or looked up in a cache) before a path can be read."""
    return str(ref).startswith((HUB_PREFIX, "s3://"))


def parse_hub(ref: str) -> tuple[str, str | None]:
    """``hf-hub:org/name[@revision]`` -> ``("org/name", revision or None)``."""
    body = ref[len(HUB_PREFIX):] if ref.startswith(HUB_PREFIX) else ref
    repo, at, revision = body.partition("@")
    if not _REPO_ID.fullmatch(repo) or ".." in repo or (at and (
            not _REVISION.fullmatch(revision) or ".." in revision)):
        raise SourceError(f"{ref}: expected hf-hub:<org>/<name> or hf-hub:<org>/<name>@<revision> (e.g. "
                          f"hf-hub:timm/vit_base_patch16_224.orig_in21k_ft_in1k)")
    return repo, revision or None


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """huggingface_hub's offline switch, as the environment says now."""
    return _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """huggingface_hub's cache, as the environment says now (its own rule: HF_HUB_CACHE, the older
    HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def default_init_cache() -> Path:
    return Path(os.environ.get(INIT_CACHE_ENV) or Path.home() / ".cache" / "timesformer-pipeline" / "init")


def resolve_source(ref: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                   endpoint_url: str | None = None) -> Path:
    """The local path (file or directory) that ``ref`` names, fetched first where it must be.

    ``cache_dir``: where ``s3://`` sources are downloaded (default ``$TIMESFORMER_INIT_CACHE``, else
    ``~/.cache/timesformer-pipeline/init``; give a directory every rank sees). ``endpoint_url``: the S3 endpoint
    (default ``AWS_ENDPOINT_URL``). Hub repositories use huggingface_hub's cache. ``SourceError`` otherwise."""
    ref = str(ref)
    if not ref.strip():
        raise SourceError("no model source given (an empty model.init means random initialisation)")
    try:
        if ref.startswith(HUB_PREFIX):
            return _resolve_hub(ref)
        if ref.startswith("s3://"):
            return _resolve_s3(ref, Path(cache_dir) if cache_dir else default_init_cache(), endpoint_url)
    except SourceError as e:  # an HF_ENDPOINT / S3 endpoint with credentials in it is shown without them
        from pipeline.secrets import redact_text

        raise SourceError(redact_text(str(e))) from None
    if "://" in ref:
        raise SourceError(f"{ref}: unsupported scheme; give a local path, s3://bucket/key or hf-hub:<org>/<name>")
    path = Path(ref).expanduser()
    if not path.exists():
        raise SourceError(f"{ref}: no such file or directory (a model source is a local path, s3://bucket/key "
                          f"or hf-hub:<org>/<name>)")
    return path


def pinned_reference(ref: str, path: str | os.PathLike) -> str:
    """The reference that names exactly the weights ``resolve_source(ref)`` returned at ``path``: for
    ``hf-hub:org/name[@branch]``, ``hf-hub:org/name@<commit>`` (the snapshot folder's name is the commit it holds),
    so that resolving it again later gets the same files even after the branch moved on; anything else as is."""
    if not str(ref).startswith(HUB_PREFIX):
        return str(ref)
    repo, _ = parse_hub(ref)
    commit = Path(path).name
    if not re.fullmatch(r"[0-9a-f]{40}", commit) or Path(path).parent.name != "snapshots":
        return str(ref)
    return f"{HUB_PREFIX}{repo}@{commit}"


# ---------------------------------------------------------------------------------------------------
# Hugging Face Hub


def _download_command(repo: str, revision: str | None, cache: Path) -> str:
    rev = f" --revision {shlex.quote(revision)}" if revision else ""
    return f"hf download {repo} config.json model.safetensors{rev} --cache-dir {shlex.quote(str(cache))}"


def _not_cached(ref: str, repo: str, revision: str | None, cache: Path, why: str, offline: bool) -> SourceError:
    last = ("or allow downloads here (HF_HUB_OFFLINE=0) on a machine that reaches the Hub" if offline else
            "or try again when the Hub (or your HF_ENDPOINT mirror) can be reached")
    return SourceError(
        f"{ref}: {why}, and it is not in the Hugging Face cache at {cache}. On a machine with network run "
        f"`{_download_command(repo, revision, cache)}` (pytorch_model.bin instead of model.safetensors where the "
        f"repository has no safetensors file; preprocessor_config.json too for a TimeSformer repository), then copy "
        f"{cache / ('models--' + repo.replace('/', '--'))} into this machine's cache ({cache}, or point HF_HUB_CACHE "
        f"at the copy); {last}")


def _snapshot(repo: str, revision: str | None, cache: Path, patterns: list[str], offline: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    # huggingface_hub fixes its offline switch when it is first imported; this call follows the environment now
    imported_offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, offline
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=str(cache), allow_patterns=patterns,
                                      local_files_only=offline, endpoint=os.environ.get("HF_ENDPOINT") or None))
    except IncompleteSnapshotError as e:  # files listed for this commit are missing: see what the folder holds
        if e.snapshot_path is None:
            raise
        return Path(e.snapshot_path)
    finally:
        constants.HF_HUB_OFFLINE = imported_offline


def _resolve_hub(ref: str) -> Path:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = parse_hub(ref)
    cache, offline = hub_cache_dir(), hub_offline()
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        # safetensors first: a repository with both files (timm's) then downloads one, and the one that runs no
        # unpickler at all; pytorch_model.bin only where the first pass brought no weights
        snap = _snapshot(repo, revision, cache, [*CONFIG_FILES, WEIGHT_FILES[0]], offline)
        if not (snap / WEIGHT_FILES[0]).is_file():
            snap = _snapshot(repo, revision, cache, [WEIGHT_FILES[1]], offline)
    except GatedRepoError:
        raise SourceError(f"{ref}: the repository {repo} is gated on {endpoint}: accept its terms on the Hub, then "
                          f"log in here (`hf auth login`, or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise SourceError(f"{ref}: the repository {repo} has no revision {revision!r} on {endpoint}; give a branch, "
                          f"tag or commit it has (hf-hub:{repo}@main)") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{ref}: no repository {repo} on {endpoint} (or it is private: log in with `hf auth "
                          f"login` or set HF_TOKEN); check the name, e.g. "
                          f"hf-hub:timm/vit_base_patch16_224.orig_in21k_ft_in1k") from None
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE=1 forbids downloads" if offline else
               f"the Hub ({endpoint}) cannot be reached ({' '.join(str(e.__cause__ or e).split())[:200]})")
        raise _not_cached(ref, repo, revision, cache, why, offline) from None
    except HfHubHTTPError as e:
        detail = " ".join(str(e).split())[:300]
        raise SourceError(f"{ref}: the Hub ({endpoint}) refused the download ({detail}); try again, or download it "
                          f"elsewhere: `{_download_command(repo, revision, cache)}`") from None
    except OSError as e:  # the cache is not writable, the disk is full
        raise SourceError(f"{ref}: cannot use the Hugging Face cache at {cache} ({type(e).__name__}: {e}); set "
                          f"HF_HUB_CACHE to a writable directory the ranks can read") from None
    if not any((snap / name).is_file() for name in WEIGHT_FILES):
        held = sorted(p.name for p in snap.iterdir()) if snap.is_dir() else []
        sharded = any(name.endswith(".index.json") for name in held)
        raise SourceError(
            f"{ref}: no weights file ({' or '.join(WEIGHT_FILES)}) in {snap}"
            + (f" (it holds {', '.join(held[:8])})" if held else "")
            + (": sharded checkpoints are not supported; save the weights as one file" if sharded else
               ": the repository has none (not a model repository?), or the cache holds only part of it: "
               f"`{_download_command(repo, revision, cache)}`"))
    return snap


# ---------------------------------------------------------------------------------------------------
# S3


def _resolve_s3(uri: str, cache_dir: Path, endpoint_url: str | None) -> Path:
    from pipeline.data.storage import StorageError, open_resuming, open_storage, split_s3_uri

    try:
        bucket, key = split_s3_uri(uri, need_key=True)
    except StorageError as e:
        raise SourceError(str(e)) from None
    key = key.rstrip("/")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise SourceError(f"{uri}: the key has empty, '.' or '..' parts; give the object's key as stored")
    try:
        storage = open_storage(f"s3://{bucket}", endpoint_url=endpoint_url)
        listed = storage.list(key)
    except StorageError as e:
        raise SourceError(f"{uri}: cannot be listed ({' '.join(str(e).split())})") from None
    exact = [o for o in listed if o.key == key]
    if exact:
        files = exact
    else:  # a folder of model files: a run's export, a Hugging Face directory
        files = [o for o in listed if o.key.rpartition("/")[0] == key and
                 o.key.rpartition("/")[2] in WEIGHT_FILES + CONFIG_FILES]
        if not any(o.key.rpartition("/")[2] in WEIGHT_FILES for o in files):
            raise SourceError(f"{uri}: no such object, and no model files ({', '.join(WEIGHT_FILES)}) directly under "
                              f"it; give the checkpoint's key (s3://{bucket}/path/to/model.safetensors) or the "
                              f"folder that holds it")
    version = hashlib.sha256("\n".join(f"{o.key} {o.size} {o.etag}" for o in files).encode()).hexdigest()[:16]
    folder = cache_dir / "s3" / bucket / key / version
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for o in files:
            dest = folder / o.key.rpartition("/")[2]
            if dest.is_file() and dest.stat().st_size == o.size:
                continue  # downloaded before (each file is renamed into place whole)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
            try:
                with open_resuming(storage, o.key) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 8 << 20)
                if tmp.stat().st_size != o.size:
                    raise SourceError(f"s3://{bucket}/{o.key}: read {tmp.stat().st_size} bytes, the object has "
                                      f"{o.size} (changed while it was read?); try again")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
    except StorageError as e:
        raise SourceError(f"{uri}: cannot be downloaded ({' '.join(str(e).split())})") from None
    except OSError as e:
        raise SourceError(f"{uri}: cannot be stored in {folder} ({type(e).__name__}: {e}); give a writable cache "
                          f"directory the ranks can read") from None
    return folder / key.rpartition("/")[2] if exact else folder


def weights_in(directory: str | os.PathLike) -> Path:
    """The weights file of a model directory: ``model.safetensors``, else ``pytorch_model.bin`` (a Hugging Face
    or timm repository saved before safetensors); ``model.safetensors`` when it holds neither (for the error)."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    return directory / WEIGHT_FILES[0]
