"""The shard plan: which videos go into which shard, deterministically, and what changed since the last
committed dataset version.

Same inputs, same shards: videos are ordered by split, then by a hash of their id (annotation files are
often sorted by label, and shards of one class would defeat the loader's shuffle buffer), and cut into
groups of ``samples_per_shard``; a shard's name is a hash of its members' ids, source checksums and the
preprocessing parameters, so rebuilding an unchanged group gives the same name (and the worker the same
bytes). Incremental: a shard of the last version whose members are all still present, unchanged, is
kept as it is; new videos, changed ones (another source checksum) and the survivors of shards that lost
a member are planned into new shards; deleted videos simply leave the next version. Shards hold class
indices, so when the class list (or single- against multi-label) differs from the last version's, no shard
is kept: every video is planned again with its new label indices.

Quarantined videos: a ``content`` failure (the file is bad) is not retried while its source checksum,
and the decode limit that refused it (if one did), are unchanged; a ``transient`` failure (a read error,
a dead worker), or an entry written before failures were classified, is planned again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.data.datasets import ManifestEntry
from pipeline.data.shards import DatasetIndex, ShardInfo

CONTENT = "content"  # the file is bad: permanent until it changes
TRANSIENT = "transient"  # reading or processing failed for a reason outside the file: retried


@dataclass(frozen=True)
class Source:
    """One video to ingest: its manifest entry, where its bytes are, and their checksum."""

    entry: ManifestEntry
    uri: str  # a local path, or a key of the source storage
    sha256: str


@dataclass
class ShardPlan:
    name: str  # shards/<split>/<name>.tar
    split: str
    sources: list[Source]

    @property
    def url(self) -> str:
        return f"shards/{self.split}/{self.name}.tar"


@dataclass
class Plan:
    keep: list[ShardInfo] = field(default_factory=list)  # shards of the last version, reused as they are
    build: list[ShardPlan] = field(default_factory=list)  # shards to make
    removed: list[str] = field(default_factory=list)  # video ids of the last version that are gone
    changed: list[str] = field(default_factory=list)  # video ids whose source changed

    @property
    def is_noop(self) -> bool:
        return not self.build and not self.removed

    def summary(self) -> dict[str, Any]:
        return {"keep_shards": len(self.keep), "build_shards": len(self.build),
                "build_videos": sum(len(s.sources) for s in self.build), "removed_videos": len(self.removed),
                "changed_videos": len(self.changed)}


def shard_name(sources: list[Source], preprocessing: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(preprocessing, sort_keys=True).encode())
    for s in sources:
        h.update(f"{s.entry.video_id}\0{s.sha256}\0{json.dumps(asdict(s.entry), sort_keys=True)}\n".encode())
    return h.hexdigest()[:20]


def is_permanent(entry: dict[str, Any], source_sha256: str, limits: Any = None) -> bool:
    """Whether a quarantine entry still holds for a source with this checksum under these decode limits
    (``DecodeLimits`` or None for the defaults): a content failure of the same bytes, refused by a limit
    (if any) that has not changed since."""
    if entry.get("kind") != CONTENT or entry.get("sha256") != source_sha256:
        return False
    limit = entry.get("limit")
    if limit:
        from pipeline.data.video import DEFAULT_LIMITS

        current = getattr(limits or DEFAULT_LIMITS, limit, None)
        return current is not None and str(current) == entry.get("limit_value")
    return True


def _mix(video_id: str) -> str:
    return hashlib.sha256(video_id.encode()).hexdigest()


def make_plan(sources: list[Source], preprocessing: dict[str, Any], samples_per_shard: int,
              last: DatasetIndex | None = None, *, limits: Any = None,
              labels: tuple[list[str], bool] | None = None) -> Plan:
    """Plan the next version from all current sources and (optionally) the last committed index. Videos
    the last version quarantined for their content are not retried while their source (and the decode
    limit that refused them, under ``limits``) is unchanged; transient failures are retried. ``labels``:
    the new version's (classes, multi_label); when it differs from the last version's, its shards' label
    indices mean other classes and none is kept (None: not compared)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: expected >= 1")
    ids = [s.entry.video_id for s in sources]
    if len(ids) != len(set(ids)):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"duplicate video ids in the manifest: {dup}")
    by_id = {s.entry.video_id: s for s in sources}
    plan = Plan()
    pending: set[str] = set(by_id)
    same_labels = labels is None or last is None or (list(labels[0]), labels[1]) == (last.classes, last.multi_label)
    if last is not None and last.preprocessing == preprocessing and same_labels:
        old = last.source_checksums
        pending -= {k for k, q in last.quarantine.items() if k in by_id and is_permanent(q, by_id[k].sha256, limits)}
        for shard in last.shards:
            members = shard.keys
            intact = all(k in by_id and by_id[k].sha256 == old.get(k) and by_id[k].entry.split == shard.split
                         for k in members)
            if intact:
                plan.keep.append(shard)
                pending -= set(members)
        last_ids = {k for shard in last.shards for k in shard.keys}
        plan.removed = sorted(last_ids - set(by_id))
        plan.changed = sorted(k for k in last_ids & set(by_id) if old.get(k) != by_id[k].sha256)
    todo = sorted((by_id[i] for i in pending), key=lambda s: (s.entry.split, _mix(s.entry.video_id)))
    for split in sorted({s.entry.split for s in todo}):
        group = [s for s in todo if s.entry.split == split]
        for i in range(0, len(group), samples_per_shard):
            members = group[i:i + samples_per_shard]
            plan.build.append(ShardPlan(shard_name(members, preprocessing), split, members))
    return plan
