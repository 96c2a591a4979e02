"""Pathfinder: are the two dots joined by one dashed contour? (LRA "Pathfinder", Tay et al.
2021, arXiv:2011.04006, section 3.5; the task of Linsley et al. 2018, "Learning long-range
spatial dependencies with horizontal gated recurrent units", NeurIPS, and Kim et al. 2020,
"Disentangling neural mechanisms for perceptual grouping", ICLR).

The image is flattened row-major into one token per pixel, token = intensity + 1 (0 is
padding): a 32x32 image is 1024 tokens, two classes (1 = connected). Sources:

* ``generated`` (offline default): a seeded port (own code) of the snakes generator
  (github.com/drewlinsley/pathfinder, ``snakes2.py``). Two target contours start
  ``seed_distance`` apart near the centre and grow alternately one paddle (a short line)
  at a time: each paddle starts a gap after the previous one ends, turned by an angle drawn
  with weight ``cos(min(|turn| * continuity, 90 deg))**2`` (turns stay below 90/continuity
  degrees) among the turns that keep clear of everything drawn; a dead end takes back a
  few paddles, then restarts the image. One dot marks the start of one target, the other
  the end of the same target (label 1) or of the other one (label 0); then distractor
  contours fill the space (as many as fit; LRA lets them fall short too). Paddles are one
  pixel wide at intensity 191, dots 255; labels are exactly balanced per split.
  ``dot_distance=matched`` (default; a deviation from LRA's generator): in LRA's generator
  the two dots of a positive (the two ends of one contour) lie closer together than those of
  a negative (ends of two contours that start ``seed_distance`` apart), so the distance
  between the dots alone classifies: measured at the small preset, a threshold on it scores
  0.70 where softmax scored 0.60. Here images are drawn with alternating labels and a
  positive is kept only together with a negative whose dots' centroids are exactly as far
  apart (to 0.01 px), so both classes share one distribution of dot distances and the
  dot-distance baseline falls to chance: what is left to find is the contour. Draws that
  find no partner are discarded (counted, logged); ``dot_distance=free`` is LRA's.
  Pixels of different contours are at least ``clearance`` apart (Chebyshev) while a gap
  inside a contour spans at most ``link < clearance``: in the rendered image the dots are
  linked by steps of at most ``link`` pixels exactly when the label is 1.
  Sizes follow LRA's pathfinder32 / 64 / 128 arguments (margin 1 / 1 / 2, dot radius 1.5 /
  2.5 / 3, seed distance 7 / 12 / 20, continuity 1.0 / 1.8 / 1.8, paddle length 2 at 32 and
  the generator's default 5 above, ``20 / 22 / 35 // distractor_length`` distractors of
  ``contour_length // 3`` paddles); ``difficulty`` sets the target length as in the release:
  easy (``curv_baseline``) 6, intermediate 9, hard 14 paddles. Not ported: antialiasing,
  paddle thickness above one pixel, contrast jitter, LRA's single-paddle clutter.
* ``lra``: LRA's release, ``lra_release/pathfinder32/<difficulty folder>/``:
  ``metadata/<n>.npy`` are text files whose space-separated rows read ``imgs/<n>
  sample_<k>.png <k> <label> ...`` (LRA's TFDS builder uses fields 0, 1 and 3; a real
  NumPy array of such rows, as ``snakes2.py`` saves it, is read too), images
  ``imgs/<n>/sample_<k>.png``, grayscale PNG. Empty image files (the release has one) are
  skipped, counted and logged, as LRA's pipeline filters them. Split 80/10/10 in metadata
  order, as LRA's ``[:80%]`` / ``[80%:90%]`` / ``[90%:]``.

``python -m harness tool pathfinder-generate data_dir=DIR ...`` writes the generated source in the
release's layout (read back with ``task.source=lra task.data_dir=DIR``).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.core import register_task
from harness.data.task import DataSourceError, MalformedRecord, Task, decode_text, files_under

log = logging.getLogger(__name__)

NUM_CLASSES = 2
VOCAB_SIZE = 257  # 256 intensities shifted by one + padding
PADDLE_INTENSITY, DOT_INTENSITY = 191, 255
DIFFICULTIES = {  # name: (folder of LRA's release, target contour length in paddles)
    "easy": ("curv_baseline", 6),
    "intermediate": ("curv_contour_length_9", 9),
    "hard": ("curv_contour_length_14", 14),
}
DOT_DISTANCES = ("matched", "free")  # generated: classes with one distribution of dot distances, or LRA's
SPLIT_FRACTIONS = (0.8, 0.9)  # LRA: [:80%], [80%:90%], [90%:]
NUM_DIRECTIONS = 36  # paddle orientations, 10 degrees apart
NPY_MAGIC = b"\x93NUMPY"
RELEASE_HINT = (
    "Download LRA's release (lra_release.gz, linked from github.com/google-research/long-range-arena), "
    "unpack it and set task.data_dir to its pathfinder32 folder (curv_baseline/, curv_contour_length_9/, "
    "curv_contour_length_14/, each with metadata/ and imgs/)"
)


@dataclass
class PathfinderConfig:
    source: str = "generated"  # generated | lra
    data_dir: str = ""  # lra: the release's pathfinder<resolution> folder (or a folder holding it)
    difficulty: str = "hard"  # easy | intermediate | hard: target contours of 6 / 9 / 14 paddles
    resolution: int = 32  # image side (LRA: 32; Path-X: 128); max_len must be resolution ** 2
    max_len: int = 1024
    contour_length: int = 0  # generated: paddles per target contour (0: the difficulty's)
    distractor_length: int = 0  # generated: paddles per distractor (0: contour_length // 3, as LRA)
    num_distractors: int = -1  # generated: distractor contours (-1: LRA's budget // distractor_length)
    continuity: float = 0.0  # generated: turn weight cos(min(|turn| * continuity, 90 deg))^2 (0: LRA's)
    # generated: matched (each positive paired with a negative whose dots are as far apart) | free (LRA's)
    dot_distance: str = "matched"
    num_train: int = 160000  # generated: images per split (LRA: 200,000, 80/10/10); lra: a cap (0 = all)
    num_val: int = 20000
    num_test: int = 20000
    data_seed: int = 0  # generated: the images


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Pixel sizes at one resolution; ``link`` and ``clearance`` are Chebyshev distances."""

    resolution: int
    paddle_length: float
    margin: int  # LRA's paddle margin: empty pixels between consecutive paddles
    dot_radius: float
    seed_distance: float  # between the starts of the two targets
    continuity: float
    distractor_budget: int  # distractor paddles (LRA: num_distractor_snakes = budget // length)
    border: int = 1  # empty frame (LRA: padding 1)
    link: int = 0  # the largest pixel step across a gap inside a contour
    clearance: int = 0  # the smallest pixel distance between two contours

    @property
    def paddle_gap(self) -> float:
        """From the end of a paddle to the start of the next: rounded to pixels, a margin of
        1 leaves exactly one empty pixel in every direction."""
        return self.margin + 1.125


