"""Detection and un-learning across artifact kinds, models and data it was not tuned on, with clean controls.

    python benchmarks/detection.py                    # every case (about 1.5 hours on 2 CPU cores)
    python benchmarks/detection.py --cases small_cnn/stamp photo/frame clean/builtin
    python benchmarks/detection.py --list
    python benchmarks/detection.py --respray          # cached cases: SpRAy and flags anew on the kept relevance stores
    python benchmarks/detection.py --ceiling          # cached cases: what a supervised classifier gets from the maps
    python benchmarks/detection.py --per-view         # cached cases: joined views against each view on its own
    python benchmarks/detection.py --margins          # cached cases: the side test's margin and its uncertainty
    python benchmarks/detection.py --latent-settings  # cached cases: the latent-view audit, settings one at a time
    python benchmarks/detection.py --work /tmp/w --cases resnet18/frame --unlearn-only --set unlearn.epochs=5

Each case plants cues, trains a model, audits it (attribute, spray with the defaults of params.yaml), un-learns
every flagged strategy with rrr-lrp and measures, with ground truth the pipeline never sees:

- ``used``: the cue is used: pasting it on every test image costs >= 15 accuracy points (else the case says so
  and is not scored: a cue the model ignores is no Clever Hans); ``attacked_as_class`` is the share of the other
  classes' attacked images sent to the cue's class (a model that never saw the cue loses accuracy to it too, as
  to any corruption, but does not send the images to one class);
- ``flagged``, ``rank`` (strategy rank, 1 = first) and ``ari`` (of the cue's strategy, the union of its clusters,
  with the planted flag, within its class);
- after un-learning: attacked accuracy within 5 points of clean, clean accuracy down at most 2 points;
- clean controls (fraction 0): how many audits flag anything, over 5 seeds per kind of data.

Data: the built-in shapes (``builtin``) and coloured handwritten digits on photographs fed in as a user's
ImageFolder tree (``photo``, ``pipeline.photo_digits``). Results are cached per case under ``--work`` (rerun only
what changed: delete a case's folder), and the summary prints as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import adjusted_rand_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("stamp", "watermark", "frame", "noise_patch", "tint", "background")
PIXEL_KINDS = ("stamp", "watermark", "frame", "noise_patch")


def _cases() -> dict[str, dict]:
    cases = {}
    for kind in KINDS:
        cases[f"small_cnn/{kind}"] = {"data": "builtin", "arch": "small_cnn",
                                      "artifacts": [{"class": "triangle", "kind": kind, "fraction": 0.3}]}  # fmt: skip
    for kind in ("stamp", "frame"):
        cases[f"resnet18/{kind}"] = {"data": "builtin", "arch": "resnet18",
                                     "artifacts": [{"class": "triangle", "kind": kind, "fraction": 0.3}]}  # fmt: skip
    cases["small_cnn/stamp+frame"] = {
        "data": "builtin",
        "arch": "small_cnn",
        "artifacts": [
            {"class": "triangle", "kind": "stamp", "fraction": 0.3},
            {"class": "disk", "kind": "frame", "fraction": 0.3},
        ],
    }
    cases["small_cnn/watermark+noise_patch"] = {  # a second pair: two cues that move, on two other classes
        "data": "builtin",
        "arch": "small_cnn",
        "artifacts": [
            {"class": "square", "kind": "watermark", "fraction": 0.3},
            {"class": "star", "kind": "noise_patch", "fraction": 0.3},
        ],
    }
    for kind in ("watermark", "frame", "noise_patch", "stamp"):
        cases[f"photo/{kind}"] = {"data": "photo", "arch": "small_cnn",
                                  "artifacts": [{"class": "two", "kind": kind, "fraction": 0.4}]}  # fmt: skip
    for seed in range(5):
        cases[f"clean/builtin/{seed}"] = {
            "data": "builtin",
            "arch": "small_cnn",
            "seed": seed,
            "artifacts": [{"class": "triangle", "kind": "stamp", "fraction": 0.0}],
        }
        cases[f"clean/photo/{seed}"] = {
            "data": "photo",
            "arch": "small_cnn",
            "seed": seed,
            "artifacts": [{"class": "two", "kind": "stamp", "fraction": 0.0}],
        }
    return cases


#: ``--set`` changes to params.yaml for this run: {(section, key): value}
OVERRIDES: dict[tuple[str, str], object] = {}


def _override(assignment: str) -> tuple[tuple[str, str], object]:
    """``"unlearn.epochs=5"`` -> ``(("unlearn", "epochs"), 5)``, refusing keys params.yaml does not have."""
    key, _, value = assignment.partition("=")
    section, _, name = key.partition(".")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if not _ or name not in params.get(section, {}):
        raise SystemExit(f"--set takes SECTION.KEY=VALUE with a key of params.yaml; got {assignment!r}")
    return (section, name), yaml.safe_load(value)


def _params(case: dict, work: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for (section, name), value in OVERRIDES.items():
        params[section][name] = value
    seed = case.get("seed", 0)
    params["data"]["seed"] = seed
    params["train"]["seed"] = seed
    params["model"]["arch"] = case["arch"]
    params["spray"]["embeddings"] = []
    params["unlearn"]["compare_methods"] = []
    params["attribute"]["num_workers"] = 0  # cases run side by side on a many-core machine: no loader processes
    if case["data"] == "builtin":
        params["data"]["root"] = str(work / "builtin")
        params["builtin"]["artifacts"] = case["artifacts"]
    else:
        params["data"].update({"root": str(work / "photo" / "tree"), "image_size": 48})
    return params


def _truth(case: dict, work: Path, dataset) -> pd.Series:
    """sample id -> planted artifact kind ("" for none)."""
    if case["data"] == "builtin":
        return dataset.manifest.set_index("sample_id").artifact_kind.fillna("")
    return pd.read_csv(work / "photo" / "truth.csv", keep_default_na=False).set_index("sample_id").artifact


def _case_dir(work: Path, name: str) -> Path:
    return work / name.replace("/", "__")


def _class_maps(store, table: pd.DataFrame, index: int) -> tuple[pd.DataFrame, np.ndarray]:
    """One class's rows of the store's table (in store order) and their float32 heatmaps."""
    rows = table[table.label == index].sort_values("index")
    return rows, store.open()["heatmap"].oindex[rows["index"].to_numpy()].astype(np.float32)


def _attacked_accuracy(case, work, dataset, model_path, params) -> dict[str, float]:
    """Accuracy with each artifact on every test image, per artifact class (``<class>``), and the share of the
    other classes' attacked images predicted as that class (``<class>/as_class``; a model that never saw the cue
    still loses accuracy to it, but does not send the images to one class)."""
    from pipeline.datasets import load_images
    from pipeline.models import build_model
    from pipeline.training import Normalizer, accuracy, predict

    size = params["data"]["image_size"]
    normalize = Normalizer(params["data"]["mean"], params["data"]["std"])
    model = build_model(case["arch"], len(dataset.classes), model_path).eval()
    out = {}
    for i, artifact in enumerate(case["artifacts"]):
        if case["data"] == "builtin":
            rows = dataset.split(dataset.artifacts[i]["attacked_split"])
            images = load_images(dataset.root, rows.path, size)
        else:
            rows = dataset.split("test")
            images = load_images(work / "photo" / "attacked" / str(i), rows.sample_id, size)
        predicted, labels = predict(model, images, normalize), rows.label.to_numpy()
        cue = dataset.classes.index(artifact["class"])
        out[artifact["class"]] = accuracy(predicted, labels)
        out[f"{artifact['class']}/as_class"] = float((predicted[labels != cue] == cue).mean())
    clean = dataset.split("test_clean" if case["data"] == "builtin" else "test")
    out["clean"] = accuracy(predict(model, load_images(dataset.root, clean.path, size), normalize),
                            clean.label.to_numpy())  # fmt: skip
    return out


def run_case(name: str, case: dict, work: Path, keep_model: bool = False) -> dict:
    from pipeline import stages
    from pipeline.attribute import run_attribute
    from pipeline.datasets import load_dataset
    from pipeline.photo_digits import PhotoDigitsConfig, write_photo_digits

    work.mkdir(parents=True, exist_ok=True)
    params = _params(case, work)
    started = time.perf_counter()
    if not keep_model:
        if case["data"] == "builtin":
            stages.generate_builtin(params, work / "builtin", progress=False)
        else:
            write_photo_digits(work / "photo", PhotoDigitsConfig(artifacts=tuple(case["artifacts"]),
                                                                 seed=case.get("seed", 0)))  # fmt: skip
        stages.prepare(params, work / "prepared", progress=False)
    dataset = load_dataset(work / "prepared")
    if not keep_model:
        stages.train(params, work / "prepared", work / "model.pt", work / "train.json", work / "curve.csv",
                     progress=False)  # fmt: skip
    before = _attacked_accuracy(case, work, dataset, work / "model.pt", params)
    run_attribute(params, work / "prepared", work / "model.pt", work / "store", progress=False)
    result = _audit(name, case, work, params, dataset, before)
    _unlearn(case, params, work, dataset, result, before)
    result["seconds"] = time.perf_counter() - started
    return result


def _audit(name: str, case: dict, work: Path, params: dict, dataset, before: dict) -> dict:
    """SpRAy on the case's store (the spray stage) and its detection figures against the planted truth."""
    from pipeline.spray_stage import run_spray

    spray = run_spray(params, work / "store", work / "prepared", work / "spray", work / "spray.json", progress=False)
    strategies = pd.DataFrame(json.loads((work / "spray" / "strategies.json").read_text())["strategies"])
    samples = pd.read_parquet(work / "spray" / "samples.parquet")
    truth = _truth(case, work, dataset)
    result = {"case": name, "flagged_strategies": int(strategies.flagged.sum()), "artifacts": {}}
    for artifact in case["artifacts"]:
        if artifact["fraction"] == 0:
            continue
        cue = dataset.classes.index(artifact["class"])
        rows = samples[samples.group == cue]
        planted = (truth.loc[rows.sample_id] == artifact["kind"]).to_numpy()
        own = strategies[strategies.class_index == cue]
        aris = {int(r.strategy): adjusted_rand_score(planted, rows.strategy.to_numpy() == r.strategy)
                for r in own.itertuples()}  # fmt: skip
        best = max(aris, key=aris.get)
        row = own[own.strategy == best].iloc[0]
        drop = before["clean"] - before[artifact["class"]]
        result["artifacts"][artifact["class"]] = {
            "kind": artifact["kind"], "attacked_drop": drop, "used": drop >= 0.15,
            "attacked_as_class": before[f"{artifact['class']}/as_class"], "ari": aris[best],
            "flagged": bool(row.flagged), "rank": int(row.strategy_rank), "p_value": row.p_value,
            "conductance": row.conductance, "relevance_gain": row.relevance_gain,
        }  # fmt: skip
    result["spray"] = {k: v for k, v in spray.items() if k != "artifacts"}
    return result


