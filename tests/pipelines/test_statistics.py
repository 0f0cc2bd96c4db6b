"""Per-label statistics against a plain numpy computation, on random masks and on the real CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medvit.pipelines.errors import MedvitError
from medvit.pipelines.io import read_scan
from medvit.pipelines.statistics import (
    INTENSITY_KEYS,
    find_statistics,
    label_statistics,
    read_statistics,
    statistics_payload,
    statistics_rows,
    summarize_statistics,
)

SPACING = (0.7, 1.3, 2.5)


def reference(mask: np.ndarray, values: np.ndarray, spacing, names: dict[int, str]) -> dict[str, dict]:
    """The same figures the obvious way: one full comparison per label."""
    out = {}
    for lid, name in names.items():
        inside = values[mask == lid].astype(np.float64)
        row = {"voxels": inside.size, "volume_ml": inside.size * float(np.prod(spacing)) / 1000.0}
        if inside.size:
            p = np.percentile(inside, [5, 25, 50, 75, 95])
            row.update(mean=inside.mean(), std=inside.std(), min=inside.min(), max=inside.max(),
                       p5=p[0], p25=p[1], p50=p[2], p75=p[3], p95=p[4])  # fmt: skip
        else:
            row.update(dict.fromkeys(INTENSITY_KEYS))
        out[name] = row
    return out


def assert_matches(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert list(got) == list(want)
    for name, row in want.items():
        assert got[name]["voxels"] == row["voxels"] and isinstance(got[name]["voxels"], int), name
        assert got[name]["volume_ml"] == pytest.approx(row["volume_ml"], abs=5e-4), name
        for key in INTENSITY_KEYS:
            if row[key] is None:
                assert got[name][key] is None, (name, key)
            else:
                assert got[name][key] == pytest.approx(row[key], rel=1e-6, abs=1e-9), (name, key)


def random_case(rng: np.random.Generator, mask_dtype, value_dtype) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    shape = (23, 17, 11)
    mask = np.zeros(shape, dtype=mask_dtype)
    mask[0:6, 0:5, 0:3] = 3  # touches three borders at the origin
    mask[15:, 10:, 6:] = 7  # touches the opposite borders
    mask[8:12, 3:9, 2:9] = 200 if np.iinfo(mask_dtype).max >= 200 else 90
    scattered = rng.random(shape) < 0.05  # a label with voxels all over the volume
    mask[scattered & (mask == 0)] = 1
    if value_dtype == np.int16:
        values = rng.integers(-1024, 3000, shape).astype(np.int16)
    else:
        values = (rng.standard_normal(shape) * 40 + 50).astype(value_dtype)
    top = int(mask.max())
    names = {1: "scattered", 3: "corner", 5: "absent", 7: "far_corner", top: "middle", top + 1: "absent_above_max"}
    return mask, values, names


@pytest.mark.parametrize(
    "mask_dtype, value_dtype",
    [(np.uint8, np.int16), (np.uint16, np.float32), (np.int32, np.float64), (np.int8, np.int16)],
)
def test_equals_a_plain_numpy_computation(mask_dtype, value_dtype) -> None:
    rng = np.random.default_rng(7)
    mask, values, names = random_case(rng, mask_dtype, value_dtype)
    got = label_statistics(mask, values, SPACING, names)
    assert_matches(got, reference(mask, values, SPACING, names))
    assert got["absent"] == {"voxels": 0, "volume_ml": 0.0, **dict.fromkeys(INTENSITY_KEYS)}
    assert got["corner"]["voxels"] == 6 * 5 * 3 and got["far_corner"]["voxels"] == 8 * 7 * 5


def test_labels_not_asked_for_are_left_out_and_order_is_kept() -> None:
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[:2], mask[2:4], mask[4:] = 4, 2, 9
    values = np.arange(mask.size, dtype=np.int16).reshape(mask.shape)
    got = label_statistics(mask, values, (1.0, 1.0, 1.0), {9: "nine", 2: "two"})
    assert list(got) == ["nine", "two"]
    assert got["two"]["min"] == 72.0 and got["two"]["max"] == 143.0 and got["two"]["p50"] == 107.5
    assert got["nine"]["volume_ml"] == 0.072


def test_a_boolean_mask_is_label_one() -> None:
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    values = np.full(mask.shape, -5.0, np.float32)
    values[mask] = 10.0
    got = label_statistics(mask, values, (2.0, 2.0, 2.0), {1: "x"})["x"]
    assert (got["voxels"], got["volume_ml"], got["mean"], got["std"]) == (8, 0.064, 10.0, 0.0)


@pytest.mark.parametrize(
    "mask, values, names, fragment",
    [
        (np.zeros((3, 3, 3), np.uint8), np.zeros((3, 3, 4)), {1: "a"}, "shape"),
        (np.zeros((3, 3, 3), np.float32), np.zeros((3, 3, 3)), {1: "a"}, "integers"),
        (np.zeros((3, 3, 3), np.uint8), np.zeros((3, 3, 3)), {0: "background"}, ">= 1"),
    ],
)
def test_bad_arguments_are_value_errors(mask, values, names, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        label_statistics(mask, values, (1.0, 1.0, 1.0), names)


def test_real_ct_hounsfield_units_are_plausible(shared_data: Path) -> None:
    ct = read_scan(shared_data / "ct" / "example_ct_sm.nii.gz")
    seg = read_scan(shared_data / "ct" / "example_seg.nii.gz")
    assert ct.shape == seg.shape
    table = json.loads((shared_data / "ct" / "labels_total.json").read_text())
    names = {int(k): v for k, v in table.items() if int(k) > 0}
    got = label_statistics(seg.array, ct.array, ct.spacing, names)
    assert_matches(got, reference(np.asarray(seg.array), np.asarray(ct.array), ct.spacing, names))
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    for name, row in got.items():
        assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml, abs=5e-4), name
    present = {int(v) for v in np.unique(seg.array) if v > 0}
    assert {n for n, r in got.items() if r["voxels"]} == {names[i] for i in present}
    liver, spleen, aorta = got["liver"], got["spleen"], got["aorta"]
    assert 30 <= liver["mean"] <= 90 and 30 <= liver["p50"] <= 90, liver  # liver parenchyma
    assert 20 <= spleen["mean"] <= 90, spleen
    assert 20 <= aorta["p50"] <= 400, aorta  # blood, with or without contrast
    for vertebra in ("vertebrae_T12", "vertebrae_L1"):  # bone: far denser than soft tissue
        assert got[vertebra]["mean"] > 150 and got[vertebra]["p95"] > 400, got[vertebra]
    lung = got["lung_lower_lobe_right"]
    assert lung["p50"] < -600 and lung["max"] < 100, lung
    assert got["urinary_bladder"]["voxels"] == 0 and got["urinary_bladder"]["mean"] is None


def _write(path: Path, payload) -> Path:
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_folder_rows_and_summary(tmp_path: Path) -> None:
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[:2] = 1
    values = np.arange(125, dtype=np.int16).reshape(5, 5, 5)
    for stem, spacing in (("b", (1.0, 1.0, 1.0)), ("a", (2.0, 2.0, 2.0))):
        labels = label_statistics(mask, values, spacing, {1: "liver", 2: "spleen"})
        _write(tmp_path / f"{stem}_stats.json", statistics_payload(labels, spacing, "ct", f"{stem}.nii.gz"))
    (tmp_path / ".tmp-0123456789ab-c_stats.json").write_text("{")  # a killed writer's leftover
    paths = find_statistics(tmp_path)
    assert [p.name for p in paths] == ["a_stats.json", "b_stats.json"]
    assert read_statistics(paths[0])["units"] == "HU" and read_statistics(paths[0])["spacing_mm"] == [2.0, 2.0, 2.0]
    rows = statistics_rows(paths)
    assert [(r["scan"], r["label"], r["voxels"], r["volume_ml"]) for r in rows] == [
        ("a", "liver", 50, 0.4), ("a", "spleen", 0, 0.0), ("b", "liver", 50, 0.05), ("b", "spleen", 0, 0.0)
    ]  # fmt: skip
    assert rows[0]["mean"] == pytest.approx(values[:2].mean()) and rows[1]["p50"] is None
    summary = summarize_statistics(rows)
    assert summary == [
        {"label": "liver", "scans": 2, "present": 2, "median_volume_ml": pytest.approx(0.225),
         "median_mean": pytest.approx(24.5)},
        {"label": "spleen", "scans": 2, "present": 0, "median_volume_ml": None, "median_mean": None},
    ]  # fmt: skip
    assert find_statistics(tmp_path / "a_stats.json") == [] and find_statistics(tmp_path / "missing") == []


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ("{not json", "not a readable JSON"),
        ([1, 2], "no 'labels' object"),
        ({"labels": {"liver": 3}}, "label 'liver' is not an object"),
        ({"labels": {"liver": {"voxels": 3, "volume_ml": 1.0}}}, "label 'liver' has no number or null 'mean'"),
        ({"labels": {"liver": {"voxels": "3", "volume_ml": 1.0}}}, "has no number 'voxels'"),
    ],
)
def test_malformed_stats_files_are_one_line_naming_the_file(tmp_path: Path, payload, fragment) -> None:
    path = _write(tmp_path / "x_stats.json", payload)
    with pytest.raises(MedvitError) as err:
        statistics_rows([path])
    message = str(err.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message
