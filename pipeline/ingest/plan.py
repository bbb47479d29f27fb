"""The shard plan: which videos go into which shard, deterministically, and what changed since the last
committed dataset version.

Same inputs, same shards: videos are ordered by split, then by a hash of their id (annotation files are
often sorted by label, and shards of one class would defeat the loader's shuffle buffer), and cut into
groups of ``samples_per_shard``; a shard's name is a hash of its members' ids, source checksums and the
preprocessing parameters, so rebuilding an unchanged group gives the same name (and the worker the same
bytes). Incremental: shards are immutable and a shard of the last version stays in the next one while it
holds a member that is still present and unchanged. A member deleted from the sources, changed (another
source checksum) or moved to another split is dropped from it: the index lists it in the shard's
``dropped`` (a tombstone; the loader skips it and the counts leave it out) and a changed or moved video is
planned into a new shard, with the new videos. A member whose manifest entry changed is compared by
``entry_digest`` (the index's ``entry_digests``): new clip bounds (start, end) re-transcode it; a new label
only (label, label name) copies its transcoded clip, bytes as they are, into a new shard with the new labels
in its metadata (``Plan.relabelled``). A member still listed in the manifest whose source cannot be found or
read now (``missing``: an unmounted directory, a file being replaced) is neither deleted nor changed: it stays
live as it was, with its checksum and entry digest (``Plan.held``), until its source is back; only a video
gone from the manifest (the annotations, or a folder dataset's listing) is a deletion. When a shard's live
fraction (members not dropped, of the members its tar holds) falls below ``compact_below``, its survivors
are repacked: a copy shard (``ShardPlan.copy_from``) takes their already-transcoded samples, bytes as they
are, from the verified old shard (never transcoded again), and the old shard leaves the index; so does a
shard with no member left.
Shards hold class indices, so when the class list (or single- against multi-label) differs from the last
version's, no shard is kept or copied: every video is planned again with its new label indices.

Quarantined videos: a ``content`` failure (the file is bad) is not retried while its source checksum,
and the decode limit that refused it (if one did), are unchanged; a ``transient`` failure (a read error,
a dead worker), or an entry written before failures were classified, is planned again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
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
    # a compaction: the samples are copied, bytes as they are, from these shards of the last version (each
    # with the keys to take, in order), verified against their index entries; nothing is transcoded
    copy_from: list[tuple[ShardInfo, list[str]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"shards/{self.split}/{self.name}.tar"

    @property
    def is_copy(self) -> bool:
        return bool(self.copy_from)


@dataclass
class Plan:
    # shards of the last version that stay (the same objects; ``dropped`` updated where members left)
    keep: list[ShardInfo] = field(default_factory=list)
    build: list[ShardPlan] = field(default_factory=list)  # shards to make: transcoded, or copied (compaction)
    removed: list[str] = field(default_factory=list)  # video ids of the last version gone from the manifest
    changed: list[str] = field(default_factory=list)  # video ids whose source or clip bounds changed: transcoded
    relabelled: list[str] = field(default_factory=list)  # ids whose labels alone changed: copied, new metadata
    held: list[str] = field(default_factory=list)  # live ids whose source is missing now: kept as they were
    entry_digests: dict[str, str] = field(default_factory=dict)  # every source's ``entry_digest``, by video id
    dropped: int = 0  # members of the last version's shards dropped by this plan (deleted, changed, moved)
    compacted: list[str] = field(default_factory=list)  # urls of last-version shards repacked by copy shards

    @property
    def is_noop(self) -> bool:
        return not self.build and not self.removed and not self.dropped

    def summary(self) -> dict[str, Any]:
        made = [s for s in self.build if not s.is_copy]
        copies = [s for s in self.build if s.is_copy]
        return {"keep_shards": len(self.keep), "build_shards": len(made),
                "build_videos": sum(len(s.sources) for s in made), "removed_videos": len(self.removed),
                "changed_videos": len(self.changed), "relabelled_videos": len(self.relabelled),
                "held_videos": len(self.held), "dropped_videos": self.dropped,
                "compacted_shards": len(self.compacted), "copy_shards": len(copies),
                "copy_videos": sum(len(s.sources) for s in copies)}


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


def entry_digest(entry: ManifestEntry) -> str:
    """What a video's manifest entry puts into its sample, as 24 hex digits: 12 for the clip (split, start,
    end: the transcoded bytes) and 12 for its labels (label, label name: the metadata only). Recorded per video
    in the index (``entry_digests``), so a relabel or new clip bounds with the same source bytes is a change;
    the halves tell a relabel (copied with new metadata) from new bounds (transcoded again). 3.5 us a video
    (4 s at 1.2M), computed once per run (``Plan.entry_digests``)."""
    s, e = entry.start, entry.end
    bounds = f"{entry.split}\0{'' if s is None else repr(float(s))}\0{'' if e is None else repr(float(e))}"
    labels = f"{_plain(entry.label)!r}\0{_plain(entry.label_name)!r}"
    return (hashlib.blake2b(bounds.encode(), digest_size=6).hexdigest()
            + hashlib.blake2b(labels.encode(), digest_size=6).hexdigest())


def _plain(value: Any) -> Any:
    """A label or label name with tuples and lists alike (a multi-label entry's labels are a tuple; read back
    from JSON, a list)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def _mix(video_id: str) -> str:
    return hashlib.sha256(video_id.encode()).hexdigest()