def respray(name: str, case: dict, work: Path, cached: dict) -> dict:
    """Audit again on a cached case with its model and relevance store kept (for changes to SpRAy or the flag rule
    alone). Un-learning is not run again: its figures are kept when the same strategies are flagged, and dropped
    (``unlearn_stale``) when the flags changed."""
    from pipeline.datasets import load_dataset

    params = _params(case, work)
    dataset = load_dataset(work / "prepared")
    before = _attacked_accuracy(case, work, dataset, work / "model.pt", params)
    result = _audit(name, case, work, params, dataset, before)
    same = result["flagged_strategies"] == cached["flagged_strategies"] and all(
        a["flagged"] == cached["artifacts"].get(c, {}).get("flagged") for c, a in result["artifacts"].items()
    )
    if same and "unlearn" in cached:
        result["unlearn"] = cached["unlearn"]
        for c, a in result["artifacts"].items():
            a.update({k: v for k, v in cached["artifacts"][c].items() if k not in a})
    elif "unlearn" in cached:
        result["unlearn_stale"] = True
    result["seconds"] = cached.get("seconds")
    return result


def reaudit(name: str, case: dict, work: Path) -> dict:
    """Audit again on a cached case with its data and model kept: relevance store, SpRAy and un-learning anew (for
    changes to attribution or SpRAy alone; the attacked accuracies are measured again, on the same model)."""
    for stale in ("store", "spray", "model_cleaned.pt", "unlearn.json"):
        path = work / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return run_case(name, case, work, keep_model=True)


