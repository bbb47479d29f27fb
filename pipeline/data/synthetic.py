"""Real encoded videos with known labels, for tests, the demo and the attention-scheme comparison.

Three kinds of class:

* ``motion`` (needs time): a textured square drifts over a textured background in one of four
  directions. The square and the background are cut from the same kind of noise and the start
  position is random, so one frame cannot tell the class; the order of frames can.
* ``order`` (needs time; the demo's task): a still square changes colour once, part-way through
  (red then blue, blue then red, green then yellow, yellow then green). Any frame shows one of two
  colours that both classes of a pair share, and (with ``balanced_order_spec`` for the sampler in
  use) a clip holds both colours in like proportions whichever came first: only the order of frames
  tells the class. A model that averages per-frame features (space-only attention) can find the
  pair, not the order: 50% at best.
* ``colour`` (needs only space): a still square whose colour is the class; any frame tells.

Each video is an H.264 mp4 in memory; ``make_corpus`` writes a directory of them with a CSV of
labels in the Kinetics annotation format (label, youtube_id, time_start, time_end, split).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.video import encode_video

MOTION_CLASSES = ("moving_left", "moving_right", "moving_up", "moving_down")
COLOUR_CLASSES = ("red", "green", "blue", "yellow")
_DIRECTIONS = {"moving_left": (0, -1), "moving_right": (0, 1), "moving_up": (-1, 0), "moving_down": (1, 0)}
_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230), "yellow": (230, 220, 40)}
ORDER_CLASSES = ("red_then_blue", "blue_then_red", "green_then_yellow", "yellow_then_green")


@dataclass(frozen=True)
class SyntheticSpec:
    size: int = 64
    num_frames: int = 32
    fps: float = 16.0
    square: int = 20
    speed: float = 1.0  # pixels per frame
    square_style: str = "texture"  # texture: cut from the background's noise; solid: a bright square
    # order: where the colour switches, as a fraction of the video (the middle of the spread); see
    # switch_center_for, which balances the two colours over the clips a sampler takes
    switch_center: float = 0.5


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    coarse = rng.integers(40, 215, size=(h // 4 + 1, w // 4 + 1, 3))
    return np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)[:h, :w].astype(np.uint8)


def motion_frames(label: str, rng: np.random.Generator, spec: SyntheticSpec = SyntheticSpec()) -> np.ndarray:
    dy, dx = _DIRECTIONS[label]
    s, n = spec.size, spec.num_frames
    background, patch = _texture(rng, s, s), _texture(rng, spec.square, spec.square)
    if spec.square_style == "solid":
        patch = np.full_like(patch, 250)
    travel = int(round(spec.speed * (n - 1)))
    lo, hi = 0, s - spec.square - travel
    y0 = int(rng.integers(0, s - spec.square + 1)) if dy == 0 else int(rng.integers(lo, hi + 1))
    x0 = int(rng.integers(0, s - spec.square + 1)) if dx == 0 else int(rng.integers(lo, hi + 1))
    if dy < 0:
        y0 += travel
    if dx < 0:
        x0 += travel
    frames = np.repeat(background[None], n, axis=0)
    for t in range(n):
        y, x = int(round(y0 + dy * spec.speed * t)), int(round(x0 + dx * spec.speed * t))
        frames[t, y:y + spec.square, x:x + spec.square] = patch
    return frames


def colour_frames(label: str, rng: np.random.Generator, spec: SyntheticSpec = SyntheticSpec()) -> np.ndarray:
    s = spec.size
    frame = _texture(rng, s, s)
    y, x = (int(v) for v in rng.integers(0, s - spec.square + 1, size=2))
    frame[y:y + spec.square, x:x + spec.square] = _COLOURS[label]
    return np.repeat(frame[None], spec.num_frames, axis=0)


def order_frames(label: str, rng: np.random.Generator, spec: SyntheticSpec = SyntheticSpec()) -> np.ndarray:
    """A still square on texture whose colour switches once. The switch frame is spread uniformly and
    symmetrically about ``spec.switch_center`` (over about 30% of the video), so that over the clips a
    sampler takes, neither colour shows more often: the colours' shares in a clip say nothing about
    which came first. Raises ValueError when no symmetric spread exists (the centre is not on a frame
    boundary or half-way between two)."""
    first, _, second = label.partition("_then_")
    s, n, q = spec.size, spec.num_frames, spec.square
    lo, hi = switch_range(spec)
    frames = np.repeat(_texture(rng, s, s)[None], n, axis=0)
    y, x = (int(v) for v in rng.integers(0, s - q + 1, size=2))
    switch = int(rng.integers(lo, hi + 1))  # frames [0, switch) show the first colour
    frames[:switch, y:y + q, x:x + q] = _COLOURS[first]
    frames[switch:, y:y + q, x:x + q] = _COLOURS[second]
    return frames


def switch_range(spec: SyntheticSpec) -> tuple[int, int]:
    """First and last switch frame of ``order`` videos: symmetric about ``switch_center * num_frames``."""
    n, c2 = spec.num_frames, 2 * spec.switch_center * spec.num_frames
    if abs(c2 - round(c2)) > 1e-6:
        raise ValueError(f"switch_center={spec.switch_center} x {n} frames = {c2 / 2:g}: the switch can only be "
                         "spread symmetrically about a frame boundary or half-way between two; pick a centre "
                         "whose double is a whole number of frames")
    c2 = int(round(c2))
    lo = c2 // 2 - max(1, round(0.15 * n))
    hi = c2 - lo
    if lo < 1 or hi > n - 1:
        raise ValueError(f"switch_center={spec.switch_center}: the switch spread [{lo}, {hi}] leaves the video "
                         f"(1..{n - 1}); move the centre towards the middle")
    return lo, hi


def switch_center_for(step_s: float, duration_s: float) -> float:
    """The ``switch_center`` that balances the colours over a fixed-rate sampler's clips: clips start
    anywhere in [0, duration - clip] and their frames, ``step_s`` apart, reach ``duration - step_s`` (the
    original's convention: a clip spans num_frames x rate frames), so the stretch sampled, evenly, is
    [0, duration - step_s]: its middle."""
    return (duration_s - step_s) / 2 / duration_s


def balanced_order_spec(step_s: float, seconds: float = 2.0, fps: float = 15.0, **fields) -> SyntheticSpec:
    """A spec for ``order`` videos whose colours are balanced under a fixed-rate sampler taking a frame
    every ``step_s`` seconds (the demo: 8 frames every 6 at 30 fps, so 0.2 s): ``seconds`` long at ``fps``,
    the switch spread about ``switch_center_for``. The frame rate must put that centre on a frame boundary
    or half-way (15 fps with a 0.2 s step: 13.5 of 30 frames)."""
    spec = SyntheticSpec(num_frames=int(round(seconds * fps)), fps=fps,
                         switch_center=switch_center_for(step_s, seconds), **fields)
    switch_range(spec)  # refuses a geometry that cannot be balanced
    return spec


def make_video(kind: str, label: str, seed: int, spec: SyntheticSpec = SyntheticSpec(),
               keyframe_interval: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "motion":
        frames = motion_frames(label, rng, spec)
    elif kind == "order":
        frames = order_frames(label, rng, spec)
    elif kind == "colour":
        frames = colour_frames(label, rng, spec)
    else:
        raise ValueError(f"kind={kind!r}: expected motion, order or colour")
    return encode_video(frames, spec.fps, keyframe_interval=keyframe_interval)


def classes(kind: str) -> tuple[str, ...]:
    if kind not in ("motion", "order", "colour"):
        raise ValueError(f"kind={kind!r}: expected motion, order or colour")
    return {"motion": MOTION_CLASSES, "order": ORDER_CLASSES, "colour": COLOUR_CLASSES}[kind]


def make_corpus(root: str | Path, kind: str = "motion", per_class: dict[str, int] | None = None,
                spec: SyntheticSpec = SyntheticSpec(), seed: int = 0, progress: bool = False) -> Path:
    """Write ``<root>/videos/<id>.mp4`` and ``<root>/annotations.csv`` (Kinetics format); returns the CSV.
    Videos already there (same name) are kept, so a rerun is quick, unless they were made with another
    spec, seed or counts (recorded in ``<root>/spec-<kind>.json``; a video's id fixes its label only for
    given counts): then they are made again."""
    import json
    from dataclasses import asdict

    from tqdm import tqdm

    root = Path(root)
    per_class = per_class or {"train": 8, "val": 2}
    (root / "videos").mkdir(parents=True, exist_ok=True)
    record = root / f"spec-{kind}.json"
    wanted = json.dumps({"spec": asdict(spec), "seed": seed, "per_class": per_class}, sort_keys=True)
    remake = not record.exists() or record.read_text() != wanted
    record.unlink(missing_ok=True)  # written again once every video matches it
    rows = []
    n = 0
    total = sum(per_class.values()) * len(classes(kind))
    bar = tqdm(total=total, unit="video", desc=f"synthetic {kind} videos", disable=not progress)
    for split, count in per_class.items():
        for label in classes(kind):
            for _ in range(count):
                vid = f"{kind}{n:05d}"
                path = root / "videos" / f"{vid}.mp4"
                if remake or not path.exists():
                    path.write_bytes(make_video(kind, label, seed * 100003 + n, spec))
                rows.append({"label": label, "youtube_id": vid, "time_start": 0,
                             "time_end": round(spec.num_frames / spec.fps, 3), "split": split})
                n += 1
                bar.update(1)
    bar.close()
    record.write_text(wanted)
    csv_path = root / "annotations.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "youtube_id", "time_start", "time_end", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
