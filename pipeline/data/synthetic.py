"""Real encoded videos with known labels, for tests, the demo and the attention-scheme comparison.

Three kinds of class:

* ``motion`` (needs time): a textured square drifts over a textured background in one of four
  directions. The square and the background are cut from the same kind of noise and the start
  position is random, so one frame cannot tell the class; the order of frames can.
* ``order`` (needs time; the demo's task): a still square changes colour once, part-way through
  (red then blue, blue then red, green then yellow, yellow then green). Any frame shows one of two
  colours that both classes of a pair share, and a clip holds both colours in like proportions
  whichever came first: only the order of frames tells the class. A model that averages per-frame
  features (space-only attention) can find the pair, not the order: 50% at best.
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
    """A still square on texture whose colour switches once, at a random frame in the middle third. The
    switch is spread symmetrically about the middle, so neither colour fills more of the video on average:
    the share of each colour in a clip says nothing about which came first."""
    first, _, second = label.partition("_then_")
    s, n, q = spec.size, spec.num_frames, spec.square
    frames = np.repeat(_texture(rng, s, s)[None], n, axis=0)
    y, x = (int(v) for v in rng.integers(0, s - q + 1, size=2))
    lo = max(1, int(0.35 * n))
    switch = int(rng.integers(lo, n - lo + 1))  # frames [0, switch) show the first colour
    frames[:switch, y:y + q, x:x + q] = _COLOURS[first]
    frames[switch:, y:y + q, x:x + q] = _COLOURS[second]
    return frames


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
    Videos already there (same name) are kept, so a rerun is quick."""
    from tqdm import tqdm

    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    per_class = per_class or {"train": 8, "val": 2}
    rows = []
    n = 0
    total = sum(per_class.values()) * len(classes(kind))
    bar = tqdm(total=total, unit="video", desc=f"synthetic {kind} videos", disable=not progress)
    for split, count in per_class.items():
        for label in classes(kind):
            for _ in range(count):
                vid = f"{kind}{n:05d}"
                path = root / "videos" / f"{vid}.mp4"
                if not path.exists():
                    path.write_bytes(make_video(kind, label, seed * 100003 + n, spec))
                rows.append({"label": label, "youtube_id": vid, "time_start": 0,
                             "time_end": round(spec.num_frames / spec.fps, 3), "split": split})
                n += 1
                bar.update(1)
    bar.close()
    csv_path = root / "annotations.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "youtube_id", "time_start", "time_end", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