def _unlearn(case: dict, params: dict, work: Path, dataset, result: dict, before: dict) -> None:
    """Un-learn every flagged strategy (rrr-lrp, the defaults) and score the cleaned model into ``result``."""
    from pipeline.unlearn_stage import run_unlearn

    if not result["flagged_strategies"] or not any(a["fraction"] > 0 for a in case["artifacts"]):
        return
    run_unlearn(params, work / "prepared", work / "model.pt", work / "store", work / "spray",
                work / "model_cleaned.pt", work / "unlearn.json", progress=False)  # fmt: skip
    after = _attacked_accuracy(case, work, dataset, work / "model_cleaned.pt", params)
    result["unlearn"] = {"before": before, "after": after}
    for cls, figures in result["artifacts"].items():
        figures["after_attacked_gap"] = after["clean"] - after[cls]
        figures["clean_change"] = after["clean"] - before["clean"]
        figures["unlearned"] = figures["after_attacked_gap"] <= 0.05 and figures["clean_change"] >= -0.02


def rerun_unlearning(case: dict, work: Path, result: dict) -> dict:
    """Un-learn again on a cached case (its model, store and audit kept): for changes to the un-learning alone."""
    from pipeline.datasets import load_dataset

    params = _params(case, work)
    dataset = load_dataset(work / "prepared")
    before = _attacked_accuracy(case, work, dataset, work / "model.pt", params)
    started = time.perf_counter()
    _unlearn(case, params, work, dataset, result, before)
    result["unlearn_seconds"] = time.perf_counter() - started
    return result


