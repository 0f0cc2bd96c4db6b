"""`medvit evaluate`: per-label Dice and HD95 of predicted masks against reference masks, or
one table of the per-label statistics files `medvit segment --statistics` wrote."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import click

from medvit.cli._common import user_errors
from medvit.pipelines.errors import MedvitError, one_line

DEFAULT_CSV = "evaluation.csv"
# Per-case rows are printed too when there are this few cases and rows.
_MAX_CASES_SHOWN = 5
_MAX_ROWS_SHOWN = 60


def _parse_labels(values: tuple[str, ...]) -> dict[int, str] | None:
    """``ID=NAME`` items (repeated or comma-separated) or JSON files mapping id -> name."""
    if not values:
        return None
    labels: dict[int, str] = {}
    for value in values:
        if value.lower().endswith(".json"):
            labels.update(_labels_from_json(Path(value)))
            continue
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, name = item.partition("=")
            try:
                label_id = int(key)
            except ValueError:
                label_id = -1
            if not sep or label_id < 1 or not name.strip():
                raise click.BadParameter(f"{item!r} is not ID=NAME with a label id >= 1", param_hint="--labels")
            labels[label_id] = name.strip()
    return labels


def _labels_from_json(path: Path) -> dict[int, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        labels = {int(k): str(v) for k, v in dict(data).items()}
    except FileNotFoundError:
        raise MedvitError(f"{path}: no such file") from None
    except (OSError, ValueError, TypeError) as e:
        reason = one_line(str(e))
        raise MedvitError(f"{path}: not a JSON object mapping label id to name ({reason})") from None
    # Background is never a structure to score; label files usually list it.
    return {k: v for k, v in labels.items() if k != 0}


def _fmt(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


@click.command("evaluate")
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("gt", required=False, type=click.Path(path_type=Path))
@click.option(
    "--labels",
    "label_items",
    multiple=True,
    metavar="ID=NAME",
    help="Labels to score, e.g. --labels 1=liver --labels 2=spleen (or 1=liver,2=spleen, or a JSON file "
    "mapping id to name). Default: every label > 0 present in either mask.",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CSV,
    show_default=True,
    help="Where the per-case and mean rows (or the statistics rows) are written.",
)
@click.option("--hd-percentile", type=float, default=95.0, show_default=True, help="Hausdorff distance percentile.")
@user_errors
def evaluate(pred: Path, gt: Path | None, label_items: tuple[str, ...], csv_path: Path, hd_percentile: float) -> None:
    """Score predicted masks PRED against reference masks GT (files or folders).

    Folders are paired by case name; a prediction <case>_seg.nii.gz (what `medvit
    segment` writes) matches <case>.nii.gz. A label empty in both masks scores
    Dice 1 and HD95 0; empty in only one, Dice 0 and HD95 inf (counted in
    the "one empty" column).

    With PRED alone, a folder of <stem>_stats.json files (`medvit segment
    --statistics`): one CSV row per scan and label (voxels, volume, intensities)
    and a per-label summary.

    With two CSV files, classification: PRED from `medvit predict`, GT with id (or
    path) and label columns, matched by id: accuracy, balanced accuracy, one-vs-rest
    AUROC, the confusion matrix, and a per-class CSV (support, precision, recall, AUROC).
    """
    if gt is None:
        _aggregate_statistics(pred, label_items, csv_path)
        return
    if pred.suffix.lower() == ".csv" and gt.suffix.lower() == ".csv":
        _classification(pred, gt, csv_path)
        return
    from medvit.pipelines.evaluate import EvalConfig, UnmatchedCaseWarning, summarize
    from medvit.pipelines.evaluate import evaluate as run_evaluation

    config = EvalConfig(labels=_parse_labels(label_items), hd_percentile=hd_percentile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnmatchedCaseWarning)
        rows = run_evaluation(pred, gt, config=config, csv_path=csv_path, progress=True)
    for w in caught:
        if issubclass(w.category, UnmatchedCaseWarning):
            click.echo(f"Warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    cases = list(dict.fromkeys(r["case"] for r in rows))
    means = summarize(rows)
    # Cases where only one of the two masks has the label (their HD95 is inf).
    one_empty: dict[int, int] = {}
    for r in rows:
        one_empty[r["label_id"]] = one_empty.get(r["label_id"], 0) + int(math.isinf(r["hd95_mm"]))
    header = ("label", "id", "n", "mean Dice", "mean HD95 mm", "one empty")
    click.echo(
        _table(
            header,
            [
                (m["label"], str(m["label_id"]), str(m["n"]), _fmt(m["dice"], 4), _fmt(m["hd95_mm"], 2),
                 str(one_empty[m["label_id"]]))
                for m in means
            ],
        )  # fmt: skip
    )
    if 1 < len(cases) <= _MAX_CASES_SHOWN and len(rows) <= _MAX_ROWS_SHOWN:
        click.echo("")
        click.echo(
            _table(
                ("case", "label", "Dice", "HD95 mm", "pred ml", "gt ml"),
                [
                    (r["case"], r["label"], _fmt(r["dice"], 4), _fmt(r["hd95_mm"], 2), _fmt(r["pred_ml"], 2),
                     _fmt(r["gt_ml"], 2))
                    for r in rows
                ],
            )  # fmt: skip
        )
    click.echo(f"{len(cases)} case(s), {len(means)} label(s); CSV written to {csv_path}")


def _aggregate_statistics(folder: Path, label_items: tuple[str, ...], csv_path: Path) -> None:
    """`medvit evaluate FOLDER`: the folder's `*_stats.json` files as one CSV and a summary."""
    from medvit.pipelines.atomic import write_csv
    from medvit.pipelines.statistics import STATS_COLUMNS, find_statistics, statistics_rows, summarize_statistics

    ctx = click.get_current_context()
    if label_items or ctx.get_parameter_source("hd_percentile") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--labels and --hd-percentile score masks: give PRED GT, or leave them out")
    paths = find_statistics(folder)
    if not paths:
        raise click.UsageError(
            f"{folder}: no *_stats.json files (made by medvit segment --statistics); to score masks give PRED GT"
        )
    rows = statistics_rows(paths)
    write_csv(csv_path, STATS_COLUMNS, rows)
    summary = summarize_statistics(rows)

    def num(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    click.echo(
        _table(
            ("label", "present", "median ml", "median mean"),
            [(m["label"], f"{m['present']}/{m['scans']}", num(m["median_volume_ml"], 1), num(m["median_mean"], 1))
             for m in summary],
        )
    )  # fmt: skip
    click.echo(f"{len(paths)} scan(s), {len(summary)} label(s); CSV written to {csv_path}")


def _classification(pred: Path, truth: Path, csv_path: Path) -> None:
    """`medvit evaluate PRED.csv GT.csv`: classification metrics, printed and per class in a CSV."""
    from medvit.pipelines.atomic import write_csv
    from medvit.pipelines.classify_metrics import evaluate_predictions

    m = evaluate_predictions(pred, truth)
    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    classes = m["classes"]
    rows = [(c, str(m["per_class"][c]["support"]), num(m["per_class"][c]["precision"]),
             num(m["per_class"][c]["recall"]), num(m["per_class"][c]["auroc"])) for c in classes]  # fmt: skip
    click.echo(_table(("class", "n", "precision", "recall", "AUROC"), rows))
    click.echo("")
    click.echo(_table(("true \\ predicted", *classes),
                      [(c, *map(str, r)) for c, r in zip(classes, m["confusion_matrix"])]))  # fmt: skip
    write_csv(csv_path, ["class", "support", "precision", "recall", "auroc"],
              [{"class": c, **m["per_class"][c]} for c in classes])
    click.echo(f"{m['n']} inputs: accuracy {num(m['accuracy'])}, balanced accuracy {num(m['balanced_accuracy'])}, "
               f"macro AUROC {num(m['auroc_macro'])}; CSV written to {csv_path}")
