"""Scoring generations against Kontext-Shapes scene graphs (the automatic judge).

`score_sample(record, image)` returns `{"id", "task", "category", "score", "checks",
"details"}`; `score` is 1.0 when every check passes, else 0.0 (GenEval style), and the
checks say what failed. Per task:

- t2i: the prompt's objects (only the attributes the prompt states: shape, colour, size,
  grid cell) are all detected, on distinct detections, with the stated relations
  ("left of" ...); counting prompts need exactly that many matching objects.
- reconstruction / transformation: every object of the target scene is detected with its
  shape, colour and size within `pos_tol` of its place, no extra object, and the image is
  close to the target (PSNR >= `psnr_fidelity`). An inverted target is judged inverted back.
- edit: the instruction is satisfied (the edited object is detected in its new state and
  place, the old one is gone where the edit removes it, the object count is the target's)
  AND the rest is preserved (PSNR >= `psnr_preserved` against the source outside the
  edited region; SSIM is reported too).
- customization / multi_subject: every subject is detected with the identity of its
  reference image (shape, colour and texture label from the texture signature, measured
  on the reference image itself), placed as described (cell / relation), and every other
  described object is present.

`score_records(records, images)` and `score_folder(records, folder)` aggregate to
`{"overall", "per_task", "per_category", "n", "missing", "samples"}`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from etils import epath
from scipy import ndimage

from qk_jax.data import buckets, records, vocab
from qk_jax.eval import detect as detect_lib


@dataclasses.dataclass(frozen=True)
class ScoreParams:
    pos_tol: float = 0.08  # normalised centre distance that counts as "the same place"
    psnr_preserved: float = 20.0  # dB, edit: outside the edited region vs the source
    psnr_fidelity: float = 16.0  # dB, reconstruction / transformation vs the target
    detect: detect_lib.DetectParams = detect_lib.DetectParams()


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR (dB) of uint8-range images over `mask` (all pixels if None)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    d = d.mean(-1)
    mse = float(d[mask].mean()) if mask is not None else float(d.mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, sigma: float = 1.5) -> float:
    """Mean SSIM (gaussian window, grey) over `mask`."""
    x, y = a.astype(np.float64).mean(-1), b.astype(np.float64).mean(-1)
    f = lambda z: ndimage.gaussian_filter(z, sigma, mode="reflect")
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[mask].mean() if mask is not None else s.mean())


def _to_uint8(image) -> np.ndarray:
    return np.clip(np.round(detect_lib.as_float_image(image) * 255.0), 0, 255).astype(np.uint8)


def _matches(d: detect_lib.Detection, want: dict, identity: dict | None = None) -> bool:
    for attr in ("shape", "colour", "size"):
        if want.get(attr) and getattr(d, attr) != want[attr]:
            return False
    if want.get("cell") and d.cell != want["cell"]:
        return False
    if identity is not None:
        return d.shape == identity["shape"] and d.colour == identity["colour"] and d.pattern == identity["pattern"]
    if want.get("pattern") and d.pattern != want["pattern"]:
        return False
    return True


def _relation_ok(a: detect_lib.Detection, b: detect_lib.Detection, rel: str) -> bool:
    axis, sign = vocab.RELATIONS[rel]
    delta = (a.cx - b.cx) if axis == "x" else (a.cy - b.cy)
    return sign * delta > vocab.RELATION_MARGIN_JUDGE


def _assign(cands: list[list[int]], relations, dets) -> list[int] | None:
    """An injective choice of one candidate per spec object satisfying the relations."""
    chosen: list[int] = []

    def ok_so_far() -> bool:
        k = len(chosen)
        for i, rel, j in relations:
            if i < k and j < k and not _relation_ok(dets[chosen[i]], dets[chosen[j]], rel):
                return False
        return True

    def search(k: int) -> bool:
        if k == len(cands):
            return True
        for c in cands[k]:
            if c not in chosen:
                chosen.append(c)
                if ok_so_far() and search(k + 1):
                    return True
                chosen.pop()
        return False

    return list(chosen) if search(0) else None


def _reference_identity(record: dict, ref: int, want: dict, params: ScoreParams) -> dict:
    """The subject identity as seen in reference image `ref` (its largest detection)."""
    refs = record.get("references") or []
    if ref is not None and ref < len(refs):
        dets = detect_lib.detect(records.decode_image(refs[ref]), params.detect)
        if dets:
            d = max(dets, key=lambda d: d.area_frac)
            return {"shape": d.shape, "colour": d.colour, "pattern": d.pattern, "signature": list(d.signature)}
    return {"shape": want["shape"], "colour": want["colour"], "pattern": want.get("pattern")}


def _score_spec(record: dict, spec: dict, dets, params: ScoreParams) -> tuple[dict, dict]:
    objs, relations = spec["objects"], [tuple(r) for r in spec.get("relations", [])]
    identities = [_reference_identity(record, o["ref"], o, params) if o.get("ref") is not None else None for o in objs]
    loose = [{k: o.get(k) for k in ("shape", "colour")} for o in objs]
    unplaced = [dict(o, cell=None) for o in objs]
    checks = {
        "present": _assign([[i for i, d in enumerate(dets) if _matches(d, w)] for w in loose], [], dets) is not None,
        "attributes": _assign(
            [[i for i, d in enumerate(dets) if _matches(d, w, ident)] for w, ident in zip(unplaced, identities)],
            [],
            dets,
        )
        is not None,
    }
    full = _assign(
        [[i for i, d in enumerate(dets) if _matches(d, w, ident)] for w, ident in zip(objs, identities)],
        relations,
        dets,
    )
    if any(o.get("cell") for o in objs) or relations:
        checks["placed"] = full is not None
    if spec.get("exact"):
        wanted = collections.Counter(json.dumps(w, sort_keys=True) for w in unplaced)
        checks["count"] = all(sum(_matches(d, json.loads(w)) for d in dets) == n for w, n in wanted.items())
    checks["all"] = full is not None and checks.get("count", True)
    details = {"identities": [i for i in identities if i is not None]} if any(identities) else {}
    return checks, details


def _score_scene(scene: dict, dets, params: ScoreParams) -> dict:
    """Every target object detected in place with its attributes, nothing extra."""
    cands = []
    for o in scene["objects"]:
        cands.append(
            [
                i
                for i, d in enumerate(dets)
                if d.shape == o["shape"]
                and d.colour == o["colour"]
                and d.size == o["size"]
                and math.hypot(d.cx - o["cx"], d.cy - o["cy"]) <= params.pos_tol
            ]
        )
    return {"objects": _assign(cands, [], dets) is not None, "count": len(dets) == len(scene["objects"])}


def _region_mask(region, h: int, w: int) -> np.ndarray:
    x0, y0, x1, y1 = region
    inside = np.zeros((h, w), bool)
    inside[int(math.floor(y0 * h)) : int(math.ceil(y1 * h)), int(math.floor(x0 * w)) : int(math.ceil(x1 * w))] = True
    return inside


def _score_edit(record: dict, spec: dict, graph: dict, img: np.ndarray, dets, params: ScoreParams):
    kind, before, after = spec["type"], spec["before"], spec["after"]

    def near(d, o):
        return math.hypot(d.cx - o["cx"], d.cy - o["cy"]) <= params.pos_tol

    checks = {}
    if after is not None:
        want = {"shape": after["shape"], "colour": after["colour"]}
        if kind == "resize":
            want["size"] = after["size"]
        if spec.get("to_cell"):
            checks["edited"] = any(_matches(d, dict(want, cell=spec["to_cell"])) for d in dets)
        else:
            checks["edited"] = any(_matches(d, want) and near(d, after) for d in dets)
    if kind in ("remove", "move", "replace", "recolor"):
        checks["old_gone"] = not any(
            d.shape == before["shape"] and d.colour == before["colour"] and near(d, before) for d in dets
        )
    checks["count"] = len(dets) == len(graph["target"]["objects"])
    checks["instruction"] = all(checks.values())
    source = records.decode_image(record["source"])
    gen = img if img.shape[:2] == source.shape[:2] else buckets.resize_crop(img, source.shape[:2])
    outside = ~_region_mask(spec["region"], *source.shape[:2])
    p, s = psnr(gen, source, outside), ssim(gen, source, outside)
    checks["preserved"] = p >= params.psnr_preserved
    checks["all"] = checks["instruction"] and checks["preserved"]
    return checks, {"psnr_outside": round(p, 2) if math.isfinite(p) else "inf", "ssim_outside": round(s, 4)}


def _normalized(record: dict) -> dict:
    """A record with text fields as str (as read from a data set, they may be bytes)."""
    return records.normalize(record) if not isinstance(record.get("prompt"), str) else record


def score_sample(record: dict, image, params: ScoreParams = ScoreParams()) -> dict:
    """Scores one generated image (any RGB array) against a generated record (see module docstring)."""
    record = _normalized(record)
    if not record.get("scene"):
        raise ValueError(f"record {record.get('id')!r} has no scene graph: only Kontext-Shapes records can be scored")
    graph = json.loads(record["scene"])
    spec, task = graph.get("spec", {}), record["task"]
    img = _to_uint8(image)
    inverted = bool(graph["target"].get("inverted"))
    dets = detect_lib.detect(255 - img if inverted else img, params.detect)
    details: dict = {}
    if task in ("t2i", "customization", "multi_subject"):
        checks, details = _score_spec(record, spec, dets, params)
    elif task in ("reconstruction", "transformation"):
        checks = _score_scene(graph["target"], dets, params)
        target = records.decode_image(record["target"])
        gen = img if img.shape[:2] == target.shape[:2] else buckets.resize_crop(img, target.shape[:2])
        p = psnr(gen, target)
        details["psnr"] = round(p, 2) if math.isfinite(p) else "inf"
        checks["fidelity"] = p >= params.psnr_fidelity
        checks["all"] = all(checks.values())
    elif task == "edit":
        checks, details = _score_edit(record, spec, graph, img, dets, params)
    else:
        raise ValueError(f"record {record.get('id')!r}: unknown task {task!r}")
    return {
        "id": record["id"],
        "task": task,
        "category": record.get("category", ""),
        "score": 1.0 if checks.pop("all") else 0.0,
        "checks": checks,
        "details": details,
        "detections": [d.to_json() for d in dets],
    }


# Tasks whose judge reads only the prompt (and the reference images): an image made for one
# record can be judged against another. An edit is judged against its own source image, so
# against another record's it fails by construction.
PROMPT_JUDGED_TASKS = ("t2i", "customization", "multi_subject")


def against_next_prompts(recs: Sequence[dict], images: Sequence, params: ScoreParams = ScoreParams()) -> list[dict]:
    """Each image scored against the next record's prompt (cyclically), the chance level of
    `score_sample`: what the judge passes on images that were not made for the prompt it reads
    (a sample drawn at random fits some prompt now and then). The gap between a set's own score
    and this is what its samples owe to their prompts. Records of one task in
    `PROMPT_JUDGED_TASKS`; at least two."""
    if len(recs) != len(images):
        raise ValueError(f"{len(recs)} records against {len(images)} images")
    if len(recs) < 2:
        raise ValueError("the chance level needs at least two records, each judged against another's prompt")
    tasks = {_normalized(r)["task"] for r in recs}
    if not tasks <= set(PROMPT_JUDGED_TASKS):
        raise ValueError(f"tasks {sorted(tasks - set(PROMPT_JUDGED_TASKS))} are judged against their own inputs")
    return [score_sample(recs[(k + 1) % len(recs)], image, params) for k, image in enumerate(images)]


def chance_level(recs: Sequence[dict], images: Sequence, params: ScoreParams = ScoreParams()) -> float | None:
    """The mean score of `against_next_prompts`, or None where a set has none (an edit task, or
    fewer than two records)."""
    if len(recs) < 2 or _normalized(recs[0])["task"] not in PROMPT_JUDGED_TASKS:
        return None
    return float(np.mean([r["score"] for r in against_next_prompts(recs, images, params)]))


def summarize(results: Sequence[dict], missing: int = 0) -> dict:
    """Mean scores overall, per task and per task/category."""
    per_task, per_cat = collections.defaultdict(list), collections.defaultdict(list)
    for r in results:
        per_task[r["task"]].append(r["score"])
        per_cat[f"{r['task']}/{r['category']}"].append(r["score"])
    mean = lambda v: round(float(np.mean(v)), 4) if v else 0.0
    return {
        "overall": mean([r["score"] for r in results]),
        "n": len(results),
        "missing": missing,
        "per_task": {k: mean(v) for k, v in sorted(per_task.items())},
        "per_category": {k: mean(v) for k, v in sorted(per_cat.items())},
    }


def score_records(
    recs: Iterable[dict],
    image_fn: Callable[[dict], np.ndarray | None],
    params: ScoreParams = ScoreParams(),
    progress: bool = False,
) -> dict:
    """Scores `image_fn(record)` for every record (None = missing image, scores 0)."""
    results, missing = [], 0
    recs = list(recs)
    it = recs
    if progress:
        from tqdm import tqdm

        it = tqdm(recs, desc="scoring", unit="img")
    for rec in it:
        rec = _normalized(rec)
        img = image_fn(rec)
        if img is None:
            missing += 1
            results.append(
                {
                    "id": rec["id"],
                    "task": rec["task"],
                    "category": rec["category"],
                    "score": 0.0,
                    "checks": {"image": False},
                    "details": {"missing": True},
                    "detections": [],
                }
            )
            continue
        results.append(score_sample(rec, img, params))
    return dict(summarize(results, missing), samples=results)


def folder_images(folder: str) -> Callable[[dict], np.ndarray | None]:
    """Looks up `<folder>/<id>.png` (or .jpg / .jpeg / .webp) for a record; a file that does not
    decode raises ValueError naming it."""
    base = epath.Path(folder)

    def image_fn(rec: dict):
        for ext in (".png", ".jpg", ".jpeg", ".webp"):
            p = base / f"{rec['id']}{ext}"
            if p.exists():
                try:
                    return records.decode_image(p.read_bytes())
                except Exception as e:  # noqa: BLE001 - PIL raises several types
                    raise ValueError(f"generation {p} cannot be decoded: {e}") from None
        return None

    return image_fn


def score_folder(recs: Iterable[dict], folder: str, params: ScoreParams = ScoreParams(), progress: bool = False):
    """`score_records` with generations read from `folder/<record id>.png`."""
    return score_records(recs, folder_images(folder), params, progress)