def never_saw_the_cue(cases: dict, work: Path) -> dict[str, dict[str, float]]:
    """The clean-trained control (clean/builtin/0: same seed, so the same images without any cue) on each cached
    built-in small_cnn case's attacked test split: how much of an attacked gap is corruption, not shortcut
    (``attacked_gap``), and whether the cue alone already looks like its class to a model that never saw it as a
    shortcut (``sent_to_class``: the other classes' attacked images it predicts as the cue's class)."""
    from pipeline.datasets import load_dataset

    control = work / "clean__builtin__0" / "model.pt"
    out = {}
    for name, case in cases.items():
        folder = _case_dir(work, name)
        if case["data"] != "builtin" or case["arch"] != "small_cnn" or name.startswith("clean/"):
            continue
        if not control.is_file() or not (folder / "prepared").is_dir():
            continue
        params = _params(case, folder)
        figures = _attacked_accuracy(case, folder, load_dataset(folder / "prepared"), control, params)
        out[name] = {a["class"]: {"attacked_gap": round(figures["clean"] - figures[a["class"]], 3),
                                  "sent_to_class": round(figures[f"{a['class']}/as_class"], 3)}
                     for a in case["artifacts"]}  # fmt: skip
    return out


def _separation(features: np.ndarray, inside: np.ndarray) -> float:
    """How far a group lies from the rest along the line between their means, in units of their pooled spread along
    it. Halving one Gaussian cloud at its median gives 2.65 whatever its dimension; two clouds side by side give their
    distance: a group apart from the rest scores well above what the cuts through a cue-free class score."""
    if inside.all() or not inside.any():
        return float("nan")
    direction = features[inside].mean(0) - features[~inside].mean(0)
    a, b = features[inside] @ direction, features[~inside] @ direction
    spread = np.sqrt(0.5 * (a.var() + b.var()))
    return round(float((a.mean() - b.mean()) / spread), 2) if spread > 0 else float("inf")


def _default_fits(work: Path):
    """Every class of a cached case fitted as the spray stage would (its views on this store): the dataset, the
    store's table and, per class name, ``(rows, fit)``."""
    from audits import SpRAy
    from pipeline.datasets import load_dataset
    from pipeline.relevance_store import RelevanceStore
    from pipeline.spray_stage import resolve_views

    dataset, store = load_dataset(work / "prepared"), RelevanceStore(work / "store")
    table, views = store.table(), resolve_views("auto", "latent" in store.open())
    fits = {}
    for index, name in enumerate(dataset.classes):
        rows, maps = _class_maps(store, table, index)
        latent = store.latent(rows["index"].to_numpy()) if "latent" in views else None
        fit = SpRAy(views=views, random_state=0, embeddings=()).fit(
            maps, latent=[layer for _, layer in latent] if latent else None
        )
        fits[name] = rows, fit
    return dataset, fits


def k_scan(case: dict, work: Path, k_max: int = 5) -> dict[str, dict[str, list]]:
    """Every class of a cached case re-fitted with the defaults (the views the spray stage would use on this store):
    per k, each cluster's size, -log10 p of its cut under the audit's null (pooled over the classes, as the spray
    stage does), its ARI with the planted cue and its separation from the rest of the class (:func:`_separation`);
    and ``planted``, the same for the cut around the planted members themselves (is the cue apart from the rest of
    its class in the graph at all?)."""
    from audits.strategies import NullModel

    dataset, class_fits = _default_fits(work)
    truth = _truth(case, work, dataset)
    fits = {name: fit for name, (_, fit) in class_fits.items()}
    cues = {name: (truth.loc[rows.sample_id].to_numpy() != "").astype(int) for name, (rows, _) in class_fits.items()}
    null = NullModel.fit([cut for fit in fits.values() for cut in fit.null_cuts_])

    def score(fit, inside: np.ndarray) -> float:
        """-log10 p of the cut around the maps ``inside`` (graph nodes are distinct non-zero maps: a node is inside
        when most of its maps are), read at the class's size as the spray stage tests a strategy."""
        share = np.bincount(fit.inverse_, weights=inside[fit._live], minlength=len(fit.graph_.counts))
        node = share / fit.graph_.counts > 0.5
        p = null.p_value(fit.graph_.conductance(node, ~node), fit.graph_.counts.sum())
        return round(-np.log10(max(p, 1e-300)), 1)

    def cell(fit, inside: np.ndarray, ari: float) -> list:
        return [int(inside.sum()), score(fit, inside), round(ari, 2), _separation(fit.features_, inside[fit._live])]

    out = {}
    for name, fit in fits.items():
        out[name] = {}
        if cues[name].any():
            out[name]["planted"] = cell(fit, cues[name].astype(bool), 1.0)
        for k, labels in sorted(fit.labels_by_k_.items()):
            if k > k_max:
                break
            cells = []
            for cluster in range(k):
                inside = labels == cluster
                ari = adjusted_rand_score(cues[name], inside) if cues[name].any() else 0.0
                cells.append(cell(fit, inside, ari))
            out[name][f"k={k}"] = cells
    return out


