"""``spray-audit``: one subcommand per pipeline stage, so every stage also runs without DVC."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .params import load_params


def path_option(flag: str, default: str, help: str, *, folder: bool = False, dest: str | None = None):
    """A ``--flag PATH`` option with its default shown in ``--help``."""
    kind = click.Path(file_okay=not folder, dir_okay=folder, path_type=Path)
    names = (flag, dest) if dest else (flag,)
    return click.option(*names, type=kind, default=default, show_default=True, help=help)


PARAMS = path_option(
    "--params", "params.yaml", "Parameter file; each stage reads its own sections.", dest="params_path"
)
PROGRESS = click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars (default: on when stderr is a terminal).",
)


def _progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


SHORT_NAMES = {"test_acc": "test", "test_clean_acc": "clean", "test_attacked_acc": "attacked", "r_bias": "R_bias",
               "artifact_ari": "ARI"}  # fmt: skip


def _changes(before: dict, after: dict) -> str:
    """'clean 0.840 -> 0.826, ...' for the figures both sides have (a summary never prints a missing one)."""
    parts = []
    for key, short in SHORT_NAMES.items():
        b, a = before.get(key), after.get(key)
        if isinstance(b, int | float) and isinstance(a, int | float):
            parts.append(f"{short} {b:.3f} -> {a:.3f}")
    return ", ".join(parts)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Spectral Relevance Analysis audits: find and un-learn Clever-Hans behaviour."""


@main.command()
@PARAMS
@path_option("--out", "data/builtin", "Where the built-in benchmark goes (when data.root points there).", folder=True)
@PROGRESS
def builtin(params_path: Path, out: Path, progress: bool | None) -> None:
    """Generate the built-in Clever-Hans benchmark (params: builtin) into OUT, when data.root is OUT."""
    from .stages import generate_builtin

    dataset = generate_builtin(load_params(params_path), out, progress=_progress(progress))
    if dataset is None:
        click.echo(f"builtin: data.root points elsewhere; nothing generated in {out}")
        return
    planted = ", ".join(f"{a['kind']} on {a['fraction']:.0%} of {a['class']}" for a in dataset.artifacts)
    click.echo(f"builtin {out}: {len(dataset.manifest)} images of {len(dataset.classes)} classes; {planted}")


@main.command()
@PARAMS
@path_option(
    "--out",
    "data/prepared",
    "Where the prepared data set goes (manifest.parquet, dataset.json; the images stay where they are).",
    folder=True,
)
@PROGRESS
def prepare(params_path: Path, out: Path, progress: bool | None) -> None:
    """Index data.root (the built-in benchmark or your ImageFolder tree; null: generate the built-in data here)."""
    from .stages import prepare as run

    dataset = run(load_params(params_path), out, progress=_progress(progress))
    counts = dataset.manifest.split.value_counts().to_dict()
    click.echo(f"prepared {len(dataset.manifest)} images of {len(dataset.classes)} classes in {out}: {counts}")


@main.command()
@PARAMS
@path_option(
    "--data",
    "data/prepared",
    "The prepared data set (output of prepare).",
    folder=True,
)
@path_option(
    "--model-out",
    "models/model.pt",
    "Where the trained state dict goes.",
)
@path_option(
    "--metrics-out",
    "metrics/train.json",
    "Metrics JSON (accuracies per test split, per class, shortcut figures).",
)
@path_option(
    "--curve-out",
    "metrics/train_curve.csv",
    "Per-epoch training curve (CSV) for `dvc plots`.",
)
@PROGRESS
def train(
    params_path: Path, data: Path, model_out: Path, metrics_out: Path, curve_out: Path, progress: bool | None
) -> None:
    """Train the model on train, select it on val and evaluate it on the test splits."""
    from .stages import train as run

    metrics = run(load_params(params_path), data, model_out, metrics_out, curve_out, progress=_progress(progress))
    shown = {k: round(v, 4) for k, v in metrics.items() if k.endswith("_acc") and isinstance(v, float)}
    click.echo(f"trained {model_out}: {shown}")


