"""The Kontext-Shapes vocabulary, shared by the generator and the judge.

Everything the generator can draw and every word a prompt can use is named here, so
that `qk_jax.data` (which draws) and `qk_jax.eval` (which detects and scores) agree.

Geometry conventions (used by scene graphs, the renderer and the detector):
- x grows to the right, y grows downwards; an image is an array `[y, x, rgb]`.
- Object centres are normalised, `(cx, cy)` in `0..1` of the image width / height.
- An object's `r` is its circumradius as a fraction of `min(H, W)`; each size class has a
  nominal radius (`SIZES`), the generator jitters it by at most `SIZE_JITTER`.
"""

from __future__ import annotations

# Shapes, with the orientation the generator draws them in (degrees, see render.py).
SHAPES = ("circle", "square", "triangle", "star", "hexagon")

# The eight object colours (RGB). The judge classifies pixels against exactly these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 75),
    "green": (60, 180, 75),
    "blue": (0, 130, 200),
    "yellow": (255, 225, 25),
    "orange": (245, 130, 48),
    "purple": (145, 30, 180),
    "cyan": (70, 240, 240),
    "magenta": (240, 50, 230),
}
COLOUR_NAMES = tuple(COLOURS)

# Size classes: nominal circumradius as a fraction of min(H, W).
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.13, "large": 0.18}
SIZE_NAMES = tuple(SIZES)
SIZE_JITTER = 0.06  # relative jitter of r around the nominal radius
# Size-class boundaries for the judge: geometric means of neighbouring nominal radii.
SIZE_BOUNDS = ((SIZES["small"] * SIZES["medium"]) ** 0.5, (SIZES["medium"] * SIZES["large"]) ** 0.5)
# The subject of a reference image (customization / multi-subject) is drawn this big.
REFERENCE_RADIUS = 0.34

# The 3x3 grid: (column, row) -> phrase. Rows top/middle/bottom, columns left/center/right.
GRID: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (1, 0): "top",
    (2, 0): "top right",
    (0, 1): "left",
    (1, 1): "center",
    (2, 1): "right",
    (0, 2): "bottom left",
    (1, 2): "bottom",
    (2, 2): "bottom right",
}
CELL_NAMES = tuple(GRID.values())
CELL_OF_NAME = {name: cell for cell, name in GRID.items()}

# Pairwise relations between object centres: name -> (axis, sign). "a left of b" means
# a.cx < b.cx by at least the judge's margin; the generator keeps a wider margin.
RELATIONS: dict[str, tuple[str, int]] = {
    "left of": ("x", -1),
    "right of": ("x", 1),
    "above": ("y", -1),
    "below": ("y", 1),
}
RELATION_MARGIN_GEN = 0.15  # generator: centres at least this far apart along the axis
RELATION_MARGIN_JUDGE = 0.04  # judge: a relation holds beyond this margin

# Texture patterns of identity subjects (customization, multi-subject), drawn in
# PATTERN_RGB inside the subject. Only shapes with a roomy interior carry them.
PATTERNS = ("hstripes", "vstripes", "diagonal", "checker", "dots", "rings")
PATTERN_WORDS = {
    "hstripes": "horizontally striped",
    "vstripes": "vertically striped",
    "diagonal": "diagonally striped",
    "checker": "checkered",
    "dots": "polka-dot",
    "rings": "ringed",
}
PATTERN_RGB = (35, 35, 35)
SUBJECT_SHAPES = ("circle", "square", "hexagon")

# Backgrounds are neutral (low chroma), so they never read as an object colour.
BACKGROUNDS = ("plain", "stripes", "checker", "noise", "gradient")
BACKGROUND_GREY_RANGE = (80, 235)  # darker greys blend with magenta into purple-like fringes
BACKGROUND_MAX_TINT = 6  # max per-channel deviation from grey
PLAIN_BACKGROUND = 0.4  # default probability of a plain background (the rest: the textured kinds)

# Task families and their integer ids (the pipeline's `task_id`).
TASKS = ("t2i", "reconstruction", "transformation", "edit", "customization", "multi_subject")
TASK_IDS = {t: i for i, t in enumerate(TASKS)}

# Categories: GenEval-like for text-to-image, the edit / transformation type otherwise.
T2I_CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "attribute_binding")
EDIT_TYPES = ("recolor", "add", "remove", "move", "resize", "replace")
TRANSFORMS = ("flip_horizontal", "flip_vertical", "rotate90", "rotate180", "rotate270", "recolor", "invert")
CATEGORIES = {
    "t2i": T2I_CATEGORIES,
    "reconstruction": ("reconstruction",),
    "transformation": TRANSFORMS,
    "edit": EDIT_TYPES,
    "customization": ("single_subject",),
    "multi_subject": ("two_subjects", "three_subjects"),
}

MAX_OBJECTS = 4
MAX_REFERENCES = 3
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("x") else "s")
