"""The shapes checker: says whether a 64×64 image shows exactly what a :class:`SceneSpec` describes (the objects'
count, colours, shapes, stated sizes and cells, and relations), and which attributes failed — the metric behind
`latent-diffusion evaluate`, in the spirit of GenEval's object-level checks (Ghosh et al. 2023).

Detection: non-white pixels are split into 4-connected components; each gets the palette colour that best explains
it as that colour blended over white, and the shape whose soft template, placed by moments, overlaps it best.
Measured rates (`python bench/checker_rates.py`): it accepts every real render and rejects mismatched specs and
single-attribute edits; see bench/results/checker_rates.json.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from latent_diffusion.data.image_text import to_rgb
from latent_diffusion.data.shapes import (
    COLORS,
    EDIT_KINDS,
    NEW_SHAPES,
    SHAPES,
    SceneSpec,
    _coverage,
    _palette,
    _relation_holds,
)

# Checker thresholds (on a 64×64 image).
_FG_DEFICIT = 100  # a pixel is foreground if some channel is this far below 255 (≈ 45% coverage for the palette)
_MIN_PIXELS = 15  # smaller components are specks and are ignored
_MAX_COLOR_DIST = 60.0  # max RGB distance from the nearest palette colour (orange–yellow are 71 apart)
_MIN_ALPHA = 0.5  # a component paler than this (median coverage of its core) has no palette colour
_SIZE_EDGES = (15.0, 21.5)  # bbox side thresholds small|medium|large (midpoints of 12, 18, 25)
_MIN_SHAPE_IOU = 0.4  # below this the best template match is "no known shape"
_MAX_DETECTIONS = 8  # only the largest components take part in matching
_TEMPLATE_BLURS = (0.0, 0.8, 1.4)  # Gaussian sigmas (px) at which templates are compared
_PAD = 3  # window margin (px) around a component for the soft template fit


@dataclass(frozen=True)
class DetectedObject:
    """A connected component classified as a shape. ``color``/``shape`` are None when nothing fits well enough."""

    color: str | None
    shape: str | None
    size: str
    cell: int
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), inclusive pixel indices
    pixels: int
    shape_iou: float


@dataclass(frozen=True)
class CheckResult:
    """``passed`` iff ``failed`` is empty; ``failed`` names failing attributes among count/color/shape/size/cell/
    relation; ``detected`` lists what the checker saw."""

    passed: bool
    failed: tuple[str, ...]
    detected: tuple[DetectedObject, ...]


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = background) by min-label propagation with pointer jumping."""
    h, w = mask.shape
    big = h * w
    idx = np.arange(big).reshape(h, w)
    lab = np.where(mask, idx, big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big)
        flat = np.append(new.ravel(), big)
        new = np.where(mask, flat[new], big)  # pointer jumping: adopt the label of the label's pixel
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(mask, lab + 1, 0)


@functools.cache
def _unit_moments(shape: str) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of ``shape`` filling the unit square, measured on a fine raster."""
    cov = _coverage(shape, 0.0, 0.0, 64.0, 64.0, 64, 64)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    mass = cov.sum()
    return float(mass / 64**2), float((cov * xs).sum() / mass / 64), float((cov * ys).sum() / mass / 64)


@functools.lru_cache(maxsize=1024)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix applying a normalised 1-D Gaussian (zero padding)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma) ** 2)
    return k / np.exp(-0.5 * (np.arange(-n, n + 1) / sigma) ** 2).sum()


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (zero padding)."""
    if sigma <= 0:
        return x
    return _blur_matrix(x.shape[0], sigma) @ x @ _blur_matrix(x.shape[1], sigma).T


def _fit_template(shape: str, alpha: np.ndarray) -> tuple[float, float, float, float]:
    """Place ``shape`` on a soft mask (h, w) by moments and score it.

    The side comes from the mass (area = fill × side²) and the box from the centroid, so the fit is sub-pixel and
    insensitive to blur; the template is also compared blurred (``_TEMPLATE_BLURS``) to tolerate soft generated
    images. Returns (best soft IoU, box centre x, box centre y, side) in the mask's pixel frame.
    """
    area, ux, uy = _unit_moments(shape)
    mass = alpha.sum()
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]] + 0.5
    cx, cy = (alpha * xs).sum() / mass, (alpha * ys).sum() / mass
    side = float(np.sqrt(mass / area))
    x0, y0 = cx - ux * side, cy - uy * side
    t = _coverage(shape, x0, y0, side, side, *alpha.shape)
    iou = max(
        float(np.minimum(alpha, tb).sum() / np.maximum(alpha, tb).sum())
        for tb in (_blur(t, sigma) for sigma in _TEMPLATE_BLURS)
    )
    return iou, x0 + side / 2, y0 + side / 2, side


