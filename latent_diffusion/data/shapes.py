"""The built-in **shapes** data: coloured shapes on a 3×3 grid, their specs, captions and renders.

A scene holds 1–3 filled shapes on a white 64×64 canvas, each in its own cell of a 3×3 grid with a little jitter.
Every sample carries a structured :class:`SceneSpec` (objects with colour/shape/size/cell, relations, and which
attributes the caption states), so the checker (`latent_diffusion.data.checker`) can score an image against the
prompt it came from.

Geometry is defined on a 64-unit canvas and scaled to ``image_size``. Shapes are rasterised with 4×4 supersampling:
edges are antialiased against white, interiors keep the exact palette colour.

Relation semantics (what a caption promises and the checker tests): "above"/"below" compare grid *rows* only,
"to the left of"/"to the right of" compare grid *columns* only; rows/columns must differ strictly.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (240, 210, 0),
    "green": (30, 160, 50),
    "cyan": (0, 190, 210),
    "blue": (30, 70, 230),
    "purple": (150, 50, 190),
    "black": (30, 30, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
# Drawn and checked, never sampled: shapes the training data does not have, for teaching by fine-tuning.
NEW_SHAPES: tuple[str, ...] = ("heart",)
SIZES: dict[str, int] = {"small": 12, "medium": 18, "large": 25}  # bounding-box side on the 64-unit canvas
CELLS: tuple[str, ...] = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)  # row-major: cell = 3 * row + col
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
EDIT_KINDS: tuple[str, ...] = ("color", "shape", "size", "cell", "relation", "count")
_FLIP = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
_STATABLE = frozenset({"size", "cell"})

# Layout on the 64-unit canvas.
_CANVAS = 64.0
_BORDER = 1.0  # minimum distance from a shape's bounding box to the canvas edge
_GAP_NOMINAL = 3.0  # minimum bounding-box gap between two shapes before jitter (what sample_spec guarantees)
_GAP_JITTERED = 2.0  # minimum gap after jitter (keeps shapes separate connected components)
_JITTER = 2.0  # max centre jitter per axis
_SIZE_JITTER = 1.0  # max bounding-box side jitter
_SUPERSAMPLE = 4

@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene: palette colour name, shape name, size name and grid cell (0–8, row-major).

    ``rgb`` gives a colour outside the palette (e.g. a new colour taught by fine-tuning): the object is drawn in it
    and the checker adds it to the palette when scoring a spec that holds it."""

    color: str
    shape: str
    size: str
    cell: int
    rgb: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.rgb is None:
            _check_name("colour", self.color, COLORS)
        else:
            object.__setattr__(self, "rgb", _check_rgb(self.color, self.rgb))
        _check_name("shape", self.shape, SHAPES + NEW_SHAPES)
        _check_name("size", self.size, SIZES)
        if not (isinstance(self.cell, int) and not isinstance(self.cell, bool) and 0 <= self.cell < 9):
            raise ValueError(f"cell must be an int in 0..8 (row-major 3×3 grid), got {self.cell!r}")


@dataclass(frozen=True)
class Relation:
    """``objects[subject] <relation> objects[object]``, e.g. (0, "above", 1)."""

    subject: int
    relation: str
    object: int

    def __post_init__(self) -> None:
        _check_name("relation", self.relation, RELATIONS)


