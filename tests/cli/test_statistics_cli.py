"""`medvit segment --statistics` and `medvit evaluate FOLDER`: the stats agree with the mask,
the volumes file and the scan, and a folder of them becomes one CSV."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from helpers import PHANTOM_LABELS
from medvit.cli.main import main
from medvit.pipelines.statistics import INTENSITY_KEYS, STATS_COLUMNS


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, tiny_checkpoint, phantom_scan) -> Path:
    """Two scans (the phantom and its label map, read as a scan) segmented with --statistics."""
    out = tmp_path_factory.mktemp("stats") / "out"
    res = run("segment", phantom_scan[0].parent, "-m", tiny_checkpoint, "-o", out, "--statistics", "-q")
    assert res.exit_code == 0, res.output
    return out


def test_segment_statistics_agree_with_mask_volumes_and_scan(segmented: Path, phantom_scan) -> None:
    img, _ = phantom_scan
    stats = json.loads((segmented / "phantom_stats.json").read_text())
    volumes = json.loads((segmented / "phantom_volumes.json").read_text())
    mask = np.asarray(nib.load(segmented / "phantom_seg.nii.gz").dataobj)
    scan = nib.load(img)
    values = scan.get_fdata()
    assert stats["scan"] == "phantom.nii.gz" and stats["units"] == "HU"
    assert stats["spacing_mm"] == pytest.approx([3.0, 3.0, 6.0])
    labels = stats["labels"]
    assert list(labels) == list(volumes) == list(PHANTOM_LABELS.values())
    assert sum(r["voxels"] for r in labels.values()) > 0  # the random model labels something
    for lid, name in PHANTOM_LABELS.items():
        row, inside = labels[name], values[mask == lid]
        assert row["voxels"] == inside.size, name
        assert row["volume_ml"] == volumes[name], name
        if inside.size:
            assert row["mean"] == pytest.approx(inside.mean(), rel=1e-6), name
            assert row["p95"] == pytest.approx(np.percentile(inside, 95), rel=1e-6), name
        else:
            assert all(row[k] is None for k in INTENSITY_KEYS), name


def test_evaluate_folder_aggregates_the_stats(segmented: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "stats.csv"
    res = run("evaluate", segmented, "--csv", out)
    assert res.exit_code == 0, res.output
    assert f"2 scan(s), 4 label(s); CSV written to {out}" in res.output
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == STATS_COLUMNS
        rows = list(reader)
    assert [(r["scan"], r["label"]) for r in rows] == [
        (scan, name) for scan in ("phantom", "phantom_labels") for name in PHANTOM_LABELS.values()
    ]
    for row in rows:
        want = json.loads((segmented / f"{row['scan']}_stats.json").read_text())["labels"][row["label"]]
        assert int(row["voxels"]) == want["voxels"] and float(row["volume_ml"]) == want["volume_ml"]
        for key in INTENSITY_KEYS:
            assert (row[key] == "") if want[key] is None else (float(row[key]) == want[key]), (row, key)
    liver = [json.loads((segmented / f"{s}_stats.json").read_text())["labels"]["liver"]
             for s in ("phantom", "phantom_labels")]  # fmt: skip
    present = [r["volume_ml"] for r in liver if r["voxels"]]
    line = next(ln for ln in res.output.splitlines() if ln.startswith("liver "))
    assert line.split()[1] == f"{len(present)}/2"
    if present:
        assert line.split()[2] == f"{np.median(present):.1f}"


def test_skip_existing_redoes_a_scan_without_its_stats_file(tmp_path: Path, tiny_checkpoint, phantom_scan) -> None:
    img, _ = phantom_scan
    out = tmp_path / "out"
    assert run("segment", img, "-m", tiny_checkpoint, "-o", out, "-q").exit_code == 0
    assert not (out / "phantom_stats.json").exists()
    res = run("segment", img, "-m", tiny_checkpoint, "-o", out, "-q", "--skip-existing", "--statistics")
    assert res.exit_code == 0 and "skipped" not in res.output, res.output
    assert (out / "phantom_stats.json").is_file()
    res = run("segment", img, "-m", tiny_checkpoint, "-o", out, "-q", "--skip-existing", "--statistics")
    assert res.exit_code == 0 and "already segmented" in res.output, res.output


def test_evaluate_one_argument_that_is_not_a_stats_folder(tmp_path: Path, phantom_scan) -> None:
    for target in (tmp_path, phantom_scan[0]):
        res = run("evaluate", target)
        assert res.exit_code == 2 and "Traceback" not in res.output
        errors = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
        made_by = "(made by medvit segment --statistics); to score masks give PRED GT"
        assert errors == [f"Error: {target}: no *_stats.json files {made_by}"]


def test_evaluate_malformed_stats_file_is_one_line_and_writes_nothing(tmp_path: Path, segmented: Path) -> None:
    folder = tmp_path / "stats"
    shutil.copytree(segmented, folder)
    bad = folder / "broken_stats.json"
    bad.write_text('{"labels": {"liver": {"voxels": 1}}}')
    out = tmp_path / "x.csv"
    res = run("evaluate", folder, "--csv", out)
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: label 'liver' has no number 'volume_ml'"), lines
    assert not out.exists()


def test_a_scan_whose_stats_fail_is_not_finished(tmp_path: Path, tiny_checkpoint, phantom_scan, monkeypatch) -> None:
    from medvit.pipelines import segmenter as segment_module
    from medvit.pipelines.errors import MedvitError
    from medvit.pipelines.segment import BatchError, SegmentConfig, segment

    def fail(*args, **kwargs):
        raise MedvitError("statistics failed")

    monkeypatch.setattr(segment_module, "label_statistics", fail)
    out = tmp_path / "out"
    with pytest.raises(BatchError, match="statistics failed"):
        segment([phantom_scan[0]], tiny_checkpoint, out, SegmentConfig(progress=False, statistics=True))
    assert not (out / "phantom_volumes.json").exists() and not (out / "phantom_stats.json").exists()
    assert not list(out.glob(".tmp-*"))
