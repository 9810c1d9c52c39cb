"""Built-in data sets: procedurally generated shapes scenes with a checker for generated images."""

from latent_diffusion.data.checker import CheckResult, DetectedObject, check, check_detections, detect
from latent_diffusion.data.shapes import (
    CELLS,
    COLORS,
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

__all__ = [
    "CELLS",
    "COLORS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "CheckResult",
    "DetectedObject",
    "Relation",
    "SceneSpec",
    "ShapeObject",
    "ShapesDataset",
    "caption",
    "check",
    "check_detections",
    "detect",
    "edit_spec",
    "parse_pairs",
    "render",
    "sample_spec",
]