def margins(cases: dict, work: Path, resamples: int = 1000) -> dict[str, dict[str, list]]:
    """The side test's margin on each cached case (the spray stage's null cuts, pooled over the classes), with the
    spread estimated two ways: the mean absolute log gain (``GainNull``'s) and the MAD (before 2026-12-02); each as
    ``[margin, 5th, 95th percentile over bootstrap resamples of the cuts]``: how much an audit's margin can move
    with the few cuts it has."""
    spreads = {"mean_abs": lambda g: np.sqrt(np.pi / 2) * np.mean(np.abs(g)),
               "mad": lambda g: 1.4826 * np.median(np.abs(g))}  # fmt: skip
    out = {}
    for name in cases:
        folder = _case_dir(work, name)
        if not (folder / "store").is_dir():
            continue
        _, fits = _default_fits(folder)
        gains = np.asarray([cut[2] for _, fit in fits.values() for cut in fit.null_cuts_ if np.isfinite(cut[2])])
        rng = np.random.default_rng(0)
        out[name] = {}
        for label, spread in spreads.items():
            boot = [spread(rng.choice(gains, len(gains))) for _ in range(resamples)]
            low, high = np.exp(np.percentile(boot, [5, 95]))
            out[name][label] = [round(float(np.exp(spread(gains))), 3), round(float(low), 3), round(float(high), 3)]
    return out


def ceiling(cases: dict, work: Path) -> dict[str, dict[str, dict[str, float]]]:
    """What the relevance holds: for each cached case's cue, the ARI of a *supervised* linear classifier (logistic
    regression, 5-fold cross-validated predictions) of the planted flag from SpRAy's own views of the class's maps
    (where, shape, both, as ``audits.features`` builds them; and the latent view where the store holds it). No
    clustering of these features can be expected to beat it, so a cue under 0.9 in a view cannot reach the ARI
    target in that view. Built-in cases also report ``cue_share``: the median share of the members' |R| on their
    own (true) artifact."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from audits.features import latent_view, relevance_features, shape_view
    from pipeline.datasets import load_dataset
    from pipeline.relevance_store import RelevanceStore

    out = {}
    for name, case in cases.items():
        folder = _case_dir(work, name)
        if name.startswith("clean/") or not (folder / "store").is_dir():
            continue
        dataset, store = load_dataset(folder / "prepared"), RelevanceStore(folder / "store")
        table, truth = store.table(), _truth(case, folder, dataset)
        out[name] = {}
        for artifact in case["artifacts"]:
            rows, maps = _class_maps(store, table, dataset.classes.index(artifact["class"]))
            planted = (truth.loc[rows.sample_id].to_numpy() == artifact["kind"]).astype(int)
            if planted.sum() < 5:
                continue
            shape = shape_view(maps)
            views = {"where": relevance_features(maps, 8, "abs", ("where",)), "shape": shape,
                     "where+shape": relevance_features(maps, 8, "abs", ("where", "shape"), shape)}  # fmt: skip
            latent = store.latent(rows["index"].to_numpy())
            if latent is not None:  # stores written with attribute.latent_layers (the default)
                views["latent"] = latent_view([layer for _, layer in latent])
            folds = StratifiedKFold(5, shuffle=True, random_state=0)
            out[name][artifact["class"]] = {
                view: round(adjusted_rand_score(planted, cross_val_predict(
                    LogisticRegressionCV(Cs=8, max_iter=2000), features, planted, cv=folds)), 2)
                for view, features in views.items()
            }  # fmt: skip
            if case["data"] == "builtin":
                out[name][artifact["class"]]["cue_share"] = _cue_share(dataset, rows, maps, planted)
    return out


def _cue_share(dataset, rows: pd.DataFrame, maps: np.ndarray, planted: np.ndarray) -> float:
    """Median share of the members' |R| inside their own true artifact mask, dilated by 2 px (relevance spills
    over a cue's edge by about one receptive field step)."""
    from PIL import Image
    from scipy import ndimage

    masks = dataset.manifest.set_index("sample_id").artifact_mask
    shares = []
    for i in np.flatnonzero(planted):
        mask = np.asarray(Image.open(dataset.root / masks[rows.sample_id.iloc[i]])) > 0
        mask = ndimage.binary_dilation(mask, iterations=2)
        magnitude = np.abs(maps[i])
        shares.append(float((magnitude * mask).sum() / max(magnitude.sum(), 1e-30)))
    return round(float(np.median(shares)), 2)


