"""Scoring of predicted masks on the proxy set, the same for every tool.

A tool's masks are matched to the proxy cases by file name (``<case>_seg.nii.gz`` as
`medvit segment` writes them, or ``<case>.nii.gz`` as nnU-Net does), their label ids are
mapped to the reference ids by label name, and `medvit.pipelines.evaluate.evaluate_pair`
scores them (MONAI Dice, HD95 in mm) on the copy's own grid. A mask that is not on its
scan's grid is reported as such, never resampled.

Two checks need no labels where the prediction is made:

- ``full_ct``: organ volumes predicted on the slices of the longer CT that the labels do
  not cover, added to the reference volume on the labelled slab, against normal adult
  whole-organ volumes.
- ``patient3``: organ volumes predicted on a chest scan whose only labels are the aorta
  and T12: the part inside those reference structures (certainly wrong) and how far
  above T12 the rest lies.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from medvit.pipelines.evaluate import EvalConfig, evaluate_pair
from medvit.pipelines.io import read_scan

from _proxy import ORGANS, PROXY_COPIES, label_names

GRID_ATOL_MM = 1e-3
# Normal adult whole-organ volumes (ml) from CT volumetry, rounded outward: a total above
# the range is not an organ of this body; below it, the organ was missed or is cut by the scan.
PLAUSIBLE_ML = {"liver": (800.0, 2600.0), "spleen": (40.0, 450.0), "kidney_right": (80.0, 300.0),
                "kidney_left": (80.0, 300.0)}
# Heights above the top of the T12 reference (mm) at which predicted organ voxels are counted.
BANDS_MM = (0.0, 50.0, 100.0, 150.0)


def find_mask(masks: Path, case: str) -> Path | None:
    """The mask a tool wrote for `case`, or None; two candidates are an error."""
    found = [p for p in (masks / f"{case}_seg.nii.gz", masks / f"{case}.nii.gz") if p.is_file()]
    if len(found) > 1:
        raise ValueError(f"{masks}: both {found[0].name} and {found[1].name}; which one is the prediction of {case}?")
    return found[0] if found else None


def _remap(pred: np.ndarray, pred_labels: dict[int, str], ids: dict[str, int]) -> np.ndarray:
    """Prediction in the reference's ids (by name); classes the reference does not know drop to 0."""
    lut = np.zeros(max(int(pred.max()), max(pred_labels, default=0)) + 1, np.uint16)
    for pid, name in pred_labels.items():
        if name in ids:
            lut[pid] = ids[name]
    return lut[pred.astype(np.int64, copy=False)]


def _off_grid(pred, ref) -> str | None:
    if pred.shape != ref.shape:
        return f"shape {pred.shape} vs the scan's {ref.shape}"
    diff = float(np.abs(pred.affine - ref.affine).max())
    return None if diff <= GRID_ATOL_MM else f"affine differs from the scan's by up to {diff:.4g} mm"


