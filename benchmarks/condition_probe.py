"""Does the condition stream say what the prompt says? Linear probes of the prompt's attributes.

    PYTHONPATH=. python benchmarks/condition_probe.py --checkpoint RUN [--step N] [--data_dir DIR]
        [--fit 3000] [--init] [--min-records 20] [--task t2i|reconstruction]

The DiT can only draw what its condition tokens make readable. On text-to-image records of the
run's data, a ridge-regression probe (one-vs-all on standardised features, the ridge chosen on a
held-out fifth of the fit records) is fit on training records and scored on the next training
records it has not seen and on the validation split, for each attribute a prompt states:

- one object: its colour, shape, size, grid cell;
- two objects (`a red circle and a blue square`, relations included): the first and the second
  object's colour and shape, which only a reader of word order can tell apart.

Features of each record:

- words: the counts of the prompt's token ids, the template's shared prefix excluded. What the
  words say to a reader that ignores their order: the ceiling for one object, a guess for two;
- kontext (VLM): the K kontext query states the VLM returns, concatenated;
- kontext (stream): the same K tokens after the connector, as the DiT receives them;
- prompt (stream): the connector's prompt tokens, mean-pooled over the prompt.

Then what the prompt is worth to the loss at all: from pure noise (t = 1, where sampling starts)
the best prediction of a target given its prompt is the mean image of the prompt's scene spec,
and given nothing the mean of all images. Over the training records whose spec is drawn at least 3
times, the table gives the ratio of the two mean-squared errors (the within-spec variance,
unbiased, over the total variance) per kind of prompt: the ceiling of the t = 1 condition gain
that the learning signal measures.

With `--task reconstruction` the records are reconstructions instead, whose VLM sees the target
picture itself (the prompt is always the same), and the probes ask where and what the picture's
objects are: how many, and the largest one's colour, shape, 3 x 3 grid cell and 8 x 8 cell (the
token of the demo's DiT holding its centre). A condition that holds the picture's layout answers
the cells. Probed: the kontext tokens, and the picture's own vision tokens in the stream (the VLM's
states at its merged patches, after the connector, concatenated in order), as the DiT receives them.

With `--init` the run's config is probed with freshly initialised weights instead (the random
VLM the demo starts from, before stage 1 adapts it). Prints one table of accuracies with the
majority-class rate beside them. Numbers: BENCHMARKS.md, "Learning".
"""

from __future__ import annotations

import argparse
import collections
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qk_jax import sharding
from qk_jax.data import builders
from qk_jax.data import records as records_lib
from qk_jax.sample import Sampler

ONE = ("colour", "shape", "size", "cell")
TWO = ("colour", "shape")
FEATURES = ("words", "kontext (VLM)", "kontext (stream)", "prompt (stream)")
CHUNK = 64


def attribute_labels(rec: dict) -> dict[str, str]:
    """{'1 colour': 'red', ..., '2a shape': 'circle', '2b colour': ...}: what the prompt states."""
    spec = json.loads(rec["scene"])["spec"] if rec.get("scene") else {}
    objs = spec.get("objects") or []
    if spec.get("exact"):  # counting prompts name one kind of object n times
        return {}
    if len(objs) == 1:
        return {f"1 {a}": objs[0][a] for a in ONE if objs[0].get(a)}
    if len(objs) == 2:
        return {f"2{side} {a}": o[a] for side, o in zip("ab", objs) for a in TWO if o.get(a)}
    return {}


IMAGE_FEATURES = ("kontext (VLM)", "kontext (stream)", "vision tokens (stream)")


def image_labels(rec: dict) -> dict[str, str]:
    """{'objects': '2', 'largest colour': 'red', ...}: where and what a record's target objects are
    (from its scene; centres and radii in [0, 1] of the picture's side)."""
    objs = json.loads(rec["scene"])["target"]["objects"] if rec.get("scene") else []
    if not objs:
        return {}
    big = max(objs, key=lambda o: o["r"])

    def cell(n: int) -> str:
        row, col = (min(int(v * n), n - 1) for v in (big["cy"], big["cx"]))
        return f"{row},{col}"

    return {
        "objects": str(len(objs)),
        "largest colour": big["colour"],
        "largest shape": big["shape"],
        "largest cell (3 x 3)": cell(3),
        "largest cell (8 x 8)": cell(8),
    }