def per_view(cases: dict, work: Path) -> dict[str, dict]:
    """SpRAy on the joined views (the default) against each view on its own graph and null (Bonferroni over both
    views' clusters), on cached cases: the flagged strategies of each (class/view, size, ARI with the cue) and,
    per cue, its best cluster over every k in each view alone and joined. Why the joined views are kept."""
    from audits import SpRAy
    from audits.strategies import NullModel
    from pipeline.datasets import load_dataset
    from pipeline.relevance_store import RelevanceStore

    views = {"joined": ("where", "shape"), "where": ("where",), "shape": ("shape",)}
    out = {}
    for name, case in cases.items():
        folder = _case_dir(work, name)
        if not (folder / "store").is_dir():
            continue
        dataset, store = load_dataset(folder / "prepared"), RelevanceStore(folder / "store")
        table, truth = store.table(), _truth(case, folder, dataset)
        fits, planted = {v: {} for v in views}, {}
        for index, cls in enumerate(dataset.classes):
            rows, maps = _class_maps(store, table, index)
            planted[cls] = truth.loc[rows.sample_id].to_numpy() != ""
            for view, chosen in views.items():
                fits[view][cls] = SpRAy(views=chosen, stability_seeds=0, embeddings=(), random_state=0).fit(maps)
        result = {}
        for mode, used in (("joined", ["joined"]), ("per-view", ["where", "shape"])):
            n_tests = sum(fits[v][c].n_clusters_ for v in used for c in dataset.classes)
            flagged = []
            for view in used:
                null = NullModel.fit([cut for fit in fits[view].values() for cut in fit.null_cuts_])
                for cls, fit in fits[view].items():
                    for strategy in fit.strategies(0.05, null, n_tests):
                        if strategy.flagged:
                            members = np.isin(fit.labels_, strategy.clusters)
                            ari = adjusted_rand_score(planted[cls], members)
                            flagged.append(f"{cls}/{view}: {int(members.sum())} maps, ARI {ari:.2f}")
            result[mode] = flagged
        result["best cluster at any k"] = {
            a["class"]: {view: round(max(adjusted_rand_score(planted[a["class"]], labels == c)
                                         for labels in fits[view][a["class"]].labels_by_k_.values()
                                         for c in np.unique(labels)), 2) for view in views}
            for a in case["artifacts"] if a["fraction"] > 0
        }  # fmt: skip
        out[name] = result
    return out


#: settings tried around the latent view's defaults by ``--latent-settings`` (docs/spray.md, "The latent view")
LATENT_SETTINGS = (
    {},
    {"layers": [0]},
    {"layers": [1]},
    {"n_neighbors": 6},
    {"n_neighbors": 24},
    {"weighting": "connectivity"},
    {"weighting": "heat"},
    {"denoise": False},
)


