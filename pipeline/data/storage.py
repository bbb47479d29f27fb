"""One interface for object storage: ``s3://bucket/prefix`` (any S3 endpoint, through boto3) and local
directories (the embedded default).

S3: the endpoint comes from the argument, else ``AWS_ENDPOINT_URL`` (boto3 reads it), credentials the
usual boto3 way (environment, profile, instance role) and are never logged; retries are boto3's
adaptive mode; large uploads are multipart (boto3's managed transfer). Writes are whole-object and
atomic: an object is either there complete or not at all (S3 PUT semantics; locally, a temporary
file renamed into place, created with the process umask like any other file). Errors name the URI and
say what to do (``StorageError``).

Conditional writes (``put_bytes(..., if_match=version)``, ``delete(..., if_match=version)``, with the version
from ``get_versioned``) replace or remove an object only if it is still the one that was read, for small
mutable objects such as the ingest lease: S3's ``If-Match`` on the ETag (AWS and SeaweedFS honour it on PUT
and DELETE); locally, the SHA-256 of the content compared and the file replaced under an exclusive
``flock`` on a hidden ``.<name>.lock`` next to it. A write that finds another version raises
``ObjectChangedError``.

Long reads (shards) go through ``open_resuming``: a connection reset or another transient error in the
middle of a body is retried from the byte reached (S3: a ranged GET; locally: reopen and seek), so a
passing network fault neither kills a DataLoader worker nor changes a byte of what is read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import io
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage operation failed: names the URI and what to do about it."""


class ObjectMissingError(StorageError, FileNotFoundError):
    """The object does not exist."""


class ObjectChangedError(StorageError):
    """A conditional write or delete found the object changed (or gone) since the version it was given."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int
    etag: str = ""  # S3 only: changes whenever the object does


class Storage(Protocol):
    root_uri: str

    def uri(self, key: str) -> str: ...
    def check(self) -> None: ...
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str: ...
    def get_versioned(self, key: str) -> tuple[bytes, str]: ...
    def put_file(self, key: str, path: str | os.PathLike) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def open(self, key: str, offset: int = 0) -> BinaryIO: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, key: str, *, if_match: str | None = None) -> None: ...


def split_s3_uri(uri: str, *, need_key: bool = False) -> tuple[str, str]:
    """``s3://bucket/key/of/object`` -> ``("bucket", "key/of/object")``: the one place an S3 URI is taken
    apart. The key is ``""`` for a bare ``s3://bucket`` (a storage root); ``need_key``: an object is meant,
    so a URI without a key is refused. ``StorageError`` naming the URI for another scheme, no bucket, or
    no key where one is needed."""
    expected = "s3://bucket/key" if need_key else "s3://bucket/prefix"
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri}: not an S3 URI; expected {expected}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name; expected {expected}")
    if need_key and not key.strip("/"):
        raise StorageError(f"{uri}: no object key after the bucket; expected s3://bucket/key")
    return bucket, key


def open_storage(uri: str | os.PathLike, *, endpoint_url: str | None = None) -> Storage:
    """``s3://bucket[/prefix]`` or a local directory (created if missing)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        bucket, prefix = split_s3_uri(uri)
        return S3Storage(bucket, prefix.strip("/"), endpoint_url=endpoint_url)
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme; use s3://bucket/prefix or a local path")
    return LocalStorage(Path(uri))


def join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


# ---------------------------------------------------------------------------------------------------


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root_uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents and path != self.root:
            raise StorageError(f"{key!r} escapes the storage root {self.root}")
        return path

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root}: not writable; choose another output directory")

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """Writes the object and returns its version (the SHA-256 of ``data``). ``if_absent``: only if there is
        none (else ``StorageError`` "already exists"); ``if_match``: only if the object is still at that
        version (else ``ObjectChangedError``)."""
        self._write(key, io.BytesIO(data), if_absent, if_match)
        return hashlib.sha256(data).hexdigest()

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and its version, for a later ``if_match``."""
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as f:
            self._write(key, f, False)

    @contextlib.contextmanager
    def _locked(self, dest: Path):
        """An exclusive ``flock`` on ``.<name>.lock`` next to ``dest``: conditional writes and deletes of one
        object take turns (a plain create-if-absent needs none: a hard link is atomic)."""
        import fcntl

        fd = os.open(dest.parent / f".{dest.name}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _check_version(self, dest: Path, if_match: str) -> None:
        try:
            current = hashlib.sha256(dest.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise ObjectChangedError(f"{dest}: gone since it was read (expected version {if_match[:12]})") from None
        if current != if_match:
            raise ObjectChangedError(f"{dest}: changed since it was read (version {current[:12]}, expected "
                                     f"{if_match[:12]})")

    def _write(self, key: str, src: BinaryIO, if_absent: bool, if_match: str | None = None) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Not mkstemp: it creates 0600 files, which teammates on a shared file system cannot read. Mode
        # 0666 goes through the umask (and default ACLs) as any file would; O_EXCL keeps the name ours.
        for _ in range(100):
            tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
                break
            except FileExistsError:
                continue
        else:
            raise StorageError(f"{dest.parent}: cannot create a temporary file (100 names taken)")
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, dest)  # atomic create-if-absent
                except FileExistsError:
                    raise StorageError(f"{dest}: already exists (objects here are never rewritten)") from None
            elif if_match is not None:
                with self._locked(dest):
                    self._check_version(dest, if_match)
                    os.replace(tmp, dest)
            else:
                os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def open(self, key: str, offset: int = 0) -> BinaryIO:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 (the caller closes it)
        except FileNotFoundError:
            raise ObjectMissingError(f"{path}: no such object") from None
        if offset:
            f.seek(offset)
        return f

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                key = p.relative_to(base).as_posix()
                if key.startswith(prefix):
                    out.append(ObjectInfo(key, p.stat().st_size))
        return out

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Removes the object (nothing if it is not there); ``if_match``: only if it is still at that version
        (else ``ObjectChangedError``)."""
        path = self._path(key)
        if if_match is None:
            path.unlink(missing_ok=True)
            return
        with self._locked(path):
            self._check_version(path, if_match)
            path.unlink()