LRA_GEOMETRY = {  # resolution: paddle length, margin (empty pixels), dot radius, seed distance, continuity, budget
    32: (2.0, 1, 1.5, 7.0, 1.0, 20),
    64: (5.0, 1, 2.5, 12.0, 1.8, 22),
    128: (5.0, 2, 3.0, 20.0, 1.8, 35),
}


def make_geometry(resolution: int) -> Geometry:
    """LRA's sizes for the largest of its resolutions not above ``resolution`` (32 below 32)."""
    known = max([r for r in LRA_GEOMETRY if r <= resolution] or [min(LRA_GEOMETRY)])
    geo = Geometry(resolution, *LRA_GEOMETRY[known])
    link = max(int(np.abs(np.rint(geo.paddle_gap * _unit(d))).max()) for d in range(NUM_DIRECTIONS))
    return dataclasses.replace(geo, link=link, clearance=link + 1)


def _unit(direction: int) -> np.ndarray:
    """(dy, dx) of a direction index; rows grow downwards."""
    angle = 2 * math.pi * direction / NUM_DIRECTIONS
    return np.array([math.sin(angle), math.cos(angle)])


def _disc(radius: float) -> np.ndarray:
    r = int(math.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = yy**2 + xx**2 <= radius**2 + 1e-9
    return np.stack([yy[keep], xx[keep]], axis=1)


def _near(offsets: np.ndarray, radius: int) -> np.ndarray:
    """The pixels within Chebyshev distance ``radius`` of ``offsets`` (N, 2)."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    box = np.stack([yy.ravel(), xx.ravel()], axis=1)
    return np.unique((offsets[:, None, :] + box[None, :, :]).reshape(-1, 2), axis=0)


class Stencils:
    """Flat pixel offsets on a padded canvas, per direction: the pixels of a first paddle
    (``seed``, from the contour's start) and of a following one (``paddle``, a gap after the
    last end), the pixels within ``clearance - 1`` of them (``*_near``) and the step to their
    last pixel. Rows are padded by repeating their first offset, so one gather checks every
    candidate direction."""

    def __init__(self, geo: Geometry):
        self.geo = geo
        self.pad = int(math.ceil(geo.paddle_gap + geo.paddle_length + geo.dot_radius)) + geo.clearance + 2
        self.width = geo.resolution + 2 * self.pad
        along = np.linspace(0.0, geo.paddle_length, int(math.ceil(2 * geo.paddle_length)) + 1)  # half-pixel steps
        for kind, start in (("seed", 0.0), ("paddle", geo.paddle_gap)):
            rows = [
                np.rint((start + along)[:, None] * _unit(d)[None, :]).astype(np.int64) for d in range(NUM_DIRECTIONS)
            ]
            setattr(self, kind, self._pack(rows))
            setattr(self, f"{kind}_near", self._pack([_near(r, geo.clearance - 1) for r in rows]))
            setattr(self, f"{kind}_step", self._flat(np.stack([r[-1] for r in rows])))
        dot = _disc(geo.dot_radius)
        self.dot, self.dot_near = self._flat(dot), self._flat(_near(dot, geo.clearance - 1))
        self.dot_span = int(math.floor(geo.dot_radius))
        inside = np.zeros((2, self.width, self.width), dtype=bool)
        lo, hi = self.pad + geo.border, self.pad + geo.resolution - geo.border
        inside[0, lo:hi, lo:hi] = True  # where paddles may go
        inside[1, self.pad : self.pad + geo.resolution, self.pad : self.pad + geo.resolution] = True  # the image
        self.inside, self.in_image = inside.reshape(2, -1)

    def _flat(self, offsets: np.ndarray) -> np.ndarray:
        return offsets[..., 0] * self.width + offsets[..., 1]

    def _pack(self, rows: list[np.ndarray]) -> np.ndarray:
        size = max(len(r) for r in rows)
        return np.stack([self._flat(np.concatenate([r, np.repeat(r[:1], size - len(r), axis=0)])) for r in rows])

    def flat_of(self, y: int, x: int) -> int:
        return (y + self.pad) * self.width + (x + self.pad)

    def crop(self, canvas: np.ndarray) -> np.ndarray:
        r = self.geo.resolution
        return canvas.reshape(self.width, self.width)[self.pad : self.pad + r, self.pad : self.pad + r].copy()


# ----------------------------------------------------------------------------- generator


class PlacementFailed(Exception):
    """A paddle or a dot found no free room."""


@dataclass
class Contour:
    """A contour being drawn, piece by piece: pixels and clearance zone (flat indices),
    and the end pixel and direction after each paddle."""

    pixels: list[np.ndarray] = field(default_factory=list)
    zones: list[np.ndarray] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    directions: list[int] = field(default_factory=list)


class SnakesGenerator:
    """Seeded contour images and their labels (see the module docstring).

    ``zone`` counts, per canvas pixel, the drawn pieces (paddles, dots) whose clearance
    covers it, and is large outside the image. A paddle may go where the count is zero once
    the previous paddle of its own contour is discounted: it stays ``clearance`` away from
    every other contour and from the older paddles of its own."""

    WALL = 1 << 20

    def __init__(
        self,
        geo: Geometry,
        *,
        contour_length: int,
        distractor_length: int,
        num_distractors: int,
        continuity: float,
        match_dot_distance: bool = False,
        max_restarts: int = 1000,
        distractor_tries: int = 10,
        match_tries: int = 20,
        match_pool: int = 64,
    ):
        if not (1 <= contour_length and 1 <= distractor_length and 0 <= num_distractors):
            raise ValueError("contour_length and distractor_length must be >= 1, num_distractors >= 0")
        if continuity <= 0:
            raise ValueError(f"continuity={continuity} must be > 0")
        self.geo, self.stencils, self.continuity = geo, Stencils(geo), continuity
        self.contour_length, self.distractor_length, self.num_distractors = (
            contour_length,
            distractor_length,
            num_distractors,
        )
        self.max_restarts, self.distractor_tries = max_restarts, distractor_tries
        self.match_dot_distance, self.match_tries, self.match_pool = match_dot_distance, match_tries, match_pool
        turns = np.arange(NUM_DIRECTIONS) - NUM_DIRECTIONS // 2  # in direction steps
        weight = np.cos(np.minimum(np.abs(turns) * (2 * math.pi / NUM_DIRECTIONS) * continuity, math.pi / 2)) ** 2
        keep = weight > 1e-9
        self.turn_weight = weight[keep]
        self.next_direction = (np.arange(NUM_DIRECTIONS)[:, None] + turns[keep][None, :]) % NUM_DIRECTIONS
        self.next_paddle = self.stencils.paddle[self.next_direction]  # (direction, candidate, pixel)
        self.restarts = 0  # images started again
        self.missing_distractors = 0  # distractors that found no room
        self.unmatched = 0  # matched dot distances: images drawn but left without a partner

    # -- pieces ------------------------------------------------------------------------------
    @staticmethod
    def _draw(zone, contour: Contour, pixels, near, end: int, direction: int) -> None:
        zone[near] += 1  # a fancy-index += adds once per distinct pixel, as the -= below
        contour.pixels.append(pixels)
        contour.zones.append(near)
        contour.ends.append(end)
        contour.directions.append(direction)

    @staticmethod
    def _undo(zone, contour: Contour) -> None:
        zone[contour.zones.pop()] -= 1
        contour.pixels.pop(), contour.ends.pop(), contour.directions.pop()

    def _seed(self, rng, zone, start: int) -> Contour:
        """A contour whose first paddle starts at the pixel ``start``, in a free direction."""
        s = self.stencils
        free = np.flatnonzero(~(zone[start + s.seed] > 0).any(axis=1))
        if not free.size:
            raise PlacementFailed
        d = int(free[rng.integers(free.size)])
        contour = Contour()
        self._draw(zone, contour, start + s.seed[d], start + s.seed_near[d], start + int(s.seed_step[d]), d)
        return contour

    def _extend(self, rng, zone, contour: Contour) -> None:
        """One more paddle, a gap after the last one, turned with the continuity weights."""
        s, end, direction = self.stencils, contour.ends[-1], contour.directions[-1]
        pixels = end + self.next_paddle[direction]  # (candidate, pixel)
        zone[contour.zones[-1]] -= 1  # the previous paddle of this contour may be near
        free = ~(zone[pixels] > 0).any(axis=1)
        zone[contour.zones[-1]] += 1
        cdf = np.cumsum(self.turn_weight * free)
        if cdf[-1] <= 0:
            raise PlacementFailed
        pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        d = int(self.next_direction[direction, pick])
        self._draw(zone, contour, pixels[pick], end + s.paddle_near[d], end + int(s.paddle_step[d]), d)

    def _grow(self, rng, zone, contours: list[Contour], length: int, dead_ends: int = 8) -> None:
        """Extend the contours in turn to ``length`` paddles. The k-th dead end takes back
        the contour's last 2**(k-1) paddles (never the first); the ``dead_ends``-th fails."""
        failures = 0
        while any(len(c.ends) < length for c in contours):
            for contour in contours:
                if len(contour.ends) >= length:
                    continue
                try:
                    self._extend(rng, zone, contour)
                except PlacementFailed:
                    failures += 1
                    if failures >= dead_ends or len(contour.ends) < 2:
                        raise
                    for _ in range(min(2 ** (failures - 1), len(contour.ends) - 1)):
                        self._undo(zone, contour)

    def _dot(self, zone, tip: int, other: Contour) -> np.ndarray:
        """The dot's pixels around ``tip`` (clipped to the image), if clear of ``other``."""
        s, width = self.stencils, self.stencils.width
        dot = tip + s.dot
        dot = dot[s.in_image[dot]]
        theirs = np.concatenate(other.pixels)
        dy = np.abs(dot[:, None] // width - theirs[None] // width)
        dx = np.abs(dot[:, None] % width - theirs[None] % width)
        if np.maximum(dy, dx).min() < self.geo.clearance:
            raise PlacementFailed
        zone[tip + s.dot_near] += 1  # keeps distractors clear of the dot
        return dot

    # -- one image ---------------------------------------------------------------------------
    def _targets(self, rng, zone, label: int) -> tuple[list[Contour], list[np.ndarray]]:
        s, geo, r = self.stencils, self.geo, self.geo.resolution
        margin = min(int(round(2 * geo.seed_distance)), r // 2 - 2)  # LRA: starts 2 seed distances off the edges
        y0, x0 = (int(v) for v in rng.integers(margin, r - margin, size=2))
        angle = rng.random() * 2 * math.pi
        y1, x1 = round(y0 + geo.seed_distance * math.sin(angle)), round(x0 + geo.seed_distance * math.cos(angle))
        if not (0 <= y1 < r and 0 <= x1 < r):
            raise PlacementFailed
        starts = [s.flat_of(y0, x0), s.flat_of(y1, x1)]
        targets = [self._seed(rng, zone, start) for start in starts]
        self._grow(rng, zone, targets, self.contour_length)
        first = int(rng.integers(2))  # the target whose start gets a dot
        second = first if label == 1 else 1 - first  # the target whose end gets the other
        tip_a, tip_b = starts[first], targets[second].ends[-1]
        (ya, xa), (yb, xb) = divmod(tip_a, s.width), divmod(tip_b, s.width)
        if max(abs(ya - yb), abs(xa - xb)) < 2 * s.dot_span + 2:  # two separate discs
            raise PlacementFailed
        dots = []
        for tip, owner in ((tip_a, first), (tip_b, second)):
            dots.append(self._dot(zone, tip, targets[1 - owner]))
            targets[owner].pixels.append(dots[-1])
        return targets, dots

    def _distractor(self, rng, zone) -> Contour | None:
        """A short contour from a random free pixel (None when it finds no room)."""
        for _ in range(self.distractor_tries):
            free = np.flatnonzero(zone == 0)
            if not free.size:
                return None
            try:
                contour = self._seed(rng, zone, int(free[rng.integers(free.size)]))
            except PlacementFailed:
                continue
            try:
                self._grow(rng, zone, [contour], self.distractor_length)
                return contour
            except PlacementFailed:
                while contour.ends:
                    self._undo(zone, contour)
        return None

    def _distractors(self, rng, zone) -> list[Contour]:
        placed = [self._distractor(rng, zone) for _ in range(self.num_distractors)]
        self.missing_distractors += sum(c is None for c in placed)
        return [c for c in placed if c is not None]

    def image(self, rng: np.random.Generator, label: int) -> np.ndarray:
        """One uint8 (resolution, resolution) image whose dots are connected iff label == 1."""
        return self.image_and_dot_distance(rng, label)[0]

    def image_and_dot_distance(self, rng: np.random.Generator, label: int) -> tuple[np.ndarray, float]:
        """One image and the distance (pixels) between its two dots' centroids, the quantity
        the dot-distance baseline (``harness.report.baselines``) thresholds."""
        s = self.stencils
        for _ in range(self.max_restarts):
            zone = np.where(s.inside, 0, self.WALL).astype(np.int32)
            try:
                targets, dots = self._targets(rng, zone, label)
            except PlacementFailed:
                self.restarts += 1
                continue
            canvas = np.zeros(s.width * s.width, dtype=np.uint8)
            for contour in targets + self._distractors(rng, zone):
                for pixels in contour.pixels:
                    canvas[pixels] = PADDLE_INTENSITY
            for dot in dots:
                canvas[dot] = DOT_INTENSITY
            (ya, xa), (yb, xb) = (np.divmod(dot, s.width) for dot in dots)
            distance = math.hypot(ya.mean() - yb.mean(), xa.mean() - xb.mean())
            return s.crop(canvas), distance
        raise DataSourceError(
            f"pathfinder generator: no room for two contours of {self.contour_length} paddles at "
            f"{self.geo.resolution}x{self.geo.resolution} in {self.max_restarts} tries; shorten "
            f"task.contour_length or raise task.resolution"
        )

    def images(self, count: int, seed) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (count, r, r) images, int64 labels), labels balanced (an odd one out is 0)."""
        rng = np.random.default_rng(seed)
        labels = rng.permutation(np.arange(count) % 2).astype(np.int64)
        out = np.empty((count, self.geo.resolution, self.geo.resolution), dtype=np.uint8)
        if self.match_dot_distance:
            positives, negatives = self._matched(rng, int(labels.sum()), count - int(labels.sum()))
            out[labels == 1], out[labels == 0] = positives, negatives
            return out, labels
        for i, label in enumerate(labels):
            out[i] = self.image(rng, int(label))
        return out, labels

    def _matched(self, rng, n_positive: int, n_negative: int) -> tuple[np.ndarray, np.ndarray]:
        """Images drawn with alternating labels; a positive is kept only together with a
        negative whose dots are exactly as far apart (centroid distance to 0.01 px), so the two
        classes have one distribution of dot distances and the distance alone says nothing.
        An image waits in its class's pool for a partner (at most ``match_pool`` per distance);
        at most ``match_tries`` images are drawn per image kept."""
        pools: tuple[dict, dict] = ({}, {})  # label -> {distance: [images]}
        kept: tuple[list, list] = ([], [])
        label, drawn = 0, 0
        while len(kept[1]) < n_positive or len(kept[0]) < n_negative:
            if len(kept[1]) >= n_positive:  # an odd count's extra negative: any negative will do
                spare = next((waiting.pop() for waiting in pools[0].values() if waiting), None)
                kept[0].append(spare if spare is not None else self.image(rng, 0))
                continue
            if drawn >= self.match_tries * (n_positive + n_negative):
                raise DataSourceError(
                    f"pathfinder generator: {drawn} images drawn, {2 * len(kept[1])} of {n_positive + n_negative} "
                    f"kept with matched dot distances; the classes' dot distances barely overlap at these "
                    f"settings: set task.dot_distance=free (LRA's generator) or change the contour lengths"
                )
            image, distance = self.image_and_dot_distance(rng, label)
            drawn += 1
            key = round(distance, 2)
            partners = pools[1 - label].get(key)
            if partners:
                kept[label].append(image)
                kept[1 - label].append(partners.pop())
            elif len(waiting := pools[label].setdefault(key, [])) < self.match_pool:
                waiting.append(image)
            label = 1 - label
        self.unmatched += drawn - len(kept[0]) - len(kept[1])
        shape = (0, self.geo.resolution, self.geo.resolution)
        return tuple(np.stack(k) if k else np.empty(shape, dtype=np.uint8) for k in (kept[1], kept[0]))


def matches_dot_distance(cfg: PathfinderConfig) -> bool:
    if cfg.dot_distance not in DOT_DISTANCES:
        raise ValueError(f"task.dot_distance='{cfg.dot_distance}'; valid: {', '.join(DOT_DISTANCES)}")
    return cfg.dot_distance == "matched"


def generator_for(cfg: PathfinderConfig) -> SnakesGenerator:
    """The generator a config describes, LRA's defaults filled in."""
    geo = make_geometry(cfg.resolution)
    contour_length = cfg.contour_length or DIFFICULTIES[cfg.difficulty][1]
    distractor_length = cfg.distractor_length or max(1, contour_length // 3)
    num_distractors = cfg.num_distractors if cfg.num_distractors >= 0 else geo.distractor_budget // distractor_length
    return SnakesGenerator(
        geo,
        contour_length=contour_length,
        distractor_length=distractor_length,
        num_distractors=num_distractors,
        continuity=cfg.continuity or geo.continuity,
        match_dot_distance=matches_dot_distance(cfg),
    )


# ----------------------------------------------------------------------------- LRA's release


def release_folder(data_dir: str, resolution: int, difficulty: str) -> Path:
    """``<data_dir>/<difficulty folder>``, also found under ``pathfinder<resolution>/``."""
    if not data_dir:
        raise DataSourceError(f"task.source=lra needs task.data_dir. {RELEASE_HINT}")
    root, name = Path(data_dir), DIFFICULTIES[difficulty][0]
    for folder in (
        root / name,
        root / f"pathfinder{resolution}" / name,
        root / "lra_release" / f"pathfinder{resolution}" / name,
    ):
        if (folder / "metadata").is_dir():
            return folder
    raise DataSourceError(f"{root / name / 'metadata'} not found. {RELEASE_HINT}")


def metadata_files(folder: Path) -> list[Path]:
    files = sorted(
        (folder / "metadata").glob("*.npy"), key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem)
    )
    if not files:
        raise DataSourceError(f"{folder / 'metadata'} holds no *.npy metadata files. {RELEASE_HINT}")
    return files


def read_metadata(path: Path) -> list[tuple[int, str, str, int]]:
    """(line, image folder, image file, label) per row of a metadata file."""
    what = "a pathfinder metadata file (rows 'imgs/<n> sample_<k>.png <k> <label> ...')"
    blob = path.read_bytes()
    if blob.startswith(NPY_MAGIC):  # np.save of the rows, as snakes2.py writes them
        try:
            array = np.load(io.BytesIO(blob), allow_pickle=False)
        except Exception as exc:
            raise MalformedRecord(path, "file", f"a NumPy file that cannot be read: {exc}") from exc
        lines = [" ".join(str(v) for v in np.atleast_1d(row)) for row in np.atleast_2d(array)] if array.size else []
    else:  # text rows, as in LRA's release (LF; CRLF and a BOM are read too)
        lines = decode_text(path, blob, what=what).split("\n")
    if not any(line.strip() for line in lines):
        raise DataSourceError(f"{path} is empty; expected {what}")
    rows = []
    for line_no, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 4:
            raise MalformedRecord(
                path, line_no, f"expected >= 4 space-separated fields (folder, image, index, label), got {len(fields)}"
            )
        if fields[3] not in ("0", "1"):
            raise MalformedRecord(path, line_no, f"label {fields[3]!r} is not 0 or 1")
        rows.append((line_no, fields[0], fields[1], int(fields[3])))
    return rows


def read_png(path: Path, resolution: int, where: str) -> np.ndarray | None:
    """uint8 (r, r) grayscale pixels, or None for an empty file."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow comes with matplotlib
        raise DataSourceError("reading pathfinder PNG files needs Pillow (pip install pillow)") from exc
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise MalformedRecord(path, where, f"cannot be read: {exc.strerror or exc}") from exc
    if not blob:
        return None
    try:
        with Image.open(io.BytesIO(blob)) as image:
            pixels = np.asarray(image.convert("L"))
    except Exception as exc:
        raise MalformedRecord(path, where, f"not a readable image: {exc}") from exc
    if pixels.shape != (resolution, resolution):
        raise MalformedRecord(
            path,
            where,
            f"image is {pixels.shape[1]}x{pixels.shape[0]}, expected {resolution}x{resolution} (task.resolution)",
        )
    return pixels


def load_release(folder: Path, resolution: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(images, labels, empty files skipped) of one difficulty folder, in metadata order."""
    images, labels, empty = [], [], 0
    for meta in metadata_files(folder):
        for line_no, subdir, name, label in read_metadata(meta):
            pixels = read_png(
                folder / subdir / name, resolution, f"listed in {meta.parent.name}/{meta.name} line {line_no}"
            )
            if pixels is None:
                empty += 1
                continue
            images.append(pixels)
            labels.append(label)
    if not images:
        raise DataSourceError(f"{folder}: the metadata lists no readable image")
    return np.stack(images), np.asarray(labels, dtype=np.int64), empty


def write_release(
    folder: Path, images: np.ndarray, labels: np.ndarray, generator: SnakesGenerator, *, per_batch: int = 1000
) -> None:
    """Images and metadata in the release's layout (rows as ``snakes2.accumulate_meta``)."""
    from PIL import Image

    geo = generator.geo
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    for batch, start in enumerate(range(0, len(images), per_batch)):
        (folder / "imgs" / str(batch)).mkdir(parents=True, exist_ok=True)
        rows = []
        for k, (pixels, label) in enumerate(zip(images[start : start + per_batch], labels[start : start + per_batch])):
            Image.fromarray(pixels, mode="L").save(folder / "imgs" / str(batch) / f"sample_{k}.png")
            rows.append(
                f"imgs/{batch} sample_{k}.png {k} {int(label)} {generator.continuity:g} {generator.contour_length} "
                f"{generator.distractor_length} {geo.paddle_length:g} 1 {geo.margin} 1"
            )
        (folder / "metadata" / f"{batch}.npy").write_text("\n".join(rows) + "\n")


# ----------------------------------------------------------------------------- task


def to_dataset(images: np.ndarray, labels: np.ndarray):
    """A datasets.Dataset: ``input_ids`` = row-major intensity + 1 (int16), ``label``."""
    import datasets
    import pyarrow as pa

    n = len(images)
    tokens = images.reshape(n, -1).astype(np.int16) + 1
    offsets = pa.array(np.arange(0, tokens.size + 1, max(tokens.shape[1], 1), dtype=np.int32))
    input_ids = pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(tokens).ravel()))
    return datasets.Dataset(pa.table({"input_ids": input_ids, "label": pa.array(np.asarray(labels, dtype=np.int64))}))


