"""Task generators: one Kontext-Shapes sample (scene graphs, prompt, judge spec) per call.

Each generator draws from the record's own numpy Generator and returns a `Sample`; the
caller (`records.generate_record`) resamples until the sample belongs to the requested
split (`splits.accepts`) and then renders it. `Sample.spec` is what the prompt asks for,
in the judge's terms (see `qk_jax.eval.score`):

- t2i, customization, multi_subject: `{"objects": [{"shape", "colour"|None, "size"|None,
  "cell"|None, "pattern"|None, "ref"|None}], "relations": [[i, "left of", j]], "exact": bool}`;
  `ref` is the index of the reference image showing that subject, `exact` asks for exactly
  as many matching objects as listed (counting).
- reconstruction: `{}` (the target scene is the answer).
- transformation: `{"op": op, "colour": c|None}`.
- edit: `{"type", "before": obj|None, "after": obj|None, "to_cell": cell|None,
  "region": [x0, y0, x1, y1]}`; before/after are the edited object in the source and
  target, region (normalised, padded) is the only area allowed to change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from qk_jax.data import prompts, splits, vocab
from qk_jax.data.scenes import (
    Obj,
    PlacementError,
    Scene,
    fits,
    make_obj,
    place,
    random_obj,
    sample_background,
    transform_scene,
)


@dataclasses.dataclass
class Context:
    height: int
    width: int
    split: str
    plain_background: float = vocab.PLAIN_BACKGROUND  # probability of a plain (untextured) background

    @property
    def always_colour(self) -> bool:  # the test split always names the colours it asks for
        return self.split == "test"

    def accept(self, colour: str, shape: str) -> bool:
        """Object sampler filter: held-out pairs are never drawn outside the test split."""
        return self.split == "test" or splits.pair_allowed_in_training(colour, shape)


@dataclasses.dataclass
class Sample:
    category: str
    prompt: str
    target: Scene
    source: Scene | None = None
    references: list[Scene] = dataclasses.field(default_factory=list)
    spec: dict = dataclasses.field(default_factory=dict)
    target_op: str | None = None  # pixel transformation of the source image that gives the target

    def graph(self) -> dict:
        return {
            "target": self.target.to_dict(),
            "source": self.source.to_dict() if self.source else None,
            "references": [r.to_dict() for r in self.references],
            "spec": self.spec,
        }


def _spec_obj(o: Obj, attrs, cell: str | None = None, ref: int | None = None) -> dict:
    d = {"shape": o.shape, "colour": None, "size": None, "cell": cell, "pattern": None, "ref": ref}
    for a in attrs:
        d[a] = getattr(o, a)
    return d


def _distinct_objs(rng, ctx: Context, n: int, sizes, distinct_shapes=False, distinct_colours=False) -> list[Obj]:
    objs: list[Obj] = []
    while len(objs) < n:
        o = random_obj(rng, sizes, ctx.accept)
        if any(
            p.key == o.key or (distinct_shapes and p.shape == o.shape) or (distinct_colours and p.colour == o.colour)
            for p in objs
        ):
            continue
        objs.append(o)
    return objs


def _sizes_for(n: int):
    return vocab.SIZE_NAMES if n <= 2 else ("small", "medium")


# --- text-to-image ----------------------------------------------------------------------


def gen_t2i(rng, ctx: Context) -> Sample:
    category = str(rng.choice(vocab.T2I_CATEGORIES))
    h, w = ctx.height, ctx.width
    bg = sample_background(rng, ctx.plain_background)
    colour_p = 1.0 if ctx.always_colour else 0.3
    relations: list = []
    exact = False
    if category in ("single_object", "colors"):
        (o,) = _distinct_objs(rng, ctx, 1, vocab.SIZE_NAMES)
        attrs = ["shape"] + (["colour"] if category == "colors" or rng.random() < colour_p else [])
        attrs += ["size"] if rng.random() < 0.3 else []
        objs, specs = place(rng, [o], h, w), [_spec_obj(o, attrs)]
        prompt = prompts.t2i_single(rng, specs[0], bg)
    elif category in ("two_objects", "attribute_binding"):
        objs = _distinct_objs(
            rng, ctx, 2, vocab.SIZE_NAMES, distinct_shapes=True, distinct_colours=category == "attribute_binding"
        )
        with_colour = category == "attribute_binding" or rng.random() < colour_p
        specs = [_spec_obj(o, ["shape"] + (["colour"] if with_colour else [])) for o in objs]
        place(rng, objs, h, w)
        prompt = prompts.t2i_two(rng, specs[0], specs[1], bg)
    elif category == "counting":
        n = int(rng.integers(2, vocab.MAX_OBJECTS + 1))
        proto = random_obj(rng, _sizes_for(n), ctx.accept)
        with_colour = rng.random() < max(colour_p, 0.5)
        objs = []
        for _ in range(n):
            colour = (
                proto.colour
                if with_colour
                else random_obj(rng, accept=lambda c, s: ctx.accept(c, proto.shape), shapes=(proto.shape,)).colour
            )
            objs.append(make_obj(rng, proto.shape, colour, str(rng.choice(_sizes_for(n)))))
        place(rng, objs, h, w)
        specs = [_spec_obj(o, ["shape"] + (["colour"] if with_colour else [])) for o in objs]
        exact = True
        prompt = prompts.t2i_count(rng, n, specs[0], bg)
    elif category == "position":
        if rng.random() < 0.5:
            objs = _distinct_objs(rng, ctx, 2, vocab.SIZE_NAMES, distinct_shapes=True)
            rel = str(rng.choice(list(vocab.RELATIONS)))
            place(rng, objs, h, w, relations=[(0, rel, 1)])
            attrs = ["shape"] + (["colour"] if rng.random() < max(colour_p, 0.5) else [])
            specs, relations = [_spec_obj(o, attrs) for o in objs], [[0, rel, 1]]
            prompt = prompts.t2i_relation(rng, specs[0], rel, specs[1])
        else:
            objs = _distinct_objs(rng, ctx, 1, vocab.SIZE_NAMES)
            cell = str(rng.choice(vocab.CELL_NAMES))
            place(rng, objs, h, w, cells=[cell])
            attrs = ["shape"] + (["colour"] if rng.random() < max(colour_p, 0.5) else [])
            specs = [_spec_obj(objs[0], attrs, cell=cell)]
            prompt = prompts.t2i_cell(rng, specs[0], cell)
    else:  # pragma: no cover - T2I_CATEGORIES is closed
        raise ValueError(category)
    target = Scene(h, w, bg, objs)
    return Sample(category, prompt, target, spec={"objects": specs, "relations": relations, "exact": exact})


# --- reconstruction and transformation -------------------------------------------------------


def _random_scene(rng, ctx: Context, n_max: int = vocab.MAX_OBJECTS, distinct=False) -> Scene:
    n = int(rng.integers(1, n_max + 1))
    objs = (
        _distinct_objs(rng, ctx, n, _sizes_for(n))
        if distinct
        else [random_obj(rng, _sizes_for(n), ctx.accept) for _ in range(n)]
    )
    for o in objs:
        if o.shape in ("triangle", "star"):
            o.rotation = float(rng.choice([0.0, 90.0, 180.0, 270.0]))
    place(rng, objs, ctx.height, ctx.width)
    return Scene(ctx.height, ctx.width, sample_background(rng, ctx.plain_background), objs)


def gen_reconstruction(rng, ctx: Context) -> Sample:
    scene = _random_scene(rng, ctx)
    return Sample("reconstruction", prompts.reconstruction(rng), scene.copy(), source=scene)


def gen_transformation(rng, ctx: Context) -> Sample:
    ops = (
        vocab.TRANSFORMS
        if ctx.height == ctx.width
        else tuple(op for op in vocab.TRANSFORMS if op not in ("rotate90", "rotate270"))
    )
    op = str(rng.choice(ops))
    source = _random_scene(rng, ctx, n_max=3)
    colour = None
    if op == "recolor":
        colour = str(rng.choice([c for c in vocab.COLOUR_NAMES if any(o.colour != c for o in source.objects)]))
    target = transform_scene(source, op, colour)
    return Sample(
        op,
        prompts.transformation(rng, op, colour),
        target,
        source=source,
        spec={"op": op, "colour": colour},
        target_op=None if op == "recolor" else op,
    )


# --- instruction editing ----------------------------------------------------------------


def _region(objs: list[Obj], h: int, w: int, pad_px: float = 2.0) -> list[float]:
    """Normalised box [x0, y0, x1, y1] around objects, padded by `pad_px` pixels."""
    m = min(h, w)
    x0 = min(o.cx - (o.r * m + pad_px) / w for o in objs)
    x1 = max(o.cx + (o.r * m + pad_px) / w for o in objs)
    y0 = min(o.cy - (o.r * m + pad_px) / h for o in objs)
    y1 = max(o.cy + (o.r * m + pad_px) / h for o in objs)
    return [round(max(x0, 0.0), 5), round(max(y0, 0.0), 5), round(min(x1, 1.0), 5), round(min(y1, 1.0), 5)]


def gen_edit(rng, ctx: Context) -> Sample:
    kind = str(rng.choice(vocab.EDIT_TYPES))
    h, w = ctx.height, ctx.width
    source = _random_scene(rng, ctx, n_max=3, distinct=True)
    if kind == "remove" and len(source.objects) < 2:
        raise PlacementError("remove needs two objects")  # a blank canvas must never be a right answer
    target = source.copy()
    i = int(rng.integers(len(source.objects)))
    before = source.objects[i]
    others = [o for j, o in enumerate(target.objects) if j != i]
    keys = {o.key for o in source.objects}
    after = target.objects[i]
    to_cell = None
    if kind == "recolor":
        after.colour = str(rng.choice([c for c in vocab.COLOUR_NAMES if (c, before.shape) not in keys]))
        prompt = prompts.edit(rng, kind, obj=before.to_dict(), colour=after.colour)
    elif kind == "add":
        new = random_obj(rng, vocab.SIZE_NAMES, lambda c, s: ctx.accept(c, s) and (c, s) not in keys)
        to_cell = str(rng.choice(vocab.CELL_NAMES))
        place(rng, [new], h, w, cells=[to_cell], fixed=source.objects, tries=60)
        target.objects.append(new)
        before, after = None, new
        prompt = prompts.edit(rng, kind, new=_spec_obj(new, ["colour", "shape"]), cell=to_cell)
    elif kind == "remove":
        target.objects.pop(i)
        after = None
        prompt = prompts.edit(rng, kind, obj=before.to_dict())
    elif kind == "move":
        to_cell = str(rng.choice([c for c in vocab.CELL_NAMES if c != before.cell]))
        place(rng, [after], h, w, cells=[to_cell], fixed=others, tries=60)
        prompt = prompts.edit(rng, kind, obj=before.to_dict(), cell=to_cell)
    elif kind == "resize":
        after.size = str(rng.choice([s for s in vocab.SIZE_NAMES if s != before.size]))
        after.r = make_obj(rng, after.shape, after.colour, after.size).r
        r_px = after.r * min(h, w)
        inside = (r_px + 1.5 <= after.cx * w <= w - r_px - 1.5) and (r_px + 1.5 <= after.cy * h <= h - r_px - 1.5)
        if not inside or not fits(after, others, h, w):
            raise PlacementError("resized object does not fit")
        prompt = prompts.edit(rng, kind, obj=before.to_dict(), size=after.size)
    else:  # replace
        new = random_obj(
            rng, (before.size,), lambda c, s: ctx.accept(c, s) and (c, s) not in keys and s != before.shape
        )
        new.cx, new.cy, new.r = before.cx, before.cy, before.r
        if not fits(new, others, h, w):
            raise PlacementError("replacement does not fit")
        target.objects[i] = after = new
        prompt = prompts.edit(rng, kind, obj=before.to_dict(), new=_spec_obj(new, ["colour", "shape"]))
    region = _region([o for o in (before, after) if o is not None], h, w)
    spec = {
        "type": kind,
        "before": before.to_dict() if before else None,
        "after": after.to_dict() if after else None,
        "to_cell": to_cell,
        "region": region,
    }
    return Sample(kind, prompt, target, source=source, spec=spec)


# --- customization and multi-subject ----------------------------------------------------------


def _subject(rng, ctx: Context, taken: set, patterns_taken: set) -> Obj:
    for _ in range(1000):
        shape, colour = str(rng.choice(vocab.SUBJECT_SHAPES)), str(rng.choice(vocab.COLOUR_NAMES))
        pattern = str(rng.choice(vocab.PATTERNS))
        if ctx.accept(colour, shape) and (colour, shape) not in taken and pattern not in patterns_taken:
            return make_obj(rng, shape, colour, "large", pattern=pattern)
    raise PlacementError("no subject identity left")


def _reference(rng, subject: Obj, ctx: Context) -> Scene:
    """The subject alone, big and centred, on a plain background: the reference image."""
    ref = Obj(subject.shape, subject.colour, "large", vocab.REFERENCE_RADIUS, 0.5, 0.5, 0.0, subject.pattern)
    bg = sample_background(rng, plain_prob=1.0)
    return Scene(ctx.height, ctx.width, bg, [ref])


def _subject_spec(o: Obj, ref: int, cell: str | None = None) -> dict:
    return _spec_obj(o, ["colour", "pattern"], cell=cell, ref=ref)


def gen_customization(rng, ctx: Context) -> Sample:
    h, w = ctx.height, ctx.width
    subject = _subject(rng, ctx, set(), set())
    bg = sample_background(rng, ctx.plain_background)
    if rng.random() < 0.5:
        cell = str(rng.choice(vocab.CELL_NAMES))
        place(rng, [subject], h, w, cells=[cell], tries=60)
        objs, specs, relations = [subject], [_subject_spec(subject, 0, cell)], []
        prompt = prompts.customization_cell(rng, cell, bg)
    else:
        other = random_obj(rng, ("small", "medium"), lambda c, s: ctx.accept(c, s) and (c, s) != subject.key)
        rel = str(rng.choice(list(vocab.RELATIONS)))
        objs = place(rng, [subject, other], h, w, relations=[(0, rel, 1)], tries=100)
        attrs = ["shape", "colour"] if rng.random() < max(0.5, float(ctx.always_colour)) else ["shape"]
        specs, relations = [_subject_spec(subject, 0), _spec_obj(other, attrs)], [[0, rel, 1]]
        prompt = prompts.customization_relation(rng, rel, specs[1])
    target = Scene(h, w, bg, objs)
    spec = {"objects": specs, "relations": relations, "exact": False}
    return Sample("single_subject", prompt, target, references=[_reference(rng, subject, ctx)], spec=spec)


def gen_multi_subject(rng, ctx: Context) -> Sample:
    h, w = ctx.height, ctx.width
    n = int(rng.integers(2, vocab.MAX_REFERENCES + 1))
    subjects: list[Obj] = []
    for _ in range(n):
        subjects.append(_subject(rng, ctx, {s.key for s in subjects}, {s.pattern for s in subjects}))
    bg = sample_background(rng, ctx.plain_background)
    if n == 2 and rng.random() < 0.5:
        rel = str(rng.choice(list(vocab.RELATIONS)))
        place(rng, subjects, h, w, relations=[(0, rel, 1)], tries=100)
        specs, relations = [_subject_spec(s, i) for i, s in enumerate(subjects)], [[0, rel, 1]]
        prompt = prompts.multi_subject_relation(rng, rel)
    else:
        for _ in range(40):
            cells = [str(c) for c in rng.choice(vocab.CELL_NAMES, n, replace=False)]
            try:
                place(rng, subjects, h, w, cells=cells, tries=30)
                break
            except PlacementError:
                continue
        else:
            raise PlacementError(f"could not place {n} subjects")
        specs, relations = [_subject_spec(s, i, c) for i, (s, c) in enumerate(zip(subjects, cells))], []
        prompt = prompts.multi_subject_cells(rng, cells)
    target = Scene(h, w, bg, subjects)
    refs = [_reference(rng, s, ctx) for s in subjects]
    category = "two_subjects" if n == 2 else "three_subjects"
    return Sample(
        category, prompt, target, references=refs, spec={"objects": specs, "relations": relations, "exact": False}
    )


GENERATORS: dict[str, Callable[[np.random.Generator, Context], Sample]] = {
    "t2i": gen_t2i,
    "reconstruction": gen_reconstruction,
    "transformation": gen_transformation,
    "edit": gen_edit,
    "customization": gen_customization,
    "multi_subject": gen_multi_subject,
}