@dataclass(frozen=True)
class SceneSpec:
    """A scene: its objects, the relations its caption states, and per object which optional attributes the caption
    states (subsets of ``{"size", "cell"}``; colour and shape are always stated). The checker tests only stated ones.
    """

    objects: tuple[ShapeObject, ...]
    relations: tuple[Relation, ...] = ()
    stated: tuple[frozenset[str], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "relations", tuple(self.relations))
        stated = self.stated or tuple(frozenset() for _ in self.objects)
        object.__setattr__(self, "stated", tuple(frozenset(s) for s in stated))
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        if len(self.stated) != len(self.objects):
            raise ValueError(f"stated has {len(self.stated)} entries for {len(self.objects)} objects")
        for s in self.stated:
            if not s <= _STATABLE:
                raise ValueError(f"stated attributes must be a subset of {sorted(_STATABLE)}, got {sorted(s)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must occupy distinct cells, got {cells}")
        n = len(self.objects)
        for r in self.relations:
            if not (0 <= r.subject < n and 0 <= r.object < n and r.subject != r.object):
                raise ValueError(f"relation {r} does not refer to two distinct objects of {n}")

    def to_dict(self) -> dict:
        """A JSON-able dict (see :meth:`from_dict`)."""
        return {
            "objects": [{"color": o.color, "shape": o.shape, "size": o.size, "cell": o.cell}
                        | ({"rgb": list(o.rgb)} if o.rgb is not None else {}) for o in self.objects],
            "relations": [{"subject": r.subject, "relation": r.relation, "object": r.object} for r in self.relations],
            "stated": [sorted(s) for s in self.stated],
        }

    @classmethod
    def from_dict(cls, d: dict | str) -> SceneSpec:
        """Inverse of :meth:`to_dict`; also accepts the dict as a JSON string (as the dataset yields it)."""
        if isinstance(d, str):
            d = json.loads(d)
        return cls(
            objects=tuple(ShapeObject(**{**o, "rgb": tuple(o["rgb"]) if o.get("rgb") else None})
                          for o in d["objects"]),
            relations=tuple(Relation(**r) for r in d.get("relations", ())),
            stated=tuple(frozenset(s) for s in d.get("stated", ())),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_name(kind: str, value: object, valid: Iterable[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")


def _check_rgb(name: object, rgb: Sequence[int]) -> tuple[int, int, int]:
    """A custom colour: a new name (not a palette colour) and three 0–255 integers."""
    if not isinstance(name, str) or not name or name in COLORS:
        raise ValueError(f"a custom colour needs a new name (not one of {', '.join(COLORS)}), got {name!r}")
    values = tuple(rgb)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
        raise ValueError(f"colour {name!r}: rgb must be three integers in 0..255, got {rgb!r}")
    return tuple(int(v) for v in values)


def _palette(extra_colors: Mapping[str, Sequence[int]] | None, spec: SceneSpec | None = None) -> dict:
    """The built-in palette plus `extra_colors` and the custom colours of `spec`."""
    palette: dict[str, tuple[int, int, int]] = dict(COLORS)
    for name, rgb in (extra_colors or {}).items():
        palette[name] = _check_rgb(name, rgb)
    for o in spec.objects if spec is not None else ():
        if o.rgb is not None:
            palette[o.color] = o.rgb
    return palette


def _validate_pairs(pairs: Iterable[tuple[str, str]] | None) -> frozenset[tuple[str, str]]:
    out = set()
    for pair in pairs or ():
        color, shape = pair
        _check_name("colour", color, COLORS)
        _check_name("shape", shape, SHAPES)
        out.add((color, shape))
    return frozenset(out)


def parse_pairs(text: str) -> set[tuple[str, str]]:
    """Parse ``"red circle, blue star"`` into ``{("red", "circle"), ("blue", "star")}`` (for configs)."""
    pairs = set()
    for item in text.split(","):
        words = item.split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"expected 'colour shape', got {item.strip()!r}")
        pairs.add((words[0].lower(), words[1].lower()))
    return set(_validate_pairs(pairs))


# --------------------------------------------------------------------------------------------- layout


def _row_col(cell: int) -> tuple[int, int]:
    return divmod(cell, 3)


def _relation_holds(relation: str, subject_cell: int, object_cell: int) -> bool:
    (r1, c1), (r2, c2) = _row_col(subject_cell), _row_col(object_cell)
    return {"to the left of": c1 < c2, "to the right of": c1 > c2, "above": r1 < r2, "below": r1 > r2}[relation]


def _nominal_centre(cell: int, side: float) -> tuple[float, float]:
    """Cell centre on the 64-unit canvas, pulled inwards so the bounding box keeps ``_BORDER`` from the edge."""
    row, col = _row_col(cell)
    lo, hi = side / 2 + _BORDER, _CANVAS - side / 2 - _BORDER
    return (min(max((col + 0.5) * _CANVAS / 3, lo), hi), min(max((row + 0.5) * _CANVAS / 3, lo), hi))


def _boxes_ok(centres: Sequence[tuple[float, float]], sides: Sequence[float], gap: float) -> bool:
    """True if every pair of bounding boxes is separated by at least ``gap`` along some axis."""
    for i, j in itertools.combinations(range(len(sides)), 2):
        half = (sides[i] + sides[j]) / 2
        dx = abs(centres[i][0] - centres[j][0]) - half
        dy = abs(centres[i][1] - centres[j][1]) - half
        if max(dx, dy) < gap:
            return False
    return True


def _layout_ok(objects: Sequence[ShapeObject]) -> bool:
    """Whether the objects fit without overlap at their nominal positions (a "possible scene")."""
    sides = [float(SIZES[o.size]) for o in objects]
    return _boxes_ok([_nominal_centre(o.cell, s) for o, s in zip(objects, sides)], sides, _GAP_NOMINAL)


# --------------------------------------------------------------------------------------------- sampling


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: ShapeObject, stated: frozenset[str], with_cell: bool = True) -> str:
    words = ([obj.size] if "size" in stated else []) + [obj.color, obj.shape]
    text = f"{_article(words[0])} {' '.join(words)}"
    return f"{text} {CELLS[obj.cell]}" if with_cell and "cell" in stated else text


def caption(spec: SceneSpec) -> str:
    """The caption of a spec (deterministic). Relation scenes: "A <relation> B"; otherwise "A", "A and B",
    "A, B and C" — each phrase "a [size] colour shape [position]" with size/position as ``spec.stated`` says."""
    phrases = [_phrase(o, s, with_cell=not spec.relations) for o, s in zip(spec.objects, spec.stated)]
    if spec.relations:
        if len(spec.objects) != 2 or len(spec.relations) != 1:
            raise ValueError("captions with a relation describe exactly two objects and one relation")
        r = spec.relations[0]
        return f"{phrases[r.subject]} {r.relation} {phrases[r.object]}"
    if len(phrases) == 1:
        return phrases[0]
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def sample_spec(
    rng: np.random.Generator, exclude: set[tuple[str, str]] | None = None, max_objects: int = 3
) -> SceneSpec:
    """Sample a scene: 1..``max_objects`` objects with distinct (colour, shape) pairs, none in ``exclude``, in distinct
    cells, sized so they fit without overlap. Two-object scenes get a relation caption half of the time (then
    positions are not stated); otherwise size and position are each stated with probability 1/2 per object."""
    if not 1 <= max_objects <= 9:
        raise ValueError(f"max_objects must be in 1..9, got {max_objects}")
    excluded = _validate_pairs(exclude)
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in excluded]
    if not allowed:
        raise ValueError("every colour×shape pair is excluded")
    n = int(rng.integers(1, max_objects + 1))
    n = min(n, len(allowed))
    picks = rng.choice(len(allowed), size=n, replace=False)
    pairs = [allowed[int(k)] for k in picks]
    sizes = list(SIZES)
    for _ in range(1000):  # rejection-sample cells and sizes until the layout fits (all-small always fits)
        cells = rng.choice(9, size=n, replace=False)
        objs = [ShapeObject(c, s, sizes[int(rng.integers(3))], int(cell)) for (c, s), cell in zip(pairs, cells)]
        if _layout_ok(objs):
            break
    else:
        objs = [ShapeObject(o.color, o.shape, "small", o.cell) for o in objs]
    relations: tuple[Relation, ...] = ()
    if n == 2 and rng.random() < 0.5:
        true = [r for r in RELATIONS if _relation_holds(r, objs[0].cell, objs[1].cell)]
        relations = (Relation(0, true[int(rng.integers(len(true)))], 1),)
        stated = tuple(frozenset({"size"}) if rng.random() < 0.5 else frozenset() for _ in objs)
    else:
        stated = tuple(
            frozenset(a for a in ("size", "cell") if rng.random() < 0.5) for _ in objs
        )
    return SceneSpec(tuple(objs), relations, stated)


