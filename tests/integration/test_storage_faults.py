"""Storage faults against the real S3 server: a small proxy on 127.0.0.1 in front of SeaweedFS cuts the
response body of shard GETs mid-way (a connection reset as a flaky network makes it). The loader resumes
each cut read with a ranged GET from the byte it reached, verifies the shard over the resumed bytes, and
yields exactly the batches of an undisturbed run."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
import torch

from pipeline.data import storage as storage_mod
from pipeline.data.loader import ClipConfig, make_loader, view_loader
from pipeline.data.shards import (
    DatasetIndex,
    ShardSample,
    commit_index,
    put_shard,
    shard_url,
)
from pipeline.data.storage import StorageError, open_storage
from pipeline.data.synthetic import MOTION_CLASSES, make_video

pytestmark = pytest.mark.integration
CLIP = ClipConfig(num_frames=4, sampling_rate=8, crop=32, scale=(36, 44))


class CuttingProxy:
    """A TCP proxy for HTTP/1.1 on 127.0.0.1. Requests pass through unchanged; the response to a plain
    (not ranged) GET of a ``.tar`` object is cut after ``cut_after`` bytes of its body by closing
    both connections, the first time each object is fetched (``every_time``: each time, ranged GETs too).
    Bounded: socket timeouts everywhere, and ``close`` stops the accept loop."""

    def __init__(self, upstream: str, cut_after: int, every_time: bool = False) -> None:
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.cut_after, self.every_time = cut_after, every_time
        self.cuts: list[str] = []  # paths whose response was cut
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, ranged)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._sockets: set[socket.socket] = set()  # open connections, shut down by close()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream, timeout=30)
        client.settimeout(30)
        with self._lock:
            self._sockets.update((client, upstream))
        state = {"cut_at": None, "body": None, "head": b"", "path": ""}  # the request in flight here
        requests = threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True)
        requests.start()
        try:
            while chunk := upstream.recv(65536):
                with self._lock:
                    forward, cut = self._plan(state, chunk)
                    if cut:
                        self.cuts.append(state["path"])
                client.sendall(forward)
                if cut:
                    break  # the connection dies mid-body
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
                with self._lock:
                    self._sockets.discard(s)
        requests.join(timeout=5)

    @staticmethod
    def _plan(state: dict, chunk: bytes) -> tuple[bytes, bool]:
        """What of this response chunk to forward, and whether to cut after it (``cut_at`` body bytes)."""
        if state["cut_at"] is None:
            return chunk, False
        if state["body"] is None:  # still in the response head
            state["head"] += chunk
            end = state["head"].find(b"\r\n\r\n")
            if end < 0:
                return chunk, False
            body = len(state["head"]) - (end + 4)
            state["body"] = 0
        else:
            body = len(chunk)
        allowed = state["cut_at"] - state["body"]
        if body > allowed:
            return chunk[:len(chunk) - body + allowed], True
        state["body"] += body
        return chunk, False

    def _requests(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        """Client to server: note each request head (no request here has a body: GET, HEAD, list)."""
        buf = b""
        try:
            while chunk := client.recv(65536):
                buf += chunk
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    lines = head.decode("latin-1").split("\r\n")
                    method, target = lines[0].split(" ")[:2]
                    path = target.split("?")[0]
                    ranged = any(line.lower().startswith("range:") for line in lines[1:])
                    with self._lock:
                        self.requests.append((method, path, ranged))
                        cut = method == "GET" and path.endswith(".tar") and (
                            self.every_time or (not ranged and path not in self.cuts))
                        state.update(cut_at=self.cut_after if cut else None, body=None, head=b"", path=path)
                    upstream.sendall(head + b"\r\n\r\n")
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:  # idle keep-alive connections of the clients' pools end now, not at their timeout
            for s in list(self._sockets):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)


@pytest.fixture
def proxy_factory(seaweedfs):
    made = []

    def make(**kw) -> CuttingProxy:
        made.append(CuttingProxy(seaweedfs.endpoint, **kw))
        return made[-1]
    yield make
    for p in made:
        p.close()


def build(uri: str, split: str, shards: int = 4, per_shard: int = 3) -> DatasetIndex:
    storage = open_storage(uri)
    infos, n = [], 0
    for s in range(shards):
        samples = []
        for _ in range(per_shard):
            label = n % len(MOTION_CLASSES)
            samples.append(ShardSample(f"v{n:04d}", make_video("motion", MOTION_CLASSES[label], seed=n),
                                       {"label": label, "label_name": MOTION_CLASSES[label], "dataset": "faults",
                                        "split": split, "source": "-", "duration": 2.0, "fps": 16.0,
                                        "num_frames": 32, "source_sha256": "-"}))
            n += 1
        infos.append(put_shard(storage, shard_url(split, s), split, samples))
    index = DatasetIndex("faults", 1, list(MOTION_CLASSES), {}, infos)
    commit_index(storage, index)
    return index


def assert_same_batches(a: list[dict], b: list[dict], field: str = "video") -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        assert torch.equal(torch.as_tensor(x["label"]), torch.as_tensor(y["label"]))
        assert torch.equal(x[field], y[field])


@pytest.mark.parametrize("workers", [0, 1])
def test_training_through_cut_connections_yields_the_batches_of_an_undisturbed_run(s3_bucket, proxy_factory,
                                                                                  workers):
    uri = f"s3://{s3_bucket}/faults"
    index = build(uri, "train")
    smallest = min(s.bytes for s in index.shards)
    proxy = proxy_factory(cut_after=smallest // 2)  # the headers and half of a shard, then a reset

    def batches(endpoint: str | None) -> list[dict]:
        return list(make_loader(index, open_storage(uri, endpoint_url=endpoint), "train", train=True, batch_size=2,
                                num_workers=workers, clip=CLIP, seed=7, shuffle_buffer=4, epoch_samples=16))

    undisturbed = batches(None)
    t0 = time.monotonic()
    disturbed = batches(proxy.endpoint)
    assert_same_batches(undisturbed, disturbed)
    fetched = {p for m, p, ranged in proxy.requests if m == "GET" and p.endswith(".tar") and not ranged}
    resumed = [p for m, p, ranged in proxy.requests if m == "GET" and ranged]
    assert len(fetched) >= 2 and sorted(proxy.cuts) == sorted(fetched)  # every shard's first read was cut ...
    assert sorted(resumed) == sorted(proxy.cuts)  # ... and resumed once, with a ranged GET
    assert time.monotonic() - t0 < 60


def test_an_evaluation_pass_through_cut_connections_is_exact(s3_bucket, proxy_factory):
    uri = f"s3://{s3_bucket}/faults"
    index = build(uri, "val", shards=3)
    proxy = proxy_factory(cut_after=min(s.bytes for s in index.shards) // 3)

    def items(endpoint: str | None) -> list[dict]:
        return list(view_loader(index, open_storage(uri, endpoint_url=endpoint), "val", clip=CLIP,
                                protocol="multi_view", temporal_clips=2, spatial_crops=1, num_workers=1))

    undisturbed, disturbed = items(None), items(proxy.endpoint)
    assert_same_batches(undisturbed, disturbed, field="views")
    assert len(disturbed) == 9 and len(proxy.cuts) == 3
    assert all(item["faults"]["skipped"] == {} for item in disturbed)


def test_a_connection_that_keeps_failing_ends_with_the_object_named(s3_bucket, proxy_factory, monkeypatch):
    uri = f"s3://{s3_bucket}/faults"
    index = build(uri, "val", shards=1)
    proxy = proxy_factory(cut_after=0, every_time=True)  # headers, then nothing: no progress at all
    monkeypatch.setattr(storage_mod.time, "sleep", lambda s: None)  # the backoff, not what is tested here
    loader = make_loader(index, open_storage(uri, endpoint_url=proxy.endpoint), "val", train=False, batch_size=2,
                         num_workers=0, clip=CLIP)
    with pytest.raises(StorageError, match=r"000000\.tar: reading failed at byte 0 6 times in a row") as err:
        list(loader)
    assert "check the network" in str(err.value)
    assert len(proxy.cuts) == 6  # the first read and five resumptions, then it gave up