GENERATOR_FIELDS = ("contour_length", "distractor_length", "num_distractors", "continuity", "dot_distance", "data_seed")


@register_task(
    "pathfinder",
    PathfinderConfig,
    sources=("generated", "lra"),
    scales={
        # CI: 16x16 = 256 tokens, short targets (3 paddles), two one-paddle distractors.
        "tiny": {
            "task": {
                "resolution": 16,
                "max_len": 256,
                "difficulty": "easy",
                "contour_length": 3,
                "distractor_length": 1,
                "num_distractors": 2,
                "num_train": 640,
                "num_val": 128,
                "num_test": 256,
            }
        },
        # 2 CPU cores, a minute or two: 16x16, targets of 3 paddles, no distractors.
        "small": {
            "task": {
                "resolution": 16,
                "max_len": 256,
                "difficulty": "easy",
                "contour_length": 3,
                "distractor_length": 1,
                "num_distractors": 0,
                "num_train": 16000,
                "num_val": 1000,
                "num_test": 2000,
            }
        },
        # scale=lra: harness/conf/protocol/<protocol>/pathfinder.yaml (protocol=lra, pytorch, nystromformer;
        # docs/protocols.md)
    },
)
class Pathfinder(Task):
    """Pathfinder (LRA): are two dots joined by a dashed contour? Pixels as a sequence, 2 classes."""

    head = "classifier"

    def __init__(self, cfg, *, scale: str = "tiny"):
        super().__init__(cfg, scale=scale)
        if cfg.difficulty not in DIFFICULTIES:
            raise ValueError(f"task.difficulty='{cfg.difficulty}'; valid: {', '.join(DIFFICULTIES)}")
        if cfg.resolution < 16:
            raise ValueError(f"task.resolution={cfg.resolution} must be at least 16")
        if cfg.max_len != cfg.resolution**2:
            raise ValueError(f"task.max_len={cfg.max_len} must be task.resolution**2 = {cfg.resolution**2}")
        matches_dot_distance(cfg)
        if not 0 <= cfg.contour_length < 255:
            raise ValueError(f"task.contour_length={cfg.contour_length} must lie in [0, 255)")

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    def cache_params(self):
        params = super().cache_params()
        if self.cfg.source == "generated":
            params.pop("data_dir")
        else:
            for key in GENERATOR_FIELDS:
                params.pop(key)
            params["data_dir"] = str(Path(self.cfg.data_dir).resolve())
        return params

    def source_files(self) -> list[Path]:
        cfg = self.cfg
        if cfg.source != "lra":
            return []
        try:
            folder = release_folder(cfg.data_dir, cfg.resolution, cfg.difficulty)
        except DataSourceError:  # build() says what is missing
            return []
        return files_under(folder / "metadata", "*.npy") + files_under(folder / "imgs")

    def build(self):
        import datasets

        parts = self._generate() if self.cfg.source == "generated" else self._read_release()
        for split, (_, labels) in parts.items():
            log.info(
                "pathfinder %s: %d images, %.1f%% connected",
                split,
                len(labels),
                100 * labels.mean() if len(labels) else 0,
            )
        return datasets.DatasetDict({split: to_dataset(x, y) for split, (x, y) in parts.items()})

    def _generate(self):
        cfg = self.cfg
        generator = generator_for(cfg)
        seeds = np.random.SeedSequence(cfg.data_seed).spawn(3)
        parts = {}
        for (split, count), seed in zip(
            (("train", cfg.num_train), ("validation", cfg.num_val), ("test", cfg.num_test)), seeds
        ):
            parts[split] = generator.images(count, seed)
        log.info(
            "pathfinder generator %dx%d: targets of %d paddles, %d distractors of %d, continuity %.2f, dot "
            "distances %s; %d images restarted, %d distractors found no room, %d images drawn without a partner "
            "of the same dot distance (discarded)",
            cfg.resolution,
            cfg.resolution,
            generator.contour_length,
            generator.num_distractors,
            generator.distractor_length,
            generator.continuity,
            cfg.dot_distance,
            generator.restarts,
            generator.missing_distractors,
            generator.unmatched,
        )
        return parts

    def _read_release(self):
        cfg = self.cfg
        folder = release_folder(cfg.data_dir, cfg.resolution, cfg.difficulty)
        images, labels, empty = load_release(folder, cfg.resolution)
        if empty:
            log.warning(
                "pathfinder (lra) %s: skipped %d empty image files (LRA's pipeline filters them too)", folder, empty
            )
        n = len(labels)
        cuts = [int(round(f * n)) for f in SPLIT_FRACTIONS]
        bounds = {"train": (0, cuts[0]), "validation": (cuts[0], cuts[1]), "test": (cuts[1], n)}
        caps = {"train": cfg.num_train, "validation": cfg.num_val, "test": cfg.num_test}
        parts = {}
        for split, (lo, hi) in bounds.items():
            hi = min(hi, lo + caps[split]) if caps[split] > 0 else hi
            parts[split] = (images[lo:hi], labels[lo:hi])
        return parts


