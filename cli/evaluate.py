"""`medvit evaluate`: per-label Dice and HD95 of predicted masks against reference masks, one
table of the per-label statistics files `medvit segment --statistics` wrote, classification
metrics of two CSVs, or (with --perturb) a model's robustness curves on perturbed scans."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import click

from medvit.cli._common import device_option, user_errors
from medvit.pipelines.errors import MedvitError, one_line

DEFAULT_CSV = "evaluation.csv"
# Per-case rows are printed too when there are this few cases and rows.
_MAX_CASES_SHOWN = 5
_MAX_ROWS_SHOWN = 60
# The names of `medvit.pipelines.perturb.PERTURBATIONS` (kept here so --help imports no numpy; tested equal).
PERTURBATION_NAMES = ("noise", "blur", "contrast", "gamma", "rotation", "resolution")
MAX_LEVEL = 5
ROBUSTNESS_CSV, ROBUSTNESS_PNG = "robustness.csv", "robustness.png"
# Options of the --perturb mode (robustness curves), refused without it.
_PERTURB_ONLY = ("checkpoints", "level_items", "max_level", "out_dir", "seed", "device", "precision", "quiet")


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


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 2) -> str:
    """Columns padded to their widest cell; the first `left` are left-aligned, the others right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i < left else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _parse_levels(values: tuple[str, ...], max_level: int | None) -> list[int]:
    """--levels items (repeated or comma-separated), or 0..--max-level, or every level."""
    if values and max_level is not None:
        raise click.UsageError("give --levels or --max-level, not both")
    if max_level is not None:
        return list(range(max_level + 1))
    if not values:
        return list(range(MAX_LEVEL + 1))
    levels = []
    for item in filter(None, (part.strip() for value in values for part in value.split(","))):
        if not item.isdigit() or int(item) > MAX_LEVEL:
            raise click.BadParameter(f"{item!r} is not a level from 0 to {MAX_LEVEL}", param_hint="--levels")
        levels.append(int(item))
    return sorted(set(levels))


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
@click.option("--perturb", "perturbations", multiple=True, type=click.Choice(PERTURBATION_NAMES),
              help="Robustness curves: segment copies of the scans PRED with this perturbation at each level and "
                   "score them against the labels GT (repeatable).")
@click.option("--model", "-m", "checkpoints", multiple=True, type=click.Path(path_type=Path),
              help="With --perturb: the checkpoint that segments the copies (repeat it for an ensemble).")
@click.option("--levels", "level_items", multiple=True, metavar="0,1,2",
              help=f"With --perturb: severity levels, 0 (unperturbed) to {MAX_LEVEL}, comma-separated or repeated "
                   f"[default: all].")
@click.option("--max-level", type=click.IntRange(0, MAX_LEVEL), default=None,
              help="With --perturb: the levels 0 to N.")