def edit_spec(spec: SceneSpec, kind: str, rng: np.random.Generator,
              exclude: Iterable[tuple[str, str]] | None = None) -> SceneSpec | None:
    """A single-attribute edit of a *stated* attribute, still a possible scene, or None if none exists.

    ``kind``: "color"/"shape" (another value, keeping (colour, shape) pairs distinct), "size"/"cell" (of an object
    whose size/cell is stated; the layout must still fit), "relation" (flipped), "count" (add an object in a free
    cell, or drop one together with its relations). No edit introduces a (colour, shape) pair of ``exclude`` (the
    held-out pairs, which training text must not show).
    """
    _check_name("edit kind", kind, EDIT_KINDS)
    excluded = _validate_pairs(exclude)
    objs = list(spec.objects)
    order = rng.permutation(len(objs))
    if kind == "relation":
        if not spec.relations:
            return None
        k = int(rng.integers(len(spec.relations)))
        rels = list(spec.relations)
        rels[k] = Relation(rels[k].subject, _FLIP[rels[k].relation], rels[k].object)
        return SceneSpec(spec.objects, tuple(rels), spec.stated)
    if kind == "count":
        can_drop, can_add = len(objs) > 1, len(objs) < 3
        if can_add and (not can_drop or rng.random() < 0.5):
            if spec.relations:  # relation captions describe exactly two objects
                return None if not can_drop else _drop(spec, int(order[0]))
            used = {(o.color, o.shape) for o in objs}
            free = [c for c in range(9) if c not in {o.cell for o in objs}]
            for _ in range(100):
                color, shape = list(COLORS)[int(rng.integers(8))], SHAPES[int(rng.integers(6))]
                new = ShapeObject(color, shape, list(SIZES)[int(rng.integers(3))], free[int(rng.integers(len(free)))])
                if (color, shape) not in used and (color, shape) not in excluded and _layout_ok([*objs, new]):
                    return SceneSpec((*objs, new), spec.relations, (*spec.stated, frozenset()))
            return None
        return _drop(spec, int(order[0]))
    for i in map(int, order):
        o = objs[i]
        if kind == "color":
            values = [c for c in COLORS if c != o.color and (c, o.shape) not in excluded
                      and all((c, o.shape) != (p.color, p.shape) for p in objs)]
            candidates = [ShapeObject(c, o.shape, o.size, o.cell) for c in values]
        elif kind == "shape":
            values = [s for s in SHAPES if s != o.shape and (o.color, s) not in excluded
                      and all((o.color, s) != (p.color, p.shape) for p in objs)]
            candidates = [replace(o, shape=s) for s in values]
        elif kind == "size":
            candidates = [replace(o, size=s) for s in SIZES if s != o.size]
        else:  # cell
            used = {p.cell for p in objs}
            candidates = [replace(o, cell=c) for c in range(9) if c not in used]
        if kind in ("size", "cell") and kind not in spec.stated[i]:
            continue
        candidates = [c for c in candidates if _layout_ok([*objs[:i], c, *objs[i + 1:]])]
        if candidates:
            objs[i] = candidates[int(rng.integers(len(candidates)))]
            return SceneSpec(tuple(objs), spec.relations, spec.stated)
    return None