def _latent_audit(case: dict, folder: Path, setting: dict) -> dict:
    """The spray stage's audit on the latent view of a cached store (every class against one pooled null), with
    ``setting`` changed: ``layers`` picks stored latent layers by position, the rest are SpRAy arguments. Returns
    the flagged strategies as ``class:maps:ARI`` and per cue its best strategy (ARI, flagged, rank)."""
    from audits import SpRAy
    from audits.clever_hans import audit_strategies
    from pipeline.datasets import load_dataset
    from pipeline.relevance_store import RelevanceStore

    setting = dict(setting)
    layers = setting.pop("layers", None)
    dataset, store = load_dataset(folder / "prepared"), RelevanceStore(folder / "store")
    table, truth = store.table(), _truth(case, folder, dataset)
    pooled, latent = store.open()["pooled"][:], store.latent()
    fits, graphs, cuts = {}, {}, []
    for index, cls in enumerate(dataset.classes):
        idx = np.flatnonzero(table.label.to_numpy() == index)
        chosen = [layer[idx] for j, (_, layer) in enumerate(latent) if layers is None or j in layers]
        fit = SpRAy(views=("latent",), stability_seeds=0, embeddings=(), **setting).fit(pooled[idx], latent=chosen)
        fits[cls] = (fit, truth.loc[table.sample_id.to_numpy()[idx]].to_numpy() != "")
        graphs[index] = (cls, fit.graph_)
        cuts += fit.null_cuts_
    strategies, *_ = audit_strategies(graphs, cuts, 0.05)
    cues = {a["class"] for a in case["artifacts"] if a["fraction"] > 0}
    out = {"flagged": [], "cues": {}}
    for r in strategies.itertuples():  # in rank order: of two equally good strategies the first ranked is kept
        fit, planted = fits[r.class_name]
        members = np.isin(fit.labels_, r.clusters)
        ari = float(adjusted_rand_score(planted, members)) if planted.any() else 0.0
        if r.flagged:
            out["flagged"].append(f"{r.class_name}:{int(members.sum())}:{ari:.2f}")
        best = out["cues"].get(r.class_name, {"ari": -1.0, "flagged": False})
        if r.class_name in cues and (
            ari > best["ari"] + 1e-6 or (ari > best["ari"] - 1e-6 and r.flagged > best["flagged"])
        ):
            out["cues"][r.class_name] = {"ari": ari, "flagged": bool(r.flagged), "rank": int(r.strategy_rank)}
    return out


def latent_settings(cases: dict, work: Path) -> dict[str, dict]:
    """How the latent-view audit depends on its settings (:data:`LATENT_SETTINGS`), on every cached case: per
    setting, the cues found (flagged, ARI >= 0.9, rank 1, or <= 2 with two cues) with the ones missed, and the
    clean audits that flag anything."""
    out = {}
    for setting in LATENT_SETTINGS:
        found, missed, alarms, audited = 0, [], [], 0
        for name, case in cases.items():
            folder = _case_dir(work, name)
            if not (folder / "store").is_dir():
                continue
            result = _latent_audit(case, folder, setting)
            if name.startswith("clean/"):
                audited += 1
                alarms += [f"{name}: {', '.join(result['flagged'])}"] if result["flagged"] else []
                continue
            for cls, cue in result["cues"].items():
                ok = cue["flagged"] and cue["ari"] >= 0.9 and cue["rank"] <= (2 if "+" in name else 1)
                found += ok
                missed += [] if ok else [f"{name}/{cls}: ARI {cue['ari']:.2f}, flagged {cue['flagged']}"]
        key = json.dumps(setting) if setting else "defaults"
        out[key] = {
            "cues_found": f"{found} of {found + len(missed)}", "missed": missed,
            "clean_audits_flagging": f"{len(alarms)} of {audited}", "false_alarms": alarms,
        }  # fmt: skip
        print(f"{key}: {out[key]}", file=sys.stderr, flush=True)
    return out


def summarize(results: dict[str, dict]) -> dict:
    rows, controls = [], {}
    for name, r in results.items():
        if name.startswith("clean/"):
            kind = name.split("/")[1]
            controls.setdefault(kind, []).append(r["flagged_strategies"])
            continue
        for cls, a in r["artifacts"].items():
            rows.append({"case": name, "class": cls, **{k: a.get(k) for k in (
                "kind", "attacked_drop", "attacked_as_class", "used", "flagged", "rank", "ari", "after_attacked_gap",
                "clean_change", "unlearned")}})  # fmt: skip
    pixel = [r for r in rows if r["kind"] in PIXEL_KINDS and r["used"]]
    two = [r for r in rows if "+" in r["case"]]
    return {
        "table": rows,
        "false_alarms": {kind: {"audits_with_a_flag": int(sum(f > 0 for f in flags)), "of": len(flags)}
                         for kind, flags in controls.items()},  # fmt: skip
        "targets": {
            "pixel cues flagged, rank 1, ARI >= 0.9": all(
                r["flagged"] and (r["rank"] <= (2 if "+" in r["case"] else 1)) and r["ari"] >= 0.9 for r in pixel),
            "two artifacts: ranks 1 and 2": all(
                sorted(r["rank"] for r in two if r["case"] == case) == [1, 2] for case in {r["case"] for r in two}
            ) if two else None,
            "un-learned (attacked within 5 points, clean down <= 2)": all(r.get("unlearned") for r in pixel),
            "at most 1 false alarm in 5 clean audits per kind of data": all(
                sum(f > 0 for f in flags) <= 1 for flags in controls.values()),
        },
    }  # fmt: skip