def _evaluate(pred: np.ndarray, ref: np.ndarray, affine: np.ndarray, labels: dict[int, str]) -> dict[str, dict]:
    """`evaluate_pair` on two arrays of one grid (written to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="medvit_score_") as tmp:
        p, r = Path(tmp) / "pred.nii.gz", Path(tmp) / "ref.nii.gz"
        nib.save(nib.Nifti1Image(pred.astype(np.uint16), affine), p)
        nib.save(nib.Nifti1Image(ref.astype(np.uint16), affine), r)
        rows = evaluate_pair(p, r, EvalConfig(labels=labels))
    return {row["label"]: {k: row[k] for k in ("dice", "hd95_mm", "pred_ml", "gt_ml")} for row in rows}


def _volumes(mask: np.ndarray, voxel_ml: float, names: dict[int, str]) -> dict[str, float]:
    counts = np.bincount(mask.ravel(), minlength=max(names) + 1)
    return {name: round(float(counts[i]) * voxel_ml, 1) for i, name in names.items()}


def _outside_slab(pred: np.ndarray, ref: np.ndarray, slab: tuple[int, int], spacing_k: float,
                  voxel_ml: float, ids: dict[str, int]) -> dict[str, dict]:
    """Organ volumes predicted off the labelled slab (third voxel axis), judged as whole organs."""
    a, b = slab
    outside = np.ones(pred.shape[2], bool)
    outside[a:b] = False
    out = {}
    for name in ORGANS:
        lid = ids[name]
        ref_ml = float((ref[:, :, a:b] == lid).sum()) * voxel_ml
        hit = pred[:, :, outside] == lid
        out_ml = float(hit.sum()) * voxel_ml
        # An organ on the scan's first or last slice continues beyond the scan: its total is a lower bound.
        cut = bool((a == 0 and (ref[:, :, a] == lid).any()) or (b == ref.shape[2] and (ref[:, :, b - 1] == lid).any()))
        ks = np.flatnonzero(outside)[hit.any((0, 1))]
        reach = float(max(a - ks.min(), ks.max() - (b - 1), 0) * spacing_k) if ks.size else 0.0
        # The reference reaching the slab's edge next to unlabelled slices: the organ goes on there.
        continues = bool((a > 0 and (ref[:, :, a] == lid).any()) or (b < ref.shape[2] and (ref[:, :, b - 1] == lid).any()))
        total = ref_ml + out_ml
        lo, hi = PLAUSIBLE_ML[name]
        if total > hi:
            verdict = "above the plausible range: hallucinated or leaked"
        elif continues and out_ml == 0:
            verdict = "none predicted where the reference shows the organ going on: missed"
        elif total < lo:
            verdict = "below the range, organ cut by the scan: not judged" if cut else "below the range: missed"
        else:
            verdict = "within the range"
        out[name] = {"predicted_outside_ml": round(out_ml, 1), "reference_on_slab_ml": round(ref_ml, 1),
                     "total_ml": round(total, 1), "plausible_ml": [lo, hi], "cut_by_scan": cut, "continues_off_slab": continues,
                     "reaches_mm_off_slab": reach, "verdict": verdict}
    return out


def _above_t12(pred: np.ndarray, ref: np.ndarray, affine: np.ndarray, voxel_ml: float,
               pred_names: dict[int, str], ids: dict[str, int]) -> dict:
    """Organs predicted on patient3: inside the aorta/T12 references, and by height above T12's top."""
    def height(mask: np.ndarray) -> np.ndarray:
        ijk = np.stack(np.nonzero(mask), 1).astype(np.float64)
        return ijk @ affine[2, :3] + affine[2, 3]  # RAS world: row 2 is superior

    t12 = ref == ids["vertebrae_T12"]
    top = float(height(t12).max()) if t12.any() else None
    organs = {}
    for name in ORGANS:
        hit = pred == ids[name]
        entry = {"predicted_ml": round(float(hit.sum()) * voxel_ml, 1),
                 "inside_reference_aorta_or_T12_ml": round(float((hit & (ref > 0)).sum()) * voxel_ml, 1)}
        if top is not None and hit.any():
            z = height(hit) - top
            edges = (-np.inf, *BANDS_MM, np.inf)
            counts = np.histogram(z, bins=edges)[0]
            labels = ["below_T12_top", *(f"{lo:g}-{hi:g}mm" for lo, hi in zip(BANDS_MM, BANDS_MM[1:])),
                      f"over_{BANDS_MM[-1]:g}mm"]
            entry["ml_by_height_above_T12_top"] = {k: round(float(c) * voxel_ml, 1) for k, c in zip(labels, counts)}
        organs[name] = entry
    return {"t12_top_world_mm": top, "organs": {n: e for n, e in organs.items() if n in pred_names.values()}}


def score_masks(proxy: Path, masks: Path, pred_labels: dict[int, str], names: dict[int, str] | None = None) -> dict:
    """Score one tool's masks on the proxy set.

    Args:
        proxy: Folder written by `build_proxy_set`.
        masks: The tool's masks, one per case image, on that image's grid.
        pred_labels: Label id in the tool's masks -> label name (TotalSegmentator's names).
        names: Label id -> name of the reference labels; TotalSegmentator's by default.

    Returns:
        Per case: status, description, Dice/HD95/volumes per scored label, predicted ml
        per label; plus ``full_ct_outside_slab`` and ``patient3`` where those cases exist.
    """
    manifest = json.loads((proxy / "proxy.json").read_text())
    names = names or label_names()
    ids = {v: k for k, v in names.items()}
    unknown = sorted(set(pred_labels.values()) - set(ids))
    result: dict = {"masks": str(masks), "pred_labels": {str(k): v for k, v in pred_labels.items()},
                    "unknown_names": unknown, "cases": {}}
    for case, info in manifest["cases"].items():
        entry: dict = {"description": info["description"], "seen": info["seen"]}
        result["cases"][case] = entry
        path = find_mask(masks, case)
        if path is None:
            entry["status"] = "missing"
            continue
        pred, ref = read_scan(path), read_scan(proxy / "labels" / f"{case}.nii.gz")
        problem = _off_grid(pred, ref)
        if problem:
            entry["status"] = f"off-grid: {problem}"
            continue
        entry["status"] = "ok"
        p = _remap(pred.array, pred_labels, ids)
        r = np.asarray(ref.array).astype(np.uint16)
        voxel_ml = float(np.prod(ref.spacing)) / 1000.0
        known = {ids[n]: n for n in pred_labels.values() if n in ids}
        entry["predicted_ml"] = _volumes(p, voxel_ml, known)
        scored = {ids[n]: n for n in info["scored"] if n in known.values()}
        affine = ref.affine
        if "labelled_slices" in info:
            a, b = info["labelled_slices"]
            result["full_ct_outside_slab"] = _outside_slab(p, r, (a, b), ref.spacing[2], voxel_ml, ids)
            affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, a], [0, 0, 0, 1]], float)
            p, r = p[:, :, a:b], r[:, :, a:b]
        if info["kind"] == "patient3":
            result["patient3"] = _above_t12(p, r, affine, voxel_ml, known, ids)
        entry["labels"] = _evaluate(p, r, affine, scored) if scored else {}
    return result