def _drop(spec: SceneSpec, i: int) -> SceneSpec:
    keep = [j for j in range(len(spec.objects)) if j != i]
    index = {old: new for new, old in enumerate(keep)}
    rels = tuple(
        Relation(index[r.subject], r.relation, index[r.object])
        for r in spec.relations
        if r.subject != i and r.object != i
    )
    return SceneSpec(tuple(spec.objects[j] for j in keep), rels, tuple(spec.stated[j] for j in keep))


# --------------------------------------------------------------------------------------------- rendering


@functools.cache
def _unit_star() -> np.ndarray:
    """A five-point star (inner/outer radius 0.45) normalised to fill [0, 1]², point up. (10, 2)."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return (pts - pts.min(0)) / (pts.max(0) - pts.min(0))


_UNIT_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=float),
    "triangle": np.array([[0.5, 0], [1, 1], [0, 1]], dtype=float),
    "diamond": np.array([[0.5, 0], [1, 0.5], [0.5, 1], [0, 0.5]], dtype=float),
    # the heart below its lobes: the tangent points (0.05, 0.4), (0.95, 0.4) from the tip (0.5, 1)
    "heart body": np.array([[0.05, 0.4], [0.5, 1.0], [0.95, 0.4], [0.5, 0.25]], dtype=float),
    "cross": np.array(
        [[1, 0], [2, 0], [2, 1], [3, 1], [3, 2], [2, 2], [2, 3], [1, 3], [1, 2], [0, 2], [0, 1], [1, 1]], dtype=float
    ) / 3,
}


def _inside(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Point-in-shape test for a shape filling the unit square; ``px``/``py`` in unit-box coordinates."""
    if shape == "circle":
        return (px - 0.5) ** 2 + (py - 0.5) ** 2 <= 0.25
    if shape == "heart":  # two lobes of radius 1/4, and their outer tangents meeting at the bottom point
        lobes = ((px - 0.25) ** 2 + (py - 0.25) ** 2 <= 0.0625) | ((px - 0.75) ** 2 + (py - 0.25) ** 2 <= 0.0625)
        return lobes | _inside("heart body", px, py)
    poly = _unit_star() if shape == "star" else _UNIT_POLYGONS[shape]
    inside = np.zeros(px.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):  # even-odd ray casting
        crosses = (y1 > py) != (y2 > py)
        x_at = x1 + (py - y1) * (x2 - x1) / ((y2 - y1) if y2 != y1 else 1.0)
        inside ^= crosses & (px < x_at)
    return inside