def main() -> None:
    cases = _cases()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=None, help="Case names or prefixes (default: all).")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "detection")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="Ignore cached results.")
    parser.add_argument("--unlearn-only", action="store_true",
                        help="Cached cases: keep model, store and audit; un-learn and score again.")  # fmt: skip
    parser.add_argument("--reaudit", action="store_true",
                        help="Cached cases: keep data and model; attribute, audit and un-learn again.")  # fmt: skip
    parser.add_argument("--respray", action="store_true",
                        help="Cached cases: keep model and store; SpRAy and flags anew (no un-learning).")  # fmt: skip
    parser.add_argument("--never-saw-the-cue", action="store_true",
                        help="The clean-trained control's attacked gap on each cached built-in case.")  # fmt: skip
    parser.add_argument("--ceiling", action="store_true",
                        help="Cached cases: supervised, cross-validated ARI of the cue on SpRAy's views.")  # fmt: skip
    parser.add_argument("--margins", action="store_true",
                        help="Cached cases: the side test's margin, two spreads, bootstrap intervals.")  # fmt: skip
    parser.add_argument("--per-view", action="store_true",
                        help="Cached cases: flags of the joined views against each view on its own.")  # fmt: skip
    parser.add_argument("--latent-settings", action="store_true",
                        help="Cached cases: the latent-view audit, its settings changed one at a time.")  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="Change params.yaml for this run (with --work elsewhere: keeps the cache).")  # fmt: skip
    parser.add_argument("--k-scan", metavar="CASE", help="Per class and k: cluster size, -log10 p, ARI with the cue.")
    args = parser.parse_args()
    OVERRIDES.update(_override(assignment) for assignment in args.set)
    if args.k_scan:
        print(json.dumps(k_scan(cases[args.k_scan], _case_dir(args.work, args.k_scan))))
        return
    if args.list:
        print("\n".join(cases))
        return
    if args.never_saw_the_cue:
        print(json.dumps(never_saw_the_cue(cases, args.work), indent=2))
        return
    chosen = [n for n in cases if not args.cases or any(n == c or n.startswith(c) for c in args.cases)]
    if args.per_view:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(json.dumps(per_view({n: cases[n] for n in chosen}, args.work), indent=2))
        return
    if args.latent_settings:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(json.dumps(latent_settings({n: cases[n] for n in chosen}, args.work), indent=2))
        return
    if args.margins:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(json.dumps(margins({n: cases[n] for n in chosen}, args.work), indent=2))
        return
    if args.ceiling:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(json.dumps(ceiling({n: cases[n] for n in chosen}, args.work), indent=2))
        return
    results = {}
    for name in chosen:
        folder = _case_dir(args.work, name)
        cached = folder / "result.json"
        spec = json.dumps(cases[name], sort_keys=True)
        valid = cached.is_file() and not args.fresh and json.loads(cached.read_text()).get("spec") == spec
        # a case stopped after its training (train.json is written last) resumes from its model
        trained = not cached.is_file() and not args.fresh and (folder / "train.json").is_file()
        if (valid and args.reaudit or trained) and (folder / "model.pt").is_file():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[name] = reaudit(name, copy.deepcopy(cases[name]), folder)
            results[name]["spec"] = spec
            cached.write_text(json.dumps(results[name], indent=2, default=float))
        elif valid and args.respray and (folder / "store").is_dir():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[name] = respray(name, cases[name], folder, json.loads(cached.read_text()))
            results[name]["spec"] = spec
            cached.write_text(json.dumps(results[name], indent=2, default=float))
        elif valid and args.unlearn_only and (folder / "store").is_dir():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[name] = rerun_unlearning(cases[name], folder, json.loads(cached.read_text()))
            cached.write_text(json.dumps(results[name], indent=2, default=float))
        elif valid:
            results[name] = json.loads(cached.read_text())
        elif args.respray or args.unlearn_only or args.reaudit:  # modes that only revisit a cache never train
            print(f"{name}: not cached in {folder}, skipped", file=sys.stderr, flush=True)
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[name] = run_case(name, copy.deepcopy(cases[name]), folder)
            results[name]["spec"] = spec
            cached.write_text(json.dumps(results[name], indent=2, default=float))
        short = {c: {k: a.get(k) for k in ("used", "flagged", "rank", "ari", "unlearned")}
                 for c, a in results[name]["artifacts"].items()}  # fmt: skip
        print(f"{name}: {results[name]['flagged_strategies']} flagged; {short}", file=sys.stderr, flush=True)
    print(json.dumps(summarize(results), indent=2, default=float))


if __name__ == "__main__":
    main()