# ---------------------------------------------------------------------------------------------------


class S3Storage:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client=None) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self.root_uri = f"s3://{bucket}/{prefix}".rstrip("/")
        self._client = client
        self._client_pid = os.getpid() if client is not None else None

    def __getstate__(self):  # picklable for DataLoader workers and Ray tasks: each rebuilds its client
        return {**self.__dict__, "_client": None, "_client_pid": None}

    @property
    def client(self):
        # One client per process: a forked DataLoader worker must not share the parent's connection pool
        # (two processes reading one socket interleave their responses).
        if self._client is None or self._client_pid != os.getpid():
            self._client_pid = os.getpid()
            import boto3
            from botocore.config import Config

            # a session of its own: credentials are resolved now, not cached from an earlier client
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url,
                config=Config(retries={"max_attempts": 8, "mode": "adaptive"}, connect_timeout=10, read_timeout=120),
            )
        return self._client

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{join(self.prefix, key)}"

    def _explain(self, e: Exception, key: str, action: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.uri(key) if key else self.root_uri
        endpoint = self.endpoint_url or "the AWS default endpoint"
        if isinstance(e, NoCredentialsError):
            return StorageError(f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                                f"or an AWS profile")
        if isinstance(e, EndpointConnectionError):
            return StorageError(f"{where}: cannot reach {endpoint}; check AWS_ENDPOINT_URL and that the server runs")
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",):
                return StorageError(f"{where}: bucket '{self.bucket}' does not exist at {endpoint}; create it "
                                    f"(aws s3 mb s3://{self.bucket}) or fix the URI")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectMissingError(f"{where}: no such object")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                return StorageError(f"{where}: access denied ({code}) while trying to {action}; check the "
                                    f"credentials and the bucket policy")
            if code in ("PreconditionFailed", "412"):
                return StorageError(f"{where}: already exists (objects here are never rewritten)")
            return StorageError(f"{where}: {action} failed ({code or type(e).__name__})")
        return StorageError(f"{where}: {action} failed ({type(e).__name__}: {e})")

    def check(self) -> None:
        """Fail early, and clearly, when the bucket is missing or not ours to use. Some servers create a
        bucket on first write (SeaweedFS does); AWS does not, so writers check first."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            from botocore.exceptions import ClientError

            if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                e.response["Error"]["Code"] = "NoSuchBucket"
            raise self._explain(e, "", "use the bucket") from e

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """Writes the object and returns its version (the ETag). ``if_absent``: only if there is none
        (``If-None-Match: *``, else ``StorageError`` "already exists"); ``if_match``: only if its ETag is
        still that one (``If-Match``, else ``ObjectChangedError``)."""
        extra = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match} if if_match is not None else {}
        try:
            return self.client.put_object(Bucket=self.bucket, Key=join(self.prefix, key), Body=data, **extra)["ETag"]
        except Exception as e:
            raise self._conditional(e, key, if_match) or self._explain(e, key, "write") from e

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and its ETag, for a later ``if_match``."""
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=join(self.prefix, key))
            return r["Body"].read(), r["ETag"]
        except Exception as e:
            raise self._explain(e, key, "read") from e

    def _conditional(self, e: Exception, key: str, if_match: str | None) -> StorageError | None:
        """An ``If-Match`` that did not hold (412; a missing object also answers 412, or 404 on some servers)."""
        from botocore.exceptions import ClientError

        if if_match is None or not isinstance(e, ClientError):
            return None
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "412", "NoSuchKey", "404", "NotFound"):
            return ObjectChangedError(f"{self.uri(key)}: changed or gone since it was read (expected ETag "
                                      f"{if_match})")
        return None

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        from boto3.s3.transfer import TransferConfig

        try:  # multipart above 64 MiB, in 64 MiB parts
            self.client.upload_file(str(path), self.bucket, join(self.prefix, key),
                                    Config=TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20))
        except Exception as e:
            raise self._explain(e, key, "upload") from e

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    def open(self, key: str, offset: int = 0) -> BinaryIO:
        """The object's body from byte ``offset`` on (a ranged GET when not 0)."""
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            return self.client.get_object(Bucket=self.bucket, Key=join(self.prefix, key), **extra)["Body"]
        except Exception as e:
            from botocore.exceptions import ClientError

            if offset and isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") == "InvalidRange":
                return io.BytesIO(b"")  # the read had reached the end when it failed: nothing left
            raise self._explain(e, key, "read") from e

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=join(self.prefix, key))
            return True
        except Exception as e:
            err = self._explain(e, key, "check")
            if isinstance(err, ObjectMissingError):
                return False
            raise err from e

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = join(self.prefix, prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"]
                    if key and not key.endswith("/"):  # skip directory marker objects
                        out.append(ObjectInfo(key, obj["Size"], obj.get("ETag", "").strip('"')))
        except Exception as e:
            raise self._explain(e, prefix, "list") from e
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Removes the object; ``if_match``: only if its ETag is still that one (``If-Match``, else
        ``ObjectChangedError``)."""
        extra = {"IfMatch": if_match} if if_match is not None else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=join(self.prefix, key), **extra)
        except Exception as e:
            raise self._conditional(e, key, if_match) or self._explain(e, key, "delete") from e


# ---------------------------------------------------------------------------------------------------
# Resuming reads


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors of a read in progress that another try may not meet: resets, timeouts, bodies cut short."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.IncompleteRead]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError
        from urllib3.exceptions import ProtocolError, ReadTimeoutError

        # HTTPClientError covers ReadTimeoutError, ResponseStreamingError and ConnectionClosedError
        kinds += [HTTPClientError, IncompleteReadError, BotoConnectionError, ProtocolError, ReadTimeoutError]
    except ImportError:  # local storage only
        pass
    return tuple(kinds)


_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ESTALE, errno.EINTR}


def is_transient(e: BaseException) -> bool:
    """Whether a read error is worth retrying (a network or I/O hiccup, not a missing or refused object)."""
    if isinstance(e, ObjectMissingError):
        return False
    if isinstance(e, StorageError):  # a reopen that failed: judge by its cause
        return e.__cause__ is not None and is_transient(e.__cause__)
    if isinstance(e, _transient_errors()):
        return True
    return isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS


class ResumingReader(io.RawIOBase):
    """A read-once stream over one object that survives transient errors: after a failure it reopens the
    object at the byte it had reached and carries on, so the caller sees each byte exactly once.

    Up to ``attempts`` failures in a row without a byte of progress in between, each after a backoff
    (``backoff`` seconds, doubling, at most 10 s); progress resets the count. Every retry is logged.
    """

    def __init__(self, storage: Storage, key: str, *, attempts: int = 5, backoff: float = 0.5) -> None:
        self.storage, self.key, self.attempts, self.backoff = storage, key, attempts, backoff
        self.pos = 0  # bytes delivered so far
        self.retries = 0  # reopenings, for callers and tests
        self._f: BinaryIO | None = storage.open(key)
        self._failures = 0  # in a row, without progress

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while True:
            try:
                if self._f is None:
                    self._f = self.storage.open(self.key, offset=self.pos)
                n = _readinto(self._f, b)
            except Exception as e:
                if not is_transient(e):
                    raise
                self._retry(e)
                continue
            self.pos += n
            if n:
                self._failures = 0
            return n

    def _retry(self, e: Exception) -> None:
        self._failures += 1
        where = self.storage.uri(self.key)
        if self._failures > self.attempts:
            raise StorageError(f"{where}: reading failed at byte {self.pos} {self.attempts + 1} times in a row "
                               f"(last: {type(e).__name__}: {e}); check the network and the storage server, then "
                               f"resume the job") from e
        delay = min(10.0, self.backoff * 2 ** (self._failures - 1))
        log.warning("%s: read failed at byte %d (%s: %s); retrying from there in %.1fs (attempt %d of %d)",
                    where, self.pos, type(e).__name__, e, delay, self._failures, self.attempts)
        self._close_current()
        self.retries += 1
        time.sleep(delay)

    def _close_current(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; dropped either way
                f.close()

    def close(self) -> None:
        self._close_current()
        super().close()


def _readinto(f, b) -> int:
    readinto = getattr(f, "readinto", None)
    if readinto is not None:
        return readinto(b) or 0
    data = f.read(len(b))
    b[:len(data)] = data
    return len(data)


def open_resuming(storage: Storage, key: str, *, attempts: int = 5, backoff: float = 0.5) -> ResumingReader:
    """``storage.open(key)`` that resumes after transient errors (see ``ResumingReader``)."""
    return ResumingReader(storage, key, attempts=attempts, backoff=backoff)