@click.option("--output", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"With --perturb: folder for {ROBUSTNESS_CSV} and {ROBUSTNESS_PNG} [default: the current folder].")
@click.option("--seed", type=int, default=0, show_default=True, help="With --perturb: seed of the noise.")
@device_option()
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="With --perturb: as medvit segment's.")
@click.option("--quiet", "-q", is_flag=True, help="With --perturb: no progress bar.")
@user_errors
def evaluate(pred: Path, gt: Path | None, label_items: tuple[str, ...], csv_path: Path, hd_percentile: float,
             perturbations: tuple[str, ...], **perturb_options) -> None:  # fmt: skip
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

    With --perturb, robustness curves: PRED are scans (files or folders, paired with
    the label maps GT by case name), each segmented by --model unperturbed and under
    each perturbation at each --levels severity (in memory, one loaded model); Dice
    and HD95 per label are written to OUTDIR/robustness.csv, mean Dice per label against
    severity drawn in OUTDIR/robustness.png and printed. Labels are the checkpoint's:
    --labels names the ids of GT, matched to the checkpoint's label names (without it
    GT uses the checkpoint's ids).
    """
    ctx = click.get_current_context()
    if perturbations:
        if gt is None:
            raise click.UsageError("--perturb needs SCAN and LABELS: the scans to perturb and their label maps")
        if ctx.get_parameter_source("csv_path") != click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"with --perturb the CSV is OUTDIR/{ROBUSTNESS_CSV}: give -o OUTDIR, not --csv")
        _robustness(pred, gt, label_items, hd_percentile, perturbations, **perturb_options)
        return
    default = click.core.ParameterSource.DEFAULT
    given = [p.opts[0] for p in ctx.command.params if p.name in _PERTURB_ONLY and ctx.get_parameter_source(p.name) != default]
    if given:
        raise click.UsageError(f"{', '.join(given)}: only with --perturb (robustness curves)")
    if gt is None:
        _aggregate_statistics(pred, label_items, csv_path)
        return
    if pred.suffix.lower() == ".csv" and gt.suffix.lower() == ".csv":
        _classification(pred, gt, csv_path)
        return
    from medvit.pipelines.evaluate import EvalConfig, UnmatchedCaseWarning, summarize
    from medvit.pipelines.evaluate import evaluate as run_evaluation

    config = EvalConfig(labels=_parse_labels(label_items), hd_percentile=hd_percentile)
    with _unmatched_cases_echoed(UnmatchedCaseWarning):
        rows = run_evaluation(pred, gt, config=config, csv_path=csv_path, progress=True)

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


@contextlib.contextmanager
def _unmatched_cases_echoed(category: type[Warning]) -> Iterator[None]:
    """Warnings of `category` (files without a partner) become `Warning: ...` lines on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category)
        yield
    for w in caught:
        if issubclass(w.category, category):
            click.echo(f"Warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _robustness(scans: Path, labels: Path, label_items: tuple[str, ...], hd_percentile: float,
                perturbations: tuple[str, ...], checkpoints: tuple[Path, ...], level_items: tuple[str, ...],
                max_level: int | None, out_dir: Path | None, seed: int, device: str, precision: str,
                quiet: bool) -> None:  # fmt: skip
    """`medvit evaluate SCAN LABELS --perturb ... -m CKPT`: robustness curves, printed, in a CSV and a PNG."""
    if not checkpoints:
        raise click.UsageError("--perturb needs --model CKPT, the checkpoint that segments the perturbed copies")
    levels = _parse_levels(level_items, max_level)
    reference = _parse_labels(label_items)
    from medvit.pipelines.evaluate import UnmatchedCaseWarning, pair_cases
    from medvit.pipelines.robustness import RobustnessConfig, robustness_curve, summarize_curve, write_curve_csv
    from medvit.pipelines.robustness_plot import plot_curves
    from medvit.pipelines.segment import SegmentConfig

    with _unmatched_cases_echoed(UnmatchedCaseWarning):
        pairs = [(scan, label) for _, scan, label in pair_cases(scans, labels, ("scan", "label map"))]
    config = RobustnessConfig(
        segment=SegmentConfig(device=device, precision=precision, progress=False),
        reference_labels=reference, seed=seed, hd_percentile=hd_percentile, progress=not quiet,
    )  # fmt: skip
    rows = robustness_curve(list(checkpoints), pairs, perturbations, levels, config)
    out = out_dir if out_dir is not None else Path(".")
    csv_path = write_curve_csv(rows, out / ROBUSTNESS_CSV)
    means = summarize_curve(rows)
    png_path = plot_curves(means, out / ROBUSTNESS_PNG)

    names = dict(sorted({m["label_id"]: m["label"] for m in means}.items()))
    dice = {(m["perturbation"], m["level"], m["label_id"]): m["dice"] for m in means}
    settings = list(dict.fromkeys((m["perturbation"], m["level"], f"{m['parameter']}={m['value']:g}") for m in means))
    click.echo(_table(("perturbation", "level", "setting", *names.values()),
                      [(p, str(lv), setting, *(_fmt(dice[p, lv, i], 4) for i in names)) for p, lv, setting in settings],
                      left=3))  # fmt: skip
    click.echo(f"{len(pairs)} scan(s), {len(set(perturbations))} perturbation(s) x {len(levels)} level(s), "
               f"mean Dice per label; CSV written to {csv_path}, plot to {png_path}")  # fmt: skip


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
