"""Scene graphs: what is in a Kontext-Shapes image, sampled, placed, transformed, drawn.

A scene graph is a JSON-serialisable dict (see `Scene.to_dict`):

    {"height": H, "width": W,
     "background": {"kind": "plain"|"stripes"|"checker"|"noise"|"gradient",
                    "tones": [g0, g1], "tint": [r, g, b], ...kind parameters},
     "objects": [{"shape": "star", "colour": "red", "size": "small", "r": 0.091,
                  "cx": 0.31, "cy": 0.72, "rotation": 0.0, "pattern": null}, ...],
     "inverted": false}

`r` is the circumradius as a fraction of min(H, W), `(cx, cy)` the normalised centre
(x right, y down), `rotation` in degrees; `pattern` marks a textured identity subject.
`render(scene)` is a pure function of the graph, so a graph is all one needs to redraw
its image, and an edit that changes one object leaves every other pixel identical.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from qk_jax.data import render, vocab


class PlacementError(RuntimeError):
    """No placement satisfied the constraints within the retry budget."""


@dataclasses.dataclass
class Obj:
    shape: str
    colour: str
    size: str
    r: float
    cx: float = 0.5
    cy: float = 0.5
    rotation: float = 0.0
    pattern: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def cell(self) -> str:
        return cell_name(self.cx, self.cy)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Scene:
    height: int
    width: int
    background: dict
    objects: list[Obj]
    inverted: bool = False

    def to_dict(self) -> dict:
        return {
            "height": self.height,
            "width": self.width,
            "background": dict(self.background),
            "objects": [o.to_dict() for o in self.objects],
            "inverted": self.inverted,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(
            int(d["height"]),
            int(d["width"]),
            dict(d["background"]),
            [Obj(**o) for o in d["objects"]],
            bool(d.get("inverted", False)),
        )

    def copy(self) -> Scene:
        return Scene.from_dict(self.to_dict())


def cell_name(cx: float, cy: float) -> str:
    col, row = min(int(cx * 3), 2), min(int(cy * 3), 2)
    return vocab.GRID[(max(col, 0), max(row, 0))]


def render_scene(scene: Scene) -> np.ndarray:
    """The scene's image, (H, W, 3) uint8; deterministic."""
    canvas = render.draw_background(scene.background, scene.height, scene.width)
    for o in scene.objects:
        render.draw_object(canvas, o.shape, vocab.COLOURS[o.colour], o.cx, o.cy, o.r, o.rotation, o.pattern)
    img = render.to_uint8(canvas)
    return 255 - img if scene.inverted else img


# --- sampling ------------------------------------------------------------------------


def sample_background(rng: np.random.Generator, plain_prob: float = vocab.PLAIN_BACKGROUND) -> dict:
    lo, hi = vocab.BACKGROUND_GREY_RANGE
    kind = "plain" if rng.random() < plain_prob else str(rng.choice(vocab.BACKGROUNDS[1:]))
    g0 = float(rng.uniform(lo, hi))
    g1 = float(np.clip(g0 + rng.choice([-1, 1]) * rng.uniform(20, 60), lo, hi))
    tint = [round(float(t), 2) for t in rng.uniform(-vocab.BACKGROUND_MAX_TINT, vocab.BACKGROUND_MAX_TINT, 3)]
    spec = {"kind": kind, "tones": [round(g0, 2), round(g1, 2)], "tint": tint}
    if kind in ("stripes", "checker"):
        spec["period"] = round(float(rng.uniform(6, 16)), 2)
        spec["angle"] = float(rng.choice([0, 45, 90, 135]))
    elif kind == "gradient":
        spec["angle"] = round(float(rng.uniform(0, 360)), 1)
    elif kind == "noise":
        spec["period"] = int(rng.integers(2, 6))
        spec["seed"] = int(rng.integers(0, 2**31 - 1))
    return spec


def jitter_radius(rng: np.random.Generator, size: str) -> float:
    return round(vocab.SIZES[size] * (1 + rng.uniform(-vocab.SIZE_JITTER, vocab.SIZE_JITTER)), 5)


def make_obj(rng: np.random.Generator, shape: str, colour: str, size: str, pattern: str | None = None) -> Obj:
    return Obj(shape=shape, colour=colour, size=size, r=jitter_radius(rng, size), pattern=pattern)


def random_obj(
    rng: np.random.Generator,
    sizes: Sequence[str] = vocab.SIZE_NAMES,
    accept: Callable[[str, str], bool] = lambda colour, shape: True,
    shapes: Sequence[str] = vocab.SHAPES,
) -> Obj:
    """A random object with an accepted (colour, shape) pair, not yet placed."""
    for _ in range(1000):
        shape, colour = str(rng.choice(shapes)), str(rng.choice(vocab.COLOUR_NAMES))
        if accept(colour, shape):
            return make_obj(rng, shape, colour, str(rng.choice(sizes)))
    raise PlacementError("no accepted (colour, shape) pair")


def _inside_range(r_px: float, extent: int) -> tuple[float, float]:
    margin = (r_px + 1.5) / extent
    return margin, 1.0 - margin