def _fmt(entry: dict, name: str) -> str:
    if entry.get("status") != "ok":
        return "missing" if entry.get("status") == "missing" else "off-grid"
    row = entry["labels"].get(name)
    return "-" if row is None else f"{row['dice']:.3f}"


def dice_table(results: dict[str, dict], names: tuple[str, ...] = ORGANS) -> str:
    """Dice per case (rows) and label (columns); several tools side by side as ``a / b``.

    Args:
        results: Tool name -> `score_masks` result.
        names: Label columns, in order; a label no tool scored anywhere is left out.
    """
    tools = list(results)
    cases = list(next(iter(results.values()))["cases"])
    shown = [n for n in names if any(n in e.get("labels", {}) for r in results.values() for e in r["cases"].values())]
    header = ["case (" + " / ".join(tools) + ")", *shown]
    rows = [header]
    for case in cases:
        seen = next(iter(results.values()))["cases"][case]["seen"]
        rows.append([case + (" *" if seen else ""),
                     *(" / ".join(_fmt(results[t]["cases"][case], n) for t in tools) for n in shown)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("* seen in training (the labelled scan's own anatomy); Dice 1.0 where both masks are empty")
    return "\n".join(lines)


def volume_table(results: dict[str, dict]) -> str:
    """Organ ml on the unlabelled slices of the full CT and on patient3, tools side by side."""
    tools = list(results)
    lines = []
    first = next(iter(results.values()))
    if "full_ct_outside_slab" in first:
        lines.append("full CT, slices outside the labels: predicted ml outside + reference ml on slab = total "
                     "(plausible whole organ) -> verdict")
        for name in ORGANS:
            for t in tools:
                e = results[t].get("full_ct_outside_slab", {}).get(name)
                if e:
                    lo, hi = e["plausible_ml"]
                    lines.append(f"  {name:13s} {t:8s} {e['predicted_outside_ml']:8.1f} + {e['reference_on_slab_ml']:7.1f}"
                                 f" = {e['total_ml']:8.1f} ({lo:g}-{hi:g}) -> {e['verdict']}")
    if "patient3" in first:
        lines.append("patient3 (chest, labels: aorta and T12 only): predicted ml; inside the aorta/T12 references; "
                     f"over {BANDS_MM[-1]:g} mm above T12's top")
        for name in ORGANS:
            for t in tools:
                e = results[t].get("patient3", {}).get("organs", {}).get(name)
                if e:
                    high = e.get("ml_by_height_above_T12_top", {}).get(f"over_{BANDS_MM[-1]:g}mm", 0.0)
                    lines.append(f"  {name:13s} {t:8s} {e['predicted_ml']:8.1f} ml; inside {e['inside_reference_aorta_or_T12_ml']:6.1f}"
                                 f" ml; over {BANDS_MM[-1]:g} mm above T12 {high:6.1f} ml")
    return "\n".join(lines)


def shifted_summary(scores: dict, organs: tuple[str, ...] = ORGANS) -> dict:
    """One tool's Dice on the shifted copies (every proxy copy but the original), summarised.

    Returns:
        ``original`` (mean organ Dice on the labelled scan), ``mean`` and ``worst`` (the mean
        and the lowest of the copies' mean organ Dice), ``per_organ`` (each organ's mean over
        the copies), and ``copies`` (each copy's mean organ Dice).
    """
    cases = scores["cases"]

    def case_mean(case: str) -> float:
        labels = cases[case].get("labels", {})
        return float(np.mean([labels[o]["dice"] if o in labels else 0.0 for o in organs]))

    shifted = [c.name for c in PROXY_COPIES if c.name != "original"]
    copies = {case: case_mean(case) for case in shifted}
    per_organ = {o: float(np.mean([cases[c].get("labels", {}).get(o, {}).get("dice", 0.0) for c in shifted]))
                 for o in organs}
    return {"original": case_mean("original"), "mean": float(np.mean(list(copies.values()))),
            "worst": min(copies.values()), "per_organ": per_organ, "copies": copies}
