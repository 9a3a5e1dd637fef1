"""Prompt templates for every Kontext-Shapes task, chosen at random per record.

Each function takes the numpy Generator of the record and the parts to say, and returns
the prompt text. What a prompt states is recorded separately in the record's scene
(`spec`), so the judge never parses text.
"""

from __future__ import annotations

import numpy as np

from qk_jax.data import vocab


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def phrase(obj: dict, attrs=("size", "colour", "shape")) -> str:
    """'small red circle' from the attributes present (None values are left out)."""
    words = [obj[a] for a in attrs if obj.get(a)]
    if obj.get("pattern") and "pattern" in attrs:
        words.insert(len(words) - 1, vocab.PATTERN_WORDS[obj["pattern"]])
    return " ".join(words)


def article(words: str) -> str:
    return ("an " if words[:1] in "aeiou" else "a ") + words


def where(cell: str) -> str:
    """'in the top left', 'at the top', 'on the left', 'in the center'."""
    if cell in ("top", "bottom"):
        return f"at the {cell}"
    if cell in ("left", "right"):
        return f"on the {cell}"
    return f"in the {cell}"


def background_phrase(bg: dict) -> str:
    return "plain" if bg["kind"] == "plain" else "textured"


# --- text-to-image ---------------------------------------------------------------------

_T2I_SINGLE = (
    "a photo of {o}",
    "{o}",
    "an image of {o} on a {bg} background",
    "a picture showing {o}",
    "draw {o}",
    "a simple illustration of {o}",
)
_T2I_TWO = (
    "a photo of {a} and {b}",
    "{a} and {b}",
    "an image with {a} and {b}",
    "draw {a} together with {b}",
    "a picture of {a} next to {b}",
)
_T2I_COUNT = (
    "a photo of {n} {o}",
    "{n} {o}",
    "exactly {n} {o} on a {bg} background",
    "draw {n} {o}",
    "an image containing {n} {o}",
)
_T2I_REL = ("a photo of {a} {rel} {b}", "{a} {rel} {b}", "an image of {a} placed {rel} {b}", "draw {a} {rel} {b}")
_T2I_CELL = ("a photo of {a} {where}", "{a} {where}", "an image with {a} {where} of the frame", "draw {a} {where}")


def t2i_single(rng, obj: dict, bg: dict) -> str:
    return _pick(rng, _T2I_SINGLE).format(o=article(phrase(obj)), bg=background_phrase(bg))


def t2i_two(rng, a: dict, b: dict, bg: dict) -> str:
    return _pick(rng, _T2I_TWO).format(a=article(phrase(a)), b=article(phrase(b)), bg=background_phrase(bg))


def t2i_count(rng, n: int, obj: dict, bg: dict) -> str:
    words = phrase(obj)
    head, _, last = words.rpartition(" ")
    plural = (head + " " if head else "") + vocab.plural(last)
    n_word = vocab.COUNT_WORDS[n] if rng.random() < 0.7 else str(n)
    return _pick(rng, _T2I_COUNT).format(n=n_word, o=plural, bg=background_phrase(bg))


def t2i_relation(rng, a: dict, rel: str, b: dict) -> str:
    return _pick(rng, _T2I_REL).format(a=article(phrase(a)), rel=rel, b=article(phrase(b)))


def t2i_cell(rng, a: dict, cell: str) -> str:
    return _pick(rng, _T2I_CELL).format(a=article(phrase(a)), where=where(cell))


# --- reconstruction and transformation -------------------------------------------------

_RECON = (
    "reconstruct this image",
    "reproduce the image exactly",
    "copy the picture",
    "generate the same image",
    "redraw this image without changes",
)
_TRANSFORM = {
    "flip_horizontal": ("flip the image horizontally", "mirror the image left to right"),
    "flip_vertical": ("flip the image vertically", "mirror the image top to bottom", "turn the image upside down"),
    "rotate90": ("rotate the image 90 degrees counterclockwise", "turn the picture a quarter turn to the left"),
    "rotate180": ("rotate the image 180 degrees", "turn the picture half a turn"),
    "rotate270": ("rotate the image 90 degrees clockwise", "turn the picture a quarter turn to the right"),
    "recolor": ("make every object {c}", "recolor all the shapes {c}", "paint all objects {c}"),
    "invert": ("invert the colors of the image", "make a negative of the image", "invert the image"),
}


def reconstruction(rng) -> str:
    return _pick(rng, _RECON)


def transformation(rng, op: str, colour: str | None = None) -> str:
    return _pick(rng, _TRANSFORM[op]).format(c=colour)


# --- instruction editing ---------------------------------------------------------------

_EDIT = {
    "recolor": ("make the {o} {c}", "change the color of the {o} to {c}", "recolor the {o} {c}", "paint the {o} {c}"),
    "add": ("add {n} {where}", "put {n} {where}", "insert {n} {where}"),
    "remove": ("remove the {o}", "delete the {o}", "take away the {o}", "erase the {o}"),
    "move": ("move the {o} to the {cell}", "put the {o} in the {cell} instead", "shift the {o} to the {cell}"),
    "resize": ("make the {o} {size}", "resize the {o} to {size}", "change the {o} to a {size} one"),
    "replace": ("replace the {o} with {n}", "turn the {o} into {n}", "swap the {o} for {n}"),
}


def edit(
    rng,
    kind: str,
    obj: dict | None = None,
    new: dict | None = None,
    cell: str | None = None,
    colour: str | None = None,
    size: str | None = None,
) -> str:
    o = phrase(obj, ("colour", "shape")) if obj else ""
    n = article(phrase(new, ("size", "colour", "shape"))) if new else ""
    return _pick(rng, _EDIT[kind]).format(o=o, n=n, c=colour, size=size, cell=cell, where=where(cell) if cell else "")


# --- customization and multi-subject ---------------------------------------------------

_CUSTOM_CELL = (
    "place this subject {where}",
    "the subject from the picture, {where}",
    "put the subject of the image {where} on a {bg} background",
    "show the same subject {where}",
)
_CUSTOM_REL = (
    "place this subject {rel} {b}",
    "the subject from the picture {rel} {b}",
    "put the subject of the image {rel} {b}",
)
_ORDINALS = ("first", "second", "third")


def customization_cell(rng, cell: str, bg: dict) -> str:
    return _pick(rng, _CUSTOM_CELL).format(where=where(cell), bg=background_phrase(bg))


def customization_relation(rng, rel: str, other: dict) -> str:
    return _pick(rng, _CUSTOM_REL).format(rel=rel, b=article(phrase(other)))


def multi_subject_cells(rng, cells: list[str]) -> str:
    parts = [f"the {_ORDINALS[i]} subject {where(c)}" for i, c in enumerate(cells)]
    joined = ", ".join(parts[:-1]) + " and " + parts[-1]
    return _pick(rng, ("put {p}", "compose one scene with {p}", "place {p}")).format(p=joined)


def multi_subject_relation(rng, rel: str) -> str:
    return _pick(
        rng,
        (
            "put the first subject {rel} the second subject",
            "the first subject {rel} the second one",
            "place the first subject {rel} the second subject",
        ),
    ).format(rel=rel)