@main.command()
@PARAMS
@path_option("--data", "data/prepared", "The prepared data set (output of prepare).", folder=True)
@path_option("--model", "models/model.pt", "The model to explain (state dict).")
@path_option(
    "--out",
    "attributions/original",
    "Relevance store directory (relevance.zarr, parts/, samples.parquet); resumed if it exists.",
    folder=True,
)
@click.option("--scheduler", default=None, help="Address of a Dask scheduler to run on (overrides params).")
@click.option("--workers", type=int, default=None, help="Start a local Dask cluster with N workers (overrides params).")
@PROGRESS
def attribute(
    params_path: Path,
    data: Path,
    model: Path,
    out: Path,
    scheduler: str | None,
    workers: int | None,
    progress: bool | None,
) -> None:
    """Compute LRP heatmaps of the audited split into a resumable relevance store."""
    from .attribute import run_attribute

    params = load_params(params_path)
    overrides = {k: v for k, v in (("scheduler", scheduler), ("workers", workers)) if v is not None}
    if overrides:
        params = params | {"attribute": (params.get("attribute") or {}) | overrides}
    table = run_attribute(params, data, model, out, progress=_progress(progress))
    click.echo(f"relevance store {out}: {len(table)} samples, {int(table.correct.sum())} predicted right")


@main.command()
@PARAMS
@path_option("--store", "attributions/original", "A finished relevance store.", folder=True)
@path_option(
    "--data", "data/prepared", "The prepared data set (class names; ground truth to score built-in data).", folder=True
)
@path_option(
    "--out", "spray/original", "Output folder (samples.parquet, clusters.parquet, members/, ...).", folder=True
)
@path_option("--metrics-out", "metrics/spray_original.json", "Metrics JSON.")
@click.option(
    "--embeddings/--no-embeddings",
    default=True,
    show_default=True,
    help="Compute spray.embeddings (t-SNE/UMAP for the report's scatter plots); the re-audit needs only the "
    "clusters and flags, and skips them.",
)
@PROGRESS
def spray(
    params_path: Path, store: Path, data: Path, out: Path, metrics_out: Path, embeddings: bool, progress: bool | None
) -> None:
    """Cluster each class's heatmaps by SpRAy and rank the clusters by Clever-Hans score."""
    from .spray_stage import run_spray

    params = load_params(params_path)
    if not embeddings:
        params = params | {"spray": (params.get("spray") or {}) | {"embeddings": []}}
    metrics = run_spray(params, store, data, out, metrics_out, progress=_progress(progress))
    click.echo(
        f"spray {out}: {metrics['n_clusters']} clusters in {metrics['n_strategies']} strategies, "
        f"{metrics['n_flagged_strategies']} flagged (p < {metrics['p_threshold']:.2g}); "
        f"top {metrics['top_strategy']} (score {metrics['top_ch_score']:.1f})"
    )


@main.command()
@PARAMS
@path_option("--spray", "spray/original", "Results of the spray stage.", folder=True, dest="spray_dir")
@path_option("--store", "attributions/original", "The relevance store the spray stage clustered.", folder=True)
@path_option("--data", "data/prepared", "The prepared data set (input images for the galleries).", folder=True)
@path_option("--out", "reports/audit.html", "The standalone HTML page.")
@click.option(
    "--evaluation",
    nargs=2,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="METRICS CURVES of the evaluate stage (metrics/evaluate.json evaluation/curves.json): adds their plot.",
)
@PROGRESS
def report(
    params_path: Path, spray_dir: Path, store: Path, data: Path, out: Path, evaluation, progress: bool | None
) -> None:
    """Write the audit as one standalone HTML page (opens from disk, needs no network)."""
    from .report_stage import run_report

    facts = run_report(
        load_params(params_path), spray_dir, store, data, out, progress=_progress(progress), evaluation=evaluation
    )
    click.echo(f"report {out}: {facts['classes']} classes, {facts['flagged']} flagged, {facts['bytes'] / 1e6:.1f} MB")