def _steps(mask: np.ndarray) -> np.ndarray:
    """City-block distance (in pixels, capped at ``_PAD + 1``) from each pixel to ``mask``; 0 on the mask."""
    dist = np.where(mask, 0, _PAD + 1)
    reached = mask.copy()
    for step in range(1, _PAD + 1):
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        dist[grown & ~reached] = step
        reached = grown
    return dist


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A Pillow image (any mode; transparency composited on white) or an (H, W, 3) array -> (64, 64, 3) uint8.
    Arrays are integers in [0, 255] or floating point in [0, 1] (what `pipe(..., output_type="np")` returns)."""
    if isinstance(image, Image.Image):
        image = to_rgb(image)
        if image.size != (64, 64):
            image = image.resize((64, 64), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ValueError(f"a floating-point image must lie in [0, 1], got values in [{arr.min():.3g}, "
                             f"{arr.max():.3g}]; pass uint8 for [0, 255]")
        arr = np.rint(arr * 255)
    elif not np.issubdtype(arr.dtype, np.integer) or (arr.size and (arr.min() < 0 or arr.max() > 255)):
        raise ValueError(f"expected a uint8 [0, 255] or floating-point [0, 1] image, got dtype {arr.dtype}"
                         + (f" with values in [{arr.min()}, {arr.max()}]" if arr.size and arr.dtype != bool else ""))
    arr = arr.astype(np.uint8)
    if arr.shape[:2] != (64, 64):
        return _to_array(Image.fromarray(arr))
    return arr


def detect(image: Image.Image | np.ndarray, extra_colors: Mapping[str, Sequence[int]] | None = None,
           extra_shapes: Sequence[str] = ()) -> tuple[DetectedObject, ...]:
    """Segment non-white pixels into components and classify each (largest first, at most 8).

    colour: the palette colour (or one of ``extra_colors``, name → RGB) that best explains the component's most
    saturated half as that colour blended over white (median residual; None if above 60 or paler than 50% coverage);
    shape: every shape (the six, plus ``extra_shapes`` from ``NEW_SHAPES``) is drawn as a soft template placed on
    the component's coverage map by moments (side from the mass, box from the centroid; also compared blurred) and
    the best soft IoU wins (None below 0.4);
    size: that template's side against 15 / 21.5 px; cell: its box centre on the 3×3 grid.
    """
    arr = _to_array(image)
    h, w, _ = arr.shape
    fg = (255 - arr.astype(np.int16)).max(axis=2) > _FG_DEFICIT
    labels = _label(fg)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    keep = [(int(c), int(i)) for i, c in zip(ids, counts) if c >= _MIN_PIXELS]
    shapes = SHAPES + tuple(s for s in extra_shapes if s not in SHAPES)
    for s in shapes[len(SHAPES):]:
        if s not in NEW_SHAPES:
            raise ValueError(f"extra shape {s!r} is not drawable; known new shapes: {list(NEW_SHAPES)}")
    palette = _palette(extra_colors)  # the 8 palette colours (+ extra ones, e.g. taught by fine-tuning)
    palette_names = list(palette)
    inks = 255.0 - np.array([palette[c] for c in palette_names], dtype=float)  # (K, 3)
    found = []
    for count, i in sorted(keep, reverse=True)[:_MAX_DETECTIONS]:
        mask = labels == i
        ys, xs = np.nonzero(mask)
        # Colour: a pixel over white is deficit = alpha * ink (ink = 255 - colour), so fit every palette colour with
        # its own alpha and take the median residual over the component's most saturated half (for a solid
        # interior this is the distance to the median interior pixel; it also holds on soft, blurred edges).
        deficit = 255.0 - arr[mask].astype(float)  # (n, 3)
        core = deficit[np.argsort(-np.linalg.norm(deficit, axis=1))[: max(len(deficit) // 2, 1)]]
        fit = np.clip(core @ inks.T / (inks**2).sum(1), 0.0, 1.0)  # (n, K) alpha per palette colour
        residual = np.median(np.linalg.norm(core[:, None, :] - fit[..., None] * inks[None], axis=2), axis=0)
        k = int(residual.argmin())
        color = palette_names[k] if residual[k] <= _MAX_COLOR_DIST and np.median(fit[:, k]) >= _MIN_ALPHA else None
        # Soft mask: per-pixel coverage of the component's colour over white (least squares over RGB), in a window
        # around the component with other components' pixels removed.
        x0, x1 = max(int(xs.min()) - _PAD, 0), min(int(xs.max()) + _PAD + 1, w)
        y0, y1 = max(int(ys.min()) - _PAD, 0), min(int(ys.max()) + _PAD + 1, h)
        ink = inks[k] if color else np.median(core, axis=0)
        deficit = 255.0 - arr[y0:y1, x0:x1].astype(float)  # (h, w, 3)
        alpha = np.clip(deficit @ ink / max(float(ink @ ink), 1.0), 0.0, 1.0)
        own, other = mask[y0:y1, x0:x1], (labels[y0:y1, x0:x1] > 0) & ~mask[y0:y1, x0:x1]
        alpha[_steps(other) <= _steps(own)] = 0.0  # keep pixels nearer this component than any other
        fits = {s: _fit_template(s, alpha) for s in shapes}
        best = max(fits, key=lambda s: fits[s][0])
        iou, cx, cy, side = fits[best]
        shape = best if iou >= _MIN_SHAPE_IOU else None
        side64 = side * 64.0 / w
        size = "small" if side64 < _SIZE_EDGES[0] else "medium" if side64 < _SIZE_EDGES[1] else "large"
        col = min(max(int((x0 + cx) / (w / 3)), 0), 2)
        row = min(max(int((y0 + cy) / (h / 3)), 0), 2)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        found.append(DetectedObject(color, shape, size, 3 * row + col, bbox, count, iou))
    return tuple(found)


def check_detections(detected: Sequence[DetectedObject], spec: SceneSpec) -> CheckResult:
    """Match detections to spec objects (best of all assignments) and test the count, every object's colour and
    shape, its size/cell where stated, and every relation (rows for above/below, columns for left/right)."""
    n_spec, n_det = len(spec.objects), len(detected)
    best: tuple[int, list[str]] | None = None
    # assignment[i] = detection index for spec object i, or None when there are fewer detections than objects
    slots = list(range(n_det)) + [None] * max(0, n_spec - n_det)
    assignments = sorted(set(itertools.permutations(slots, n_spec)), key=lambda t: [-1 if x is None else x for x in t])
    for assignment in assignments:
        fails: list[str] = []
        for obj, stated, d in zip(spec.objects, spec.stated, assignment):
            if d is None:
                continue
            det = detected[d]
            fails += [a for a in ("color", "shape") if getattr(det, a) != getattr(obj, a)]
            fails += [a for a in ("size", "cell") if a in stated and getattr(det, a) != getattr(obj, a)]
        for r in spec.relations:
            a, b = assignment[r.subject], assignment[r.object]
            if a is None or b is None or not _relation_holds(r.relation, detected[a].cell, detected[b].cell):
                fails.append("relation")
        if best is None or len(fails) < best[0]:
            best = (len(fails), fails)
    assert best is not None
    failed = set(best[1]) | ({"count"} if n_spec != n_det else set())
    ordered = tuple(a for a in ("count", *EDIT_KINDS[:5]) if a in failed)
    return CheckResult(not ordered, ordered, tuple(detected))


def check(image: Image.Image | np.ndarray, spec: SceneSpec, extra_colors: Mapping[str, Sequence[int]] | None = None,
          extra_shapes: Sequence[str] = ()) -> CheckResult:
    """Score an image (PIL or (64, 64, 3) uint8 array; other sizes are resized) against a spec. The colours told
    apart are the palette's, `extra_colors` (name → RGB) and the spec's custom ones (`ShapeObject.rgb`); the shapes
    are the six, `extra_shapes` and any new shape the spec holds (e.g. "heart")."""
    extra = {k: v for k, v in _palette(extra_colors, spec).items() if k not in COLORS}
    shapes = [*extra_shapes, *(o.shape for o in spec.objects if o.shape not in SHAPES)]
    return check_detections(detect(image, extra, tuple(dict.fromkeys(shapes))), spec)