@dataclass
class GenerateSettings:
    """Write generated images in the layout of LRA's release (read back with task.source=lra
    task.data_dir=DIR)."""

    data_dir: str = "???"  # the folder to hold <difficulty folder>/metadata and imgs
    count: int = 1000
    resolution: int = 32
    difficulty: str = "easy"  # easy | intermediate | hard
    contour_length: int = 0  # 0 = the difficulty's
    num_distractors: int = -1  # -1 = the generator's default
    dot_distance: str = (
        "matched"  # matched: both classes share one distribution of dot distances; free: LRA's generator
    )
    seed: int = 0


def generate(settings: GenerateSettings) -> int:
    """``python -m harness tool pathfinder-generate``: write the images and metadata, print one line."""
    from harness.core.overrides import check_choice

    check_choice("difficulty", settings.difficulty, DIFFICULTIES)
    check_choice("dot_distance", settings.dot_distance, DOT_DISTANCES)
    cfg = PathfinderConfig(
        resolution=settings.resolution,
        max_len=settings.resolution**2,
        difficulty=settings.difficulty,
        contour_length=settings.contour_length,
        num_distractors=settings.num_distractors,
        dot_distance=settings.dot_distance,
        data_seed=settings.seed,
    )
    generator = generator_for(cfg)
    images, labels = generator.images(settings.count, settings.seed)
    folder = Path(settings.data_dir) / DIFFICULTIES[settings.difficulty][0]
    write_release(folder, images, labels, generator)
    print(f"{folder}: {len(images)} images, {int(labels.sum())} connected")
    return 0
