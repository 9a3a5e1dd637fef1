"""Import real data from a JSONL manifest into ArrayRecord datasets (`qk-jax data import`).

One JSON object per line:

    {"task": "edit", "prompt": "make the sky pink", "target": "imgs/0001_out.png",
     "source": "imgs/0001_in.png", "references": [], "category": "recolor",
     "id": "0001", "split": "train"}

`task`, `prompt` and `target` are required; `source`, `references` (0..3), `category`,
`id` (default `<task>-<line>`), `split` (default `train`) and `scene` (a JSON object or
string) are optional. Image paths are read through `etils.epath`, so they may be local
(absolute, or relative to the manifest's folder) or remote (`gs://...`, whatever epath
reads). Images are stored as their encoded bytes (PNG, JPEG, WebP are kept as they are).

Every record is validated (JSON, required fields, task name, the task's number of
source / reference images, unique id, every image present and decodable); bad records
are skipped and reported (counts per reason and the first examples), never a crash. The
output is one tfds dataset per task, `OUT/<name>/<task>/1.0.0`, built atomically.
Images are read twice (validation, then writing): simple, and cheap next to training.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import re
from collections.abc import Iterable

from etils import epath
from tqdm import tqdm

from qk_jax.data import builders, records, vocab


class ManifestError(ValueError):
    """The manifest cannot be imported at all (missing, empty, nothing valid)."""


@dataclasses.dataclass
class Report:
    manifest: str
    total: int = 0
    valid: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list = dataclasses.field(default_factory=list)  # (line, message), up to 1000
    per_task: dict = dataclasses.field(default_factory=dict)  # task -> {split: count}
    max_examples: int = 10

    def bad(self, line: int, reason: str, message: str) -> None:
        self.reasons[reason] += 1
        if len(self.problems) < 1000:
            self.problems.append((line, message))

    @property
    def examples(self) -> list[tuple[int, str]]:
        """The first `max_examples` problems by line number."""
        return sorted(self.problems)[: self.max_examples]

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def to_dict(self) -> dict:
        return {
            "manifest": self.manifest,
            "total": self.total,
            "valid": self.valid,
            "skipped": self.skipped,
            "reasons": dict(self.reasons),
            "first_examples": [{"line": n, "problem": m} for n, m in self.examples],
            "per_task": self.per_task,
        }

    def summary(self) -> str:
        lines = [f"manifest {self.manifest}: {self.total} records, {self.valid} valid, {self.skipped} skipped"]
        lines += [f"  skipped ({reason}): {n}" for reason, n in sorted(self.reasons.items())]
        lines += [f"  line {n}: {m}" for n, m in self.examples]
        for task, counts in sorted(self.per_task.items()):
            lines.append(f"  wrote {task}: " + ", ".join(f"{s}={n}" for s, n in sorted(counts.items())))
        return "\n".join(lines)


def _resolve(path: str, base: epath.Path) -> epath.Path:
    p = epath.Path(path)
    return p if (p.is_absolute() or "://" in path) else base / path


def _parse(line_no: int, text: str, base: epath.Path, report: Report, seen_ids: set) -> dict | None:
    """JSON + field checks (no image IO). Returns the entry with resolved paths, or None."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        report.bad(line_no, "malformed JSON", f"malformed JSON: {e}")
        return None
    if not isinstance(entry, dict):
        report.bad(line_no, "malformed record", f"expected a JSON object, got {type(entry).__name__}")
        return None
    for key in ("task", "prompt", "target"):
        if not entry.get(key):
            report.bad(line_no, f"missing {key}", f"required field {key!r} is missing or empty")
            return None
    task = entry["task"]
    if task not in vocab.TASKS:
        report.bad(line_no, "unknown task", f"unknown task {task!r}; expected one of {list(vocab.TASKS)}")
        return None
    refs = entry.get("references") or []
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        report.bad(line_no, "malformed record", "field 'references' must be a list of paths")
        return None
    n_src, lo, hi = records.TASK_INPUTS[task]
    if len(refs) > vocab.MAX_REFERENCES or not lo <= len(refs) <= hi:
        report.bad(line_no, "reference count", f"task {task} takes {lo}..{hi} reference images, got {len(refs)}")
        return None
    if bool(n_src) != bool(entry.get("source")):
        report.bad(line_no, "source image", f"task {task} {'needs' if n_src else 'takes no'} source image")
        return None
    split = entry.get("split", "train")
    if not isinstance(split, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", split):
        report.bad(line_no, "malformed record", f"split {split!r} must be snake_case")
        return None
    rid = str(entry.get("id") or f"{task}-{line_no:07d}")
    if (split, rid) in seen_ids:
        report.bad(line_no, "duplicate id", f"id {rid!r} appears twice in split {split}")
        return None
    seen_ids.add((split, rid))
    scene = entry.get("scene", "")
    return {
        "line": line_no,
        "task": task,
        "prompt": str(entry["prompt"]),
        "split": split,
        "id": rid,
        "category": str(entry.get("category", "")),
        "scene": scene if isinstance(scene, str) else json.dumps(scene),
        "target": _resolve(entry["target"], base),
        "source": _resolve(entry["source"], base) if entry.get("source") else None,
        "references": [_resolve(r, base) for r in refs],
    }


def _load(entry: dict) -> tuple[dict | None, str | None]:
    """Reads and decodes an entry's images: (record, None) or (None, problem)."""
    images = {}
    for name, path in [("target", entry["target"]), ("source", entry["source"])] + [
        (f"references[{i}]", p) for i, p in enumerate(entry["references"])
    ]:
        if path is None:
            continue
        try:
            images[name] = path.read_bytes()
        except (FileNotFoundError, OSError) as e:
            return None, f"missing file: {name} {path} ({type(e).__name__})"
    rec = {
        "task": entry["task"],
        "prompt": entry["prompt"],
        "target": images["target"],
        "source": images.get("source", b""),
        "references": [images[f"references[{i}]"] for i in range(len(entry["references"]))],
        "scene": entry["scene"],
        "category": entry["category"],
        "id": entry["id"],
    }
    problems = records.validate(rec, decode=True)
    return (rec, None) if not problems else (None, "; ".join(problems))


def scan(manifest: str, threads: int = 8, max_examples: int = 10) -> tuple[list[dict], Report]:
    """Validates every record of a manifest; returns the valid entries and the report."""
    path = epath.Path(manifest)
    if not path.exists():
        raise ManifestError(f"manifest {manifest} does not exist")
    report = Report(manifest=str(manifest), max_examples=max_examples)
    seen: set = set()
    entries = []
    with path.open("r") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            report.total += 1
            entry = _parse(line_no, text, path.parent, report, seen)
            if entry is not None:
                entries.append(entry)
    if report.total == 0:
        raise ManifestError(f"manifest {manifest} is empty: no records to import")
    valid = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = pool.map(_load, entries)
        for entry, (_rec, problem) in tqdm(
            zip(entries, results), total=len(entries), desc="validating images", unit="rec", leave=False
        ):
            if problem is None:
                valid.append(entry)
            else:
                reason = "missing file" if problem.startswith("missing file") else "undecodable image"
                if "reference images" in problem or "source image" in problem:
                    reason = "malformed record"
                report.bad(entry["line"], reason, problem)
    report.valid = len(valid)
    return valid, report


def _examples(entries: list[dict], task: str):
    def gen(split: str) -> Iterable[dict]:
        for e in entries:
            if e["task"] == task and e["split"] == split:
                rec, problem = _load(e)
                if problem is not None:  # changed since validation: skip, never write half a record
                    continue
                yield rec

    return gen


def import_manifest(manifest: str, out: str, name: str = "imported", threads: int = 8) -> Report:
    """Validates `manifest` and writes one ArrayRecord dataset per task under `out/name`."""
    entries, report = scan(manifest, threads=threads)
    if not entries:
        raise ManifestError(f"manifest {manifest}: none of its {report.total} records is valid\n{report.summary()}")
    by_task: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in entries:
        by_task[e["task"]][e["split"]] += 1
    for task, split_counts in sorted(by_task.items()):
        if builders.dataset_dir(out, name, task) is not None:
            raise ManifestError(f"{out}/{name}/{task} already exists; delete it or import under another --name")
        config = builders.ImportConfig(
            task=task,
            examples=_examples(entries, task),
            split_names=sorted(split_counts),
            meta={"manifest": str(manifest), "counts": dict(split_counts)},
        )
        with builders.quiet_tfds():
            builder = builders.ImportedData(name=name, data_dir=out, config=config)
        builders.prepare(builder)
        report.per_task[task] = {s: len(builders.load_source(out, name, task, s)) for s in split_counts}
    report_path = epath.Path(out) / name / "import_report.json"
    report_path.write_text(json.dumps(report.to_dict(), indent=2))
    return report