def _coverage(shape: str, x0: float, y0: float, w: float, h: float, rows: int, cols: int) -> np.ndarray:
    """Fraction of each pixel of a (rows, cols) grid covered by ``shape`` filling the box [x0, x0+w) × [y0, y0+h)
    (pixel (r, c) spans [c, c+1) × [r, r+1)), from ``_SUPERSAMPLE``² samples per pixel."""
    ss = _SUPERSAMPLE
    sub = (np.arange(cols * ss) + 0.5) / ss, (np.arange(rows * ss) + 0.5) / ss
    px, py = np.meshgrid((sub[0] - x0) / w, (sub[1] - y0) / h)  # (rows*ss, cols*ss) in unit-box coords
    inside = _inside(shape, px, py) & (px >= 0) & (px < 1) & (py >= 0) & (py < 1)
    return inside.reshape(rows, ss, cols, ss).mean(axis=(1, 3))


def _jittered_boxes(spec: SceneSpec, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(centre x, centre y, side) per object on the 64-unit canvas: jitter that keeps shapes apart and inside."""
    nominal_sides = [float(SIZES[o.size]) for o in spec.objects]
    nominal = [_nominal_centre(o.cell, s) for o, s in zip(spec.objects, nominal_sides)]
    for _ in range(100):
        sides = [s + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER) for s in nominal_sides]
        centres = [(x + rng.uniform(-_JITTER, _JITTER), y + rng.uniform(-_JITTER, _JITTER)) for x, y in nominal]
        inside = all(
            _BORDER <= c - s / 2 and c + s / 2 <= _CANVAS - _BORDER for (x, y), s in zip(centres, sides) for c in (x, y)
        )
        if inside and _boxes_ok(centres, sides, _GAP_JITTERED):
            return [(x, y, s) for (x, y), s in zip(centres, sides)]
    return [(x, y, s) for (x, y), s in zip(nominal, nominal_sides)]


def render(spec: SceneSpec, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Draw the scene on white (position/size jitter from ``rng``). Edges are antialiased; interiors are the exact
    palette colour. Returns an RGB ``image_size`` × ``image_size`` image."""
    scale = image_size / _CANVAS
    canvas = np.full((image_size, image_size, 3), 255.0)
    for obj, (cx, cy, side) in zip(spec.objects, _jittered_boxes(spec, rng)):
        x0, y0, s = (cx - side / 2) * scale, (cy - side / 2) * scale, side * scale
        c0, r0 = int(np.floor(x0)), int(np.floor(y0))
        c1, r1 = min(int(np.ceil(x0 + s)), image_size), min(int(np.ceil(y0 + s)), image_size)
        cov = _coverage(obj.shape, x0 - c0, y0 - r0, s, s, r1 - r0, c1 - c0)[..., None]  # (h, w, 1)
        patch = canvas[r0:r1, c0:c1]
        rgb = obj.rgb if obj.rgb is not None else COLORS[obj.color]
        canvas[r0:r1, c0:c1] = patch * (1 - cov) + np.asarray(rgb, dtype=float) * cov
    return Image.fromarray(np.round(canvas).astype(np.uint8), mode="RGB")


class ShapesDataset(torch.utils.data.Dataset):
    """``num_samples`` deterministic shapes scenes: sample ``i`` depends only on ``(seed, i)``.

    Items: ``pixel_values`` float (3, H, W) in [-1, 1], ``caption`` str, ``spec`` the :class:`SceneSpec` as a JSON
    string (collates to a list of strings; read it back with ``SceneSpec.from_dict``). ``exclude`` lists
    (colour, shape) pairs that never appear (held out for evaluation).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        image_size: int = 64,
        exclude: Iterable[tuple[str, str]] | None = None,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        self.num_samples, self.seed, self.image_size = num_samples, seed, image_size
        self.exclude = set(_validate_pairs(exclude))

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[SceneSpec, Image.Image]:
        """The spec and image of sample ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])
        spec = sample_spec(rng, self.exclude)
        return spec, render(spec, rng, self.image_size)

    def captions(self) -> list[str]:
        """Every caption, in index order, without rendering (for tokenizer training)."""
        return [caption(sample_spec(np.random.default_rng([self.seed, i]), self.exclude))
                for i in range(self.num_samples)]

    def __getitem__(self, index: int) -> dict:
        spec, image = self.sample(index)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)
        return {"pixel_values": pixels, "caption": caption(spec), "spec": spec.to_json()}