def make_plan(sources: list[Source], preprocessing: dict[str, Any], samples_per_shard: int,
              last: DatasetIndex | None = None, *, limits: Any = None,
              labels: tuple[list[str], bool] | None = None, compact_below: float = 0.5,
              missing: Iterable[str] = ()) -> Plan:
    """Plan the next version from all current sources and (optionally) the last committed index. Videos
    the last version quarantined for their content are not retried while their source (and the decode
    limit that refused them, under ``limits``) is unchanged; transient failures are retried. ``labels``:
    the new version's (classes, multi_label); when it differs from the last version's, its shards' label
    indices mean other classes and none is kept (None: not compared). ``compact_below``: a kept shard whose
    live members fall below this fraction of its samples is repacked by copying (0: never). ``missing``: ids
    the manifest lists whose source cannot be found or read now; a live one stays as it was (not deleted)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: expected >= 1")
    if not 0 <= compact_below <= 1:
        raise ValueError(f"compact_below={compact_below}: expected a fraction in [0, 1]")
    by_id = {s.entry.video_id: s for s in sources}
    if len(by_id) != len(sources):
        seen: set[str] = set()
        dup = sorted({i for s in sources if (i := s.entry.video_id) in seen or seen.add(i)})[:5]
        raise ValueError(f"duplicate video ids in the manifest: {dup}")
    plan = Plan(entry_digests={k: entry_digest(s.entry) for k, s in by_id.items()})
    pending: set[str] = set(by_id)
    same_labels = labels is None or last is None or (list(labels[0]), labels[1]) == (last.classes, last.multi_label)
    copies: list[tuple[ShardInfo, list[str]]] = []
    missing = set(missing) - by_id.keys()
    if last is not None and last.preprocessing == preprocessing and same_labels:
        copies = _diff(plan, last, by_id, pending, limits, compact_below, missing)
    elif last is not None:  # nothing is kept: still say which videos left the manifest
        plan.removed = sorted(k for s in last.shards for k in s.live_keys() if k not in by_id and k not in missing)
    todo = sorted((by_id[i] for i in pending), key=lambda s: (s.entry.split, _mix(s.entry.video_id)))
    for split in sorted({s.entry.split for s in todo}):
        group = [s for s in todo if s.entry.split == split]
        for i in range(0, len(group), samples_per_shard):
            members = group[i:i + samples_per_shard]
            plan.build.append(ShardPlan(shard_name(members, preprocessing), split, members))
    _plan_copies(plan, copies, by_id, preprocessing, samples_per_shard)
    return plan


def _diff(plan: Plan, last: DatasetIndex, by_id: dict[str, Source], pending: set[str], limits: Any,
          compact_below: float, missing: set[str]) -> list[tuple[ShardInfo, list[str]]]:
    """Against the last version: which of its shards stay (with which members dropped), which are repacked
    (``plan.compacted``; returned with their survivors), and which videos are gone, changed or relabelled.
    A survivor is a live member whose source is present with the checksum, split and entry digest it was
    ingested with (an index without digests: the entry counts as unchanged), or a live member whose source is
    missing now (``missing``: held as it was; its shard is not compacted, which would need its source entry).
    A relabelled member (only the labels half of its digest differs) is dropped from its shard and copied from
    it with new metadata (returned with the copies). Survivors and relabelled members leave ``pending``;
    everything else in ``pending`` is transcoded."""
    old = last.source_checksums
    old_digests = last.entry_digests
    pending -= {k for k, q in last.quarantine.items() if k in by_id and is_permanent(q, by_id[k].sha256, limits)}
    last_live: set[str] = set()
    changed: list[str] = []
    copies: list[tuple[ShardInfo, list[str]]] = []
    for shard in last.shards:
        if not shard.keys:  # an index without member lists (none the ingest wrote): nothing to compare
            plan.keep.append(shard)
            continue
        gone = set(shard.dropped)
        survivors, relabelled, held = [], [], False
        for k in shard.keys:
            if k in gone:
                continue
            last_live.add(k)
            s = by_id.get(k)
            if s is None:
                if k in missing:  # listed, its source unreadable now: not a deletion, kept as it was
                    survivors.append(k)
                    plan.held.append(k)
                    held = True
                continue
            if s.sha256 != old.get(k) or s.entry.split != shard.split:
                if s.sha256 != old.get(k):
                    changed.append(k)
                continue
            was = old_digests.get(k)
            now = plan.entry_digests[k]
            if was is None or was == now:
                survivors.append(k)
            elif was[:12] == now[:12]:  # the same clip, other labels: its bytes are copied, new metadata
                relabelled.append(k)
            else:  # other clip bounds: transcoded again
                changed.append(k)
        if not survivors and not relabelled:  # nothing left: the shard leaves the index
            plan.dropped += len(shard.keys) - len(gone)
            continue
        pending.difference_update(survivors)
        pending.difference_update(relabelled)
        plan.relabelled.extend(relabelled)
        newly = len(shard.keys) - len(gone) - len(survivors)
        plan.dropped += newly
        if not survivors or (not held and len(survivors) < compact_below * shard.samples):
            if survivors:
                plan.compacted.append(shard.url)
            take = set(survivors) | set(relabelled)
            copies.append((shard, [k for k in shard.keys if k in take]))
            continue
        if newly:
            alive = set(survivors)
            plan.keep.append(replace(shard, dropped=[k for k in shard.keys if k not in alive]))
        else:
            plan.keep.append(shard)
        if relabelled:
            copies.append((shard, relabelled))
    plan.removed = sorted(k for k in last_live if k not in by_id and k not in missing)
    plan.changed = sorted(changed)
    plan.relabelled.sort()
    plan.held.sort()
    return copies


def _plan_copies(plan: Plan, copies: list[tuple[ShardInfo, list[str]]], by_id: dict[str, Source],
                 preprocessing: dict[str, Any], samples_per_shard: int) -> None:
    """The survivors of repacked shards, in their shards' order, cut into copy shards of up to
    ``samples_per_shard`` per split (several sparse shards become one). A copy shard's name covers its
    members (ids, checksums, entries), the preprocessing and the shards it copies from."""
    by_split: dict[str, list[tuple[ShardInfo, str]]] = {}
    for shard, keys in copies:
        by_split.setdefault(shard.split, []).extend((shard, k) for k in keys)
    for split in sorted(by_split):
        items = by_split[split]
        for i in range(0, len(items), samples_per_shard):
            chunk = items[i:i + samples_per_shard]
            copy_from: list[tuple[ShardInfo, list[str]]] = []
            for shard, k in chunk:
                if not copy_from or copy_from[-1][0] is not shard:
                    copy_from.append((shard, []))
                copy_from[-1][1].append(k)
            members = [by_id[k] for _, k in chunk]
            name = shard_name(members, {**preprocessing, "copied_from": [s.sha256 for s, _ in copy_from]})
            plan.build.append(ShardPlan(name, split, members, copy_from))