@main.command()
@PARAMS
@path_option("--data", "data/prepared", "The prepared data set.", folder=True)
@path_option("--model", "models/model.pt", "The audited model (state dict).")
@path_option(
    "--store", "attributions/original", "Its relevance store (member maps for the artifact region).", folder=True
)
@path_option("--spray", "spray/original", "Its spray results (the flagged cluster).", folder=True, dest="spray_dir")
@path_option("--model-out", "models/model_cleaned.pt", "Where the cleaned state dict goes.")
@path_option("--metrics-out", "metrics/unlearn.json", "Metrics JSON (before/after, every compared method).")
@PROGRESS
def unlearn(
    params_path: Path, data: Path, model: Path, store: Path, spray_dir: Path, model_out: Path, metrics_out: Path,
    progress: bool | None,
) -> None:  # fmt: skip
    """Un-learn the flagged cluster (unlearn.method) and score every method of unlearn.compare_methods."""
    from .unlearn_stage import run_unlearn

    metrics = run_unlearn(
        load_params(params_path), data, model, store, spray_dir, model_out, metrics_out, progress=_progress(progress)
    )
    if metrics.get("skipped"):
        click.echo(f"unlearn: nothing to un-learn ({metrics['skipped']}); the model is kept as it is")
        return
    names = ", ".join(a["class_name"] for a in metrics["artifacts"])
    click.echo(f"unlearn {metrics['method']} ({names}): {_changes(metrics['before'], metrics['after'])}")


@main.command()
@path_option("--unlearn-metrics", "metrics/unlearn.json", "Metrics of the unlearn stage.")
@click.option("--before", default="original", show_default=True, help="Name of the audited model's outputs.")
@click.option("--after", default="cleaned", show_default=True, help="Name of the cleaned model's outputs.")
@path_option("--data", "data/prepared", "The prepared data set.", folder=True)
@path_option("--metrics-out", "metrics/compare.json", "Contract metrics: before/after.")
@path_option("--out", "reports/compare.html", "The standalone before/after page.")
def compare(unlearn_metrics: Path, before: str, after: str, data: Path, metrics_out: Path, out: Path) -> None:
    """Before/after of un-learning: metrics and a standalone page (reads spray/<name>, attributions/<name>)."""
    from .compare_stage import run_compare

    names = {"before": before, "after": after}
    metrics = run_compare(
        unlearn_metrics,
        {k: Path("spray") / v for k, v in names.items()},
        {k: Path("metrics") / f"spray_{v}.json" for k, v in names.items()},
        {k: Path("attributions") / v for k, v in names.items()},
        data,
        metrics_out,
        out,
    )
    click.echo(f"compare {out}: {_changes(metrics['before'], metrics['after']) or 'nothing to compare'}")


@main.command()
@PARAMS
@path_option("--data", "data/prepared", "The prepared data set.", folder=True)
@path_option("--model", "models/model.pt", "The model whose explanations are scored.")
@path_option("--metrics-out", "metrics/evaluate.json", "Scores per method (AOPC, area between, ground truth).")
@path_option("--curves-out", "evaluation/curves.json", "Mean perturbation curves per method (for the report).")
@PROGRESS
def evaluate(params_path: Path, data: Path, model: Path, metrics_out: Path, curves_out: Path, progress) -> None:
    """Score LRP composites against gradient, gradient x input and random maps (pixel flipping, ground truth)."""
    from .evaluate_stage import run_evaluate

    metrics = run_evaluate(load_params(params_path), data, model, metrics_out, curves_out, progress=_progress(progress))
    best = max(metrics["methods"], key=lambda m: metrics["methods"][m]["area_between"])
    click.echo(
        f"evaluate: {len(metrics['methods'])} methods on {metrics['n_images']} images; best area between: {best}"
    )


@main.command("export-virelay")
@path_option("--store", "attributions/original", "A finished relevance store.", folder=True)
@path_option("--data", "data/prepared", "The prepared data set the store was computed on.", folder=True)
@path_option("--out", "exports/virelay", "Output folder for the HDF5 files and the label map.", folder=True)
@click.option("--name", default="spray-audit", show_default=True, help="Base name of the exported files.")
def export_virelay(store: Path, data: Path, out: Path, name: str) -> None:
    """Write the input, attribution and label-map files that CoRelAy/ViRelAy read."""
    from .export import export_virelay as run

    files = run(store, data, out, name)
    click.echo("wrote " + ", ".join(str(f) for f in files))


def entry_point() -> None:
    """Console script: errors in the user's data or parameters print one line, not a traceback.

    ``DataError``, ``CheckpointError``, ``AttributionError`` and ``ArtifactError`` are ``ValueError``s: caught here
    without importing their modules, so that a stage that needs no torch does not pay its import."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    entry_point()
