"""The shapes data: determinism, exclusion, caption grammar, relation truth, spec round trip, dataset/collate, and
the checker's acceptance of real pairs and rejection of single-attribute edits."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.data.checker import check, check_detections, detect
from latent_diffusion.data.shapes import (
    CELLS,
    COLORS,
    EDIT_KINDS,
    RELATIONS,
    SHAPES,
    SIZES,
    Relation,
    SceneSpec,
    ShapeObject,
    ShapesDataset,
    caption,
    edit_spec,
    parse_pairs,
    render,
    sample_spec,
)


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in words)


_OBJECT = rf"an? (?:(?:{_alt(SIZES)}) )?(?:{_alt(COLORS)}) (?:{_alt(SHAPES)})"
_PLACED = rf"{_OBJECT}(?: (?:{_alt(CELLS)}))?"
_FORMS = (rf"{_OBJECT} (?:{_alt(RELATIONS)}) {_OBJECT}", _PLACED, rf"{_PLACED} and {_PLACED}",
          rf"{_PLACED}, {_PLACED} and {_PLACED}")
CAPTION_RE = re.compile(rf"^(?:{'|'.join(_FORMS)})$")


def _holds(relation: str, a: int, b: int) -> bool:
    (ra, ca), (rb, cb) = divmod(a, 3), divmod(b, 3)
    return {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


@pytest.fixture(scope="module")
def real():
    """(spec, detections) for 300 real samples plus 100 extra two-object relation scenes."""
    data = ShapesDataset(300, seed=7)
    pairs = [(spec, detect(image)) for spec, image in map(data.sample, range(len(data)))]
    extra, i = [], 0
    while len(extra) < 100:
        rng = np.random.default_rng([99, i])
        spec = sample_spec(rng)
        if spec.relations:
            extra.append((spec, detect(render(spec, rng))))
        i += 1
    return pairs, extra


def test_deterministic_per_seed_and_index():
    a, b = ShapesDataset(6, seed=3), ShapesDataset(6, seed=3)
    for i in range(6):
        x, y = a[i], b[i]
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert x["caption"] == y["caption"] and x["spec"] == y["spec"]
    assert not torch.equal(a[0]["pixel_values"], a[1]["pixel_values"])
    assert not torch.equal(a[0]["pixel_values"], ShapesDataset(6, seed=4)[0]["pixel_values"])
    assert len({a[i]["caption"] for i in range(6)}) > 1


def test_bad_dataset_arguments_are_refused_at_construction():
    for kwargs, message in (({"seed": -1}, "seed"), ({"seed": True}, "seed"), ({"image_size": 0}, "image_size")):
        with pytest.raises(ValueError, match=message):
            ShapesDataset(4, **kwargs)
    with pytest.raises(ValueError, match="cell"):
        ShapeObject("red", "circle", "small", True)


def test_exclusion_honoured_and_names_validated():
    held_out = parse_pairs("red circle, Blue star,  green square")
    assert held_out == {("red", "circle"), ("blue", "star"), ("green", "square")}
    seen = set()
    for i in range(1500):
        spec = sample_spec(np.random.default_rng([1, i]), exclude=held_out)
        seen |= {(o.color, o.shape) for o in spec.objects}
    assert not seen & held_out
    assert len(seen) == len(COLORS) * len(SHAPES) - len(held_out)  # everything else does appear
    data = ShapesDataset(40, exclude=held_out)
    assert all(not {(o.color, o.shape) for o in data.sample(i)[0].objects} & held_out for i in range(40))
    with pytest.raises(ValueError, match="valid: red, orange"):
        ShapesDataset(4, exclude=[("pink", "circle")])
    with pytest.raises(ValueError, match="valid: circle, square"):
        parse_pairs("red hexagon")
    with pytest.raises(ValueError, match="colour shape"):
        parse_pairs("red")
    with pytest.raises(ValueError, match="excluded"):
        sample_spec(np.random.default_rng(0), exclude={(c, s) for c in COLORS for s in SHAPES})


def test_captions_follow_grammar_and_relations_are_true():
    kinds = set()
    for i in range(600):
        spec = sample_spec(np.random.default_rng([2, i]))
        text = caption(spec)
        assert CAPTION_RE.match(text), text
        assert "a orange" not in text and "an red" not in text
        for o in spec.objects:
            assert f"{o.color} {o.shape}" in text
        for obj, stated in zip(spec.objects, spec.stated):
            assert ("cell" in stated) == (CELLS[obj.cell] in text) or spec.relations
        for r in spec.relations:
            assert r.relation in text
            assert _holds(r.relation, spec.objects[r.subject].cell, spec.objects[r.object].cell)
        kinds.add((len(spec.objects), bool(spec.relations)))
    assert kinds == {(1, False), (2, False), (2, True), (3, False)}
    spec = SceneSpec((ShapeObject("purple", "circle", "small", 1), ShapeObject("orange", "square", "large", 7)),
                     (Relation(0, "above", 1),))
    assert caption(spec) == "a purple circle above an orange square"
    spec = SceneSpec(spec.objects, (), (frozenset({"size", "cell"}), frozenset({"cell"})))
    assert caption(spec) == "a small purple circle at the top and an orange square at the bottom"


def test_spec_json_round_trip():
    for i in range(50):
        spec = sample_spec(np.random.default_rng([3, i]))
        assert SceneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        assert SceneSpec.from_dict(spec.to_json()) == spec
    with pytest.raises(ValueError, match="distinct cells"):
        SceneSpec((ShapeObject("red", "star", "small", 4), ShapeObject("blue", "star", "small", 4)))


def test_dataset_items_and_default_collate():
    data = ShapesDataset(8, seed=0)
    item = data[0]
    x = item["pixel_values"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and (x == 1).all(dim=0).float().mean() > 0.5  # mostly white
    spec = SceneSpec.from_dict(item["spec"])
    assert caption(spec) == item["caption"]
    # interiors are exact palette colours
    colors = {tuple(c) for c in np.asarray(data.sample(0)[1]).reshape(-1, 3)}
    assert all(COLORS[o.color] in colors for o in spec.objects)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert isinstance(batch["spec"][0], str)
    assert ShapesDataset(2, image_size=32)[1]["pixel_values"].shape == (3, 32, 32)


def test_checker_accepts_real_pairs(real):
    pairs, extra = real
    accepted = [check_detections(d, spec).passed for spec, d in pairs + extra]
    assert np.mean(accepted) >= 0.99
    spec, image = ShapesDataset(3, seed=7).sample(2)
    assert check(image, spec).passed and check(np.asarray(image), spec).passed
    blank = np.full((64, 64, 3), 255, dtype=np.uint8)
    assert check(blank, spec).failed[0] == "count"


def test_checker_reads_float_arrays_and_transparency():
    """[0, 1] floats (the pipeline's output_type="np") and a transparent-background PNG of a true scene pass;
    arrays outside the stated ranges are refused, not wrapped into another colour."""
    spec, image = ShapesDataset(3, seed=7).sample(2)
    assert check(np.asarray(image).astype(np.float32) / 255, spec).passed
    rgba = np.dstack([np.asarray(image), np.full((64, 64), 255, np.uint8)])
    rgba[(rgba[..., :3] == 255).all(-1)] = (0, 0, 0, 0)  # white background -> transparent black
    assert check(Image.fromarray(rgba, "RGBA"), spec).passed
    for bad in (np.asarray(image) / 127.5 - 1, np.asarray(image).astype(np.int16) * 2):
        with pytest.raises(ValueError, match="values in"):
            check(bad, spec)


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_checker_rejects_single_attribute_edits(real, kind):
    pairs, extra = real
    rng = np.random.default_rng(11)
    rejected = []
    for spec, detected in pairs + extra:
        edited = edit_spec(spec, kind, rng)
        if edited is None:
            continue
        assert edited != spec
        result = check_detections(detected, edited)
        rejected.append(kind in result.failed and not result.passed)
        if len(rejected) == 120:
            break
    assert len(rejected) >= 100
    assert np.mean(rejected) >= 0.99


def test_checker_rejects_mismatched_specs(real):
    pairs, _ = real
    rejected = [
        not check_detections(d, pairs[(i + 1) % len(pairs)][0]).passed
        for i, (spec, d) in enumerate(pairs)
        if caption(spec) != caption(pairs[(i + 1) % len(pairs)][0])
    ]
    assert np.mean(rejected) >= 0.99


def test_captions_without_rendering_match_items():
    ds = ShapesDataset(20, seed=4, exclude={("red", "circle")})
    assert ds.captions() == [ds[i]["caption"] for i in range(20)]


def test_new_shapes_are_drawn_and_checked_but_never_sampled():
    from latent_diffusion.data.shapes import NEW_SHAPES

    rng = np.random.default_rng(5)
    assert "heart" in NEW_SHAPES and "heart" not in SHAPES
    assert all(o.shape != "heart" for _ in range(200) for o in sample_spec(rng).objects)
    accepted = rejected = 0
    for _ in range(40):
        spec = sample_spec(rng, max_objects=2)
        o = spec.objects[0]
        heart = SceneSpec((ShapeObject(o.color, "heart", o.size, o.cell), *spec.objects[1:]), spec.relations,
                          spec.stated)
        accepted += check(render(heart, rng), heart).passed  # a spec holding a heart adds it to the candidates
        rejected += not check(render(heart, rng), spec, extra_shapes=("heart",)).passed  # a heart is no other shape
        rejected += not check(render(spec, rng), heart).passed
    assert accepted == 40 and rejected == 80
    with pytest.raises(ValueError, match="'hexagon'"):
        check(render(spec, rng), spec, extra_shapes=("hexagon",))


def test_edits_never_introduce_held_out_pairs():
    """Colour, shape and count edits (CLIP's hard negatives) respect the held-out pairs; without `exclude` the
    same edits do produce them, so the test can fail."""
    held_out = {("purple", "star"), ("cyan", "cross")}
    shown = {"with": 0, "without": 0}
    for i in range(3000):
        spec = sample_spec(np.random.default_rng([5, i]), exclude=held_out)
        kind = EDIT_KINDS[i % len(EDIT_KINDS)]
        for key, exclude in (("with", held_out), ("without", None)):
            edited = edit_spec(spec, kind, np.random.default_rng([6, i]), exclude)
            if edited is not None:
                shown[key] += any((o.color, o.shape) in held_out for o in edited.objects)
    assert shown["with"] == 0 and shown["without"] > 0
    from training.train_clip import hard_negative

    captions = [hard_negative(sample_spec(np.random.default_rng([7, i]), exclude=held_out),
                              np.random.default_rng([8, i]), EDIT_KINDS, held_out) for i in range(1000)]
    assert not any(c and ("purple star" in c or "cyan cross" in c) for c in captions)