def record_features(sampler: Sampler, condition, recs: list[dict]) -> dict[str, np.ndarray]:
    """Each feature of `FEATURES` for `recs` (text-to-image records, one group): name -> (N, D);
    "words" as (N, T) token ids of the prompt part of the stream, -1 elsewhere. `condition`:
    the jitted `model.condition`, compiled once for every call."""
    k = sampler.kcfg.num_queries
    out: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for i in range(0, len(recs), CHUNK):
        batch = sampler.model_batch(recs[i : i + CHUNK])
        with jax.set_mesh(sampler.mesh), sharding.activation_rules_context():
            cond, mask, kontext = condition(sampler.params, batch)
        index = np.asarray(batch["cond_index"])
        ids = np.asarray(batch["input_ids"])
        cond, mask, kontext = (np.asarray(jax.device_get(a), np.float64) for a in (cond, mask, kontext))
        is_prompt = mask.astype(bool) & (index < ids.shape[1])
        prompt_ids = np.take_along_axis(ids, np.clip(index, 0, ids.shape[1] - 1), axis=1)
        out["words"].append(np.where(is_prompt, prompt_ids, -1))
        out["kontext (VLM)"].append(kontext.reshape(len(ids), -1))
        is_query = index >= ids.shape[1]
        if not np.all(is_query.sum(1) == k):
            raise ValueError(f"a packed condition row does not hold the {k} kontext tokens")
        out["kontext (stream)"].append(cond[is_query].reshape(len(ids), -1))
        pooled = (cond * is_prompt[..., None]).sum(1) / np.maximum(is_prompt.sum(1, keepdims=True), 1)
        out["prompt (stream)"].append(pooled)
        is_vision = is_prompt & (prompt_ids == sampler.kcfg.vlm.image_token_id)
        if is_vision.any():  # records with an input picture: its vision tokens in the stream, in order
            counts = is_vision.sum(1)
            if not np.all(counts == counts[0]):
                raise ValueError(f"records with {sorted(set(counts.tolist()))} vision tokens: probe one picture size")
            out["vision tokens (stream)"].append(cond[is_vision].reshape(len(ids), -1))
    width = max(w.shape[1] for w in out["words"])  # the packed stream's length varies by chunk
    out["words"] = [np.pad(w, ((0, 0), (0, width - w.shape[1])), constant_values=-1) for w in out["words"]]
    return {name: np.concatenate(parts) for name, parts in out.items()}