def _sample_centre(rng, o: Obj, h: int, w: int, cell: str | None) -> tuple[float, float] | None:
    r_px = o.r * min(h, w)
    (xlo, xhi), (ylo, yhi) = _inside_range(r_px, w), _inside_range(r_px, h)
    if cell is not None:  # stay 0.04 inside the cell so the judge sees the same cell
        col, row = vocab.CELL_OF_NAME[cell]
        xlo, xhi = max(xlo, col / 3 + 0.04), min(xhi, (col + 1) / 3 - 0.04)
        ylo, yhi = max(ylo, row / 3 + 0.04), min(yhi, (row + 1) / 3 - 0.04)
    if xlo >= xhi or ylo >= yhi:
        return None
    return float(rng.uniform(xlo, xhi)), float(rng.uniform(ylo, yhi))


def relation_holds(a: Obj, b: Obj, relation: str, margin: float) -> bool:
    axis, sign = vocab.RELATIONS[relation]
    delta = (a.cx - b.cx) if axis == "x" else (a.cy - b.cy)
    return sign * delta > margin


def fits(o: Obj, others: Sequence[Obj], h: int, w: int) -> bool:
    """No overlap: centres at least r1 + r2 + a gap apart (pixels), so colours never blend."""
    m = min(h, w)
    gap = 2.0 + 0.03 * m
    for p in others:
        d = math.hypot((o.cx - p.cx) * w, (o.cy - p.cy) * h)
        if d < (o.r + p.r) * m + gap:
            return False
    return True


def place(
    rng: np.random.Generator,
    objs: list[Obj],
    h: int,
    w: int,
    cells: Sequence[str | None] | None = None,
    relations: Sequence[tuple[int, str, int]] = (),
    fixed: Sequence[Obj] = (),
    tries: int = 300,
) -> list[Obj]:
    """Assigns centres to `objs` (in place) satisfying cells, relations and no overlap.

    `cells[i]` pins object i to a grid cell; `relations` are `(i, name, j)` meaning
    "objs[i] <name> objs[j]"; `fixed` objects are already placed and must not be hit.
    Raises PlacementError after `tries` attempts.
    """
    cells = list(cells) if cells is not None else [None] * len(objs)
    for _ in range(tries):
        placed: list[Obj] = []
        ok = True
        for o, cell in zip(objs, cells):
            centre = _sample_centre(rng, o, h, w, cell)
            if centre is None:
                ok = False
                break
            o.cx, o.cy = round(centre[0], 5), round(centre[1], 5)
            if not fits(o, list(fixed) + placed, h, w):
                ok = False
                break
            placed.append(o)
        if ok and all(relation_holds(objs[i], objs[j], rel, vocab.RELATION_MARGIN_GEN) for i, rel, j in relations):
            return objs
    raise PlacementError(
        f"could not place {len(objs)} objects (cells={cells}, relations={list(relations)}) "
        f"in {h}x{w} after {tries} tries"
    )


# --- transformations (the `transformation` task) ----------------------------------


def transform_scene(scene: Scene, op: str, colour: str | None = None) -> Scene:
    """The scene graph of `transform_image(render_scene(scene), op)` (or of a recolour)."""
    out = scene.copy()
    if op == "invert":
        out.inverted = not out.inverted
        return out
    for o in out.objects:
        base = render.base_angle(o.shape)
        if op == "flip_horizontal":
            o.cx, o.rotation = 1.0 - o.cx, (180.0 - 2 * base - o.rotation) % 360
        elif op == "flip_vertical":
            o.cy, o.rotation = 1.0 - o.cy, (-2 * base - o.rotation) % 360
        elif op == "rotate90":  # np.rot90(k=1): counterclockwise on screen
            o.cx, o.cy, o.rotation = o.cy, 1.0 - o.cx, (o.rotation - 90.0) % 360
        elif op == "rotate180":
            o.cx, o.cy, o.rotation = 1.0 - o.cx, 1.0 - o.cy, (o.rotation + 180.0) % 360
        elif op == "rotate270":
            o.cx, o.cy, o.rotation = 1.0 - o.cy, o.cx, (o.rotation + 90.0) % 360
        elif op == "recolor":
            o.colour = colour
        else:
            raise ValueError(f"unknown transformation {op!r}; expected one of {vocab.TRANSFORMS}")
        o.cx, o.cy = round(o.cx, 5), round(o.cy, 5)
    if op in ("rotate90", "rotate270"):
        out.height, out.width = scene.width, scene.height
    if op != "recolor":  # the background went through the same pixel operation
        out.background = dict(out.background, transform=[*scene.background.get("transform", []), op])
    return out


def transform_image(img: np.ndarray, op: str) -> np.ndarray:
    """Pixel-exact image transformation (H, W, 3) uint8 -> uint8 (not for recolour)."""
    table = {
        "flip_horizontal": lambda a: a[:, ::-1],
        "flip_vertical": lambda a: a[::-1],
        "rotate90": lambda a: np.rot90(a, 1),
        "rotate180": lambda a: np.rot90(a, 2),
        "rotate270": lambda a: np.rot90(a, 3),
        "invert": lambda a: 255 - a,
    }
    return np.ascontiguousarray(table[op](img))