def bag_of_words(token_ids: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """(N, T) token ids (-1: none) -> (N, V) counts of each id of `vocabulary` (ids elsewhere dropped)."""
    return (token_ids[..., None] == vocabulary[None, None]).sum(1).astype(np.float64)


def ridge_probe(x_fit: np.ndarray, y_fit: np.ndarray, tests: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """Accuracy on each (x, y) of `tests` of a ridge one-vs-all classifier fit on (x_fit, y_fit)."""
    classes = np.unique(y_fit)
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    z = (x_fit - mu) / sd
    onehot = (y_fit[:, None] == classes[None]).astype(np.float64)
    n_tune = max(len(z) // 5, 1)

    def fit(zz, yy, lam):
        # Dual form (N x N) when features outnumber records: the same solution, a smaller solve.
        if zz.shape[1] > zz.shape[0]:
            return zz.T @ np.linalg.solve(zz @ zz.T + lam * np.eye(len(zz)), yy)
        return np.linalg.solve(zz.T @ zz + lam * np.eye(zz.shape[1]), zz.T @ yy)

    def accuracy(w, zz, labels):
        return float(np.mean(classes[np.argmax(zz @ w, axis=1)] == labels))

    lams = [1e-2 * len(z), 1e-1 * len(z), len(z), 10.0 * len(z)]
    tune = [accuracy(fit(z[n_tune:], onehot[n_tune:], lam), z[:n_tune], y_fit[:n_tune]) for lam in lams]
    w = fit(z, onehot, lams[int(np.argmax(tune))])
    return [accuracy(w, (x - mu) / sd, y) for x, y in tests]


def spec_key(rec: dict) -> tuple[str, str]:
    """(the prompt's scene spec as a canonical string, its kind: objects named, placed or not)."""
    spec = json.loads(rec["scene"])["spec"]
    objs = [{a: o.get(a) for a in ONE} for o in spec["objects"]]
    placed = any(o["cell"] for o in objs) or bool(spec.get("relations"))
    kind = f"{len(objs)} object{'s' if len(objs) > 1 else ''}" + (", placed" if placed else "")
    key = json.dumps({"objects": objs, "relations": spec.get("relations"), "exact": spec.get("exact")}, sort_keys=True)
    return key, kind


def prompt_ceiling(recs: list[dict]) -> list[tuple[str, int, float]]:
    """[(kind, images, within-spec / total mean-squared error)] over the records whose spec is
    drawn at least 3 times, with the total row first: the best t = 1 prediction from the prompt
    (the spec's mean image) against the best from nothing (the mean of all images)."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    kinds, images = {}, []
    for rec in recs:
        key, kinds[key] = spec_key(rec)
        groups[key].append(len(images))
        images.append(records_lib.decode_image(rec["target"]).astype(np.float32) / 127.5 - 1)
    x = np.stack(images)
    total_mean = x.mean(0)
    sums: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for key, idx in groups.items():
        if len(idx) < 3:
            continue
        g = x[idx]
        # Squared deviations from the spec's own mean, times n / (n - 1): unbiased for its variance.
        within = ((g - g.mean(0)) ** 2).mean(axis=(1, 2, 3)) * len(idx) / (len(idx) - 1)
        total = ((g - total_mean) ** 2).mean(axis=(1, 2, 3))
        for name in ("all", kinds[key]):
            sums[name][0] += float(within.sum())
            sums[name][1] += float(total.sum())
            sums[name][2] += len(idx)
    return [(k, int(v[2]), v[0] / v[1]) for k, v in sorted(sums.items(), key=lambda kv: (kv[0] != "all", kv[0]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run workdir or checkpoint folder")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--data_dir", default=None, help="default: the run's data.data_dir")
    parser.add_argument("--fit", type=int, default=3000, help="training records the probes are fit on")
    parser.add_argument("--init", action="store_true", help="probe freshly initialised weights of the run's config")
    parser.add_argument("--min-records", type=int, default=20, help="attributes stated in fewer records are left out")
    parser.add_argument("--task", default="t2i", choices=("t2i", "reconstruction"), help="the records probed")
    args = parser.parse_args()
    image_task = args.task == "reconstruction"
    labelled, features = (image_labels, IMAGE_FEATURES) if image_task else (attribute_labels, FEATURES)

    sampler = Sampler.from_checkpoint(args.checkpoint, step=args.step)
    if args.init:
        fresh = sampler.model.init(jax.random.key(int(sampler.config.train.seed)))
        sampler = Sampler(
            sampler.config, sampler.kcfg, jax.tree.map(jnp.asarray, nn.unbox(fresh)), sampler.processor, sampler.mesh
        )
    data_dir = args.data_dir or sampler.config.data.data_dir
    dataset = sampler.config.data.dataset

    def load(split: str) -> list[dict]:
        source = builders.load_source(data_dir, dataset, args.task, split)
        return [records_lib.normalize(source[i]) for i in range(len(source))]

    def probed(recs: list[dict]) -> list[dict]:
        return [r for r in recs if labelled(r) and records_lib.num_inputs(r) == int(image_task)]

    train_all = load("train")
    train, validation = probed(train_all), probed(load("validation"))
    fit_recs, unseen = train[: args.fit], train[args.fit : args.fit + 1000]
    if len(fit_recs) < 2 * args.min_records or not unseen:
        raise SystemExit(
            f"{len(train)} usable training {args.task} records in {data_dir}: need more than --fit {args.fit}"
        )
    condition = jax.jit(sampler.model.condition)
    feats = {
        name: record_features(sampler, condition, rs)
        for name, rs in (("fit", fit_recs), ("unseen", unseen), ("validation", validation))
    }
    vocabulary = np.unique(feats["fit"]["words"][feats["fit"]["words"] >= 0])
    for f in feats.values():
        f["words"] = bag_of_words(f["words"], vocabulary)
    labels = {
        name: [labelled(r) for r in rs]
        for name, rs in (("fit", fit_recs), ("unseen", unseen), ("validation", validation))
    }

    what = "initialised" if args.init else f"step {sampler.step} ({'EMA' if sampler.used_ema else 'raw'})"
    print(f"linear probes of the condition stream, {args.checkpoint} {what}; {len(fit_recs)} records fit,")
    print(f"scored on {len(unseen)} other training records / {len(validation)} validation records ({args.task})")
    print("| attribute | records fit | majority | " + " | ".join(features) + " |")
    print("|---|---|---|" + "---|" * len(features))
    attributes = sorted({a for ls in labels["fit"] for a in ls})
    for attr in attributes:
        rows = {s: [i for i, ls in enumerate(labels[s]) if attr in ls] for s in labels}
        if min(len(rows["fit"]), len(rows["unseen"])) < args.min_records:
            continue
        ys = {s: np.array([labels[s][i][attr] for i in rows[s]]) for s in labels}
        majority = collections.Counter(ys["fit"]).most_common(1)[0][0]
        cells = []
        for name in features:
            xs = {s: feats[s][name][rows[s]] for s in labels}
            tests = [(xs["unseen"], ys["unseen"])] + (
                [(xs["validation"], ys["validation"])] if rows["validation"] else []
            )
            acc = ridge_probe(xs["fit"], ys["fit"], tests)
            cells.append(" / ".join(f"{a:.2f}" for a in acc))
        base = np.mean(ys["unseen"] == majority)
        print(f"| {attr} | {len(rows['fit'])} | {base:.2f} | " + " | ".join(cells) + " |")

    if image_task:
        return
    print("\nwhat the prompt is worth to the loss at t = 1: error of the prompt's mean image / of the mean image")
    print("| prompts | images | error ratio | ceiling of the t = 1 gain |\n|---|---|---|---|")
    for kind, n, ratio in prompt_ceiling([r for r in train_all if r.get("scene")]):
        print(f"| {kind} | {n} | {ratio:.3f} | {1 - ratio:.1%} |")


if __name__ == "__main__":
    main()
