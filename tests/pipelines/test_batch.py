"""Batches of scans: bad scans reported while the good ones are segmented, resuming, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medvit.cli.main import main
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.phantom import make_phantom, save_phantom
from medvit.pipelines.segment import BatchError, SegmentConfig, segment

QUIET = SegmentConfig(progress=False)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Three small phantom scans a, b, c in one folder."""
    folder = tmp_path_factory.mktemp("scans")
    for i, name in enumerate("abc"):
        ph = make_phantom(seed=20 + i, shape=(32, 28, 12), spacing=(3.0, 3.0, 6.0))
        save_phantom(ph, folder / f"{name}.nii.gz", folder.parent / f"{folder.name}_labels_{name}.nii.gz")
    return folder


def outputs(out: Path) -> dict[str, int]:
    """Every file in the output folder with its modification time (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())}


def assert_complete(out: Path) -> None:
    """No temporary file, and every visible output is whole."""
    for p in out.iterdir():
        assert not p.name.startswith("."), f"left behind: {p.name}"
        if p.name.endswith("_seg.nii.gz"):
            assert np.asarray(nib.load(str(p)).dataobj).shape == (32, 28, 12)
        elif p.name.endswith("_volumes.json"):
            assert "liver" in json.loads(p.read_text())


@pytest.fixture()
def bad_scans(tmp_path) -> dict[str, Path]:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "text.nii.gz").write_text("not an image\n")
    nan = np.zeros((8, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(d / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), str(d / "flat.nii.gz"))
    return {"text": d / "text.nii.gz", "nan": d / "nan.nii.gz", "flat": d / "flat.nii.gz", "missing": d / "gone.nii.gz"}


def test_bad_scans_are_reported_and_good_ones_segmented(tmp_path, scans, bad_scans, tiny_checkpoint) -> None:
    out = tmp_path / "out"
    inputs = [bad_scans["missing"], scans / "a.nii.gz", bad_scans["text"], bad_scans["nan"], scans / "b.nii.gz",
              bad_scans["flat"]]  # fmt: skip
    seen = []
    with pytest.raises(BatchError) as info:
        segment(inputs, tiny_checkpoint, out, QUIET, on_result=seen.append)
    err = info.value
    assert [r.input.name for r in err.results] == ["a.nii.gz", "b.nii.gz"] == [r.input.name for r in seen]
    assert sorted(outputs(out)) == ["a_seg.nii.gz", "a_volumes.json", "b_seg.nii.gz", "b_volumes.json"]
    assert_complete(out)
    failed = {f.input.name: f.problem for f in err.failures}
    assert set(failed) == {"gone.nii.gz", "text.nii.gz", "nan.nii.gz", "flat.nii.gz"}
    for name, problem in failed.items():
        assert problem.startswith(f"{bad_scans['text'].parent / name}: ") and "\n" not in problem
    assert "no such file" in failed["gone.nii.gz"] and "NaN" in failed["nan.nii.gz"]
    assert "3D" in failed["flat.nii.gz"]
    assert str(err) == f"4 of 6 scans failed (listed above); the other 2 are in {out}"
    assert err.details == [f.problem for f in err.failures]


def test_cli_lists_each_bad_scan_and_exits_1_after_the_good_ones(tmp_path, scans, bad_scans, tiny_checkpoint) -> None:
    out = tmp_path / "out"
    args = ["segment", str(scans), str(bad_scans["text"]), str(bad_scans["nan"]), "-m", str(tiny_checkpoint),
            "-o", str(out), "-q"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    assert [ln.split(" -> ")[0] for ln in lines[:3]] == [str(scans / f"{n}.nii.gz") for n in "abc"]
    assert lines[3].startswith(f"{bad_scans['text']}: ") and lines[4].startswith(f"{bad_scans['nan']}: ")
    assert lines[5] == f"Error: 2 of 5 scans failed (listed above); the other 3 are in {out}"
    assert len(lines) == 6
    assert len(list(out.glob("*_seg.nii.gz"))) == 3


def test_bad_checkpoint_or_output_folder_stops_before_any_scan(tmp_path, scans, tiny_checkpoint) -> None:
    bad_ckpt = tmp_path / "model.safetensors"
    bad_ckpt.write_bytes(b"\x00" * 64)
    with pytest.raises(MedvitError, match="model.safetensors") as info:
        segment([scans], bad_ckpt, tmp_path / "out", QUIET)
    assert not isinstance(info.value, BatchError)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(MedvitError, match="output folder") as info:
            segment([scans], tiny_checkpoint, out, QUIET)
        assert not isinstance(info.value, BatchError)
    with pytest.raises(MedvitError, match="unknown label"):
        segment([scans], tiny_checkpoint, tmp_path / "out", SegmentConfig(progress=False, labels=["lung"]))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_scans_with_the_same_output_name(tmp_path, scans, tiny_checkpoint) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.nii.gz").write_bytes((scans / "a.nii.gz").read_bytes())
    with pytest.raises(BatchError) as info:
        segment([scans / "a.nii.gz", other / "a.nii.gz"], tiny_checkpoint, tmp_path / "out", QUIET)
    (failure,) = info.value.failures
    assert failure.input == other / "a.nii.gz" and "would overwrite those of" in failure.problem
    assert sorted(outputs(tmp_path / "out")) == ["a_seg.nii.gz", "a_volumes.json"]


def test_skip_existing_redoes_only_unfinished_scans(tmp_path, scans, tiny_checkpoint) -> None:
    out = tmp_path / "out"
    segment([scans], tiny_checkpoint, out, QUIET)
    (out / "b_volumes.json").unlink()  # a scan killed after its mask, before its volumes
    (out / "c_seg.nii.gz").unlink()
    (out / ".tmp-0123abcd-c_seg.nii.gz").write_bytes(b"partial")  # what SIGKILL can leave
    before = outputs(out)
    results = segment([scans], tiny_checkpoint, out, SegmentConfig(progress=False, skip_existing=True))
    assert [(r.input.name, r.skipped) for r in results] == [("a.nii.gz", True), ("b.nii.gz", False),
                                                            ("c.nii.gz", False)]  # fmt: skip
    assert results[0].volumes_ml == json.loads((out / "a_volumes.json").read_text())
    after = outputs(out)
    assert sorted(after) == [f"{n}_{kind}" for n in "abc" for kind in ("seg.nii.gz", "volumes.json")]
    assert after["a_seg.nii.gz"] == before["a_seg.nii.gz"] and after["a_volumes.json"] == before["a_volumes.json"]
    assert after["b_seg.nii.gz"] != before["b_seg.nii.gz"]
    assert_complete(out)
    # with --preview, a scan without its preview is not finished
    results = segment([scans / "a.nii.gz"], tiny_checkpoint, out,
                      SegmentConfig(progress=False, skip_existing=True, preview=True))  # fmt: skip
    assert not results[0].skipped and (out / "a_preview.png").exists()


DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    import nibabel

    sig, victim = getattr(signal, sys.argv[1]), sys.argv[2]
    real_save = nibabel.save

    def save(img, filename, *args, **kwargs):
        real_save(img, filename, *args, **kwargs)
        if victim in os.path.basename(str(filename)):
            # the temporary file is complete on disk, not yet renamed: die now
            os.kill(os.getpid(), sig)
            time.sleep(60)

    nibabel.save = save
    from medvit.cli.main import main
    main(sys.argv[3:])
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killed_batch_leaves_no_partial_file_and_resumes(tmp_path, scans, tiny_checkpoint, sig) -> None:
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), sig, "b_seg.nii.gz", "segment", str(scans), "-m", str(tiny_checkpoint),
           "-o", str(out), "-q", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if sig == "SIGTERM":
        # SIGTERM unwinds: the writer removes its temporary file; status 128 + 15
        assert proc.returncode == 143, proc.stderr[-2000:]
        assert sorted(outputs(out)) == ["a_seg.nii.gz", "a_volumes.json"]
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        left = sorted(outputs(out))
        assert left[0].startswith(".tmp-") and left[0].endswith("-b_seg.nii.gz"), left  # hidden, never a real name
        assert left[1:] == ["a_seg.nii.gz", "a_volumes.json"]
    before = outputs(out)
    results = segment([scans], tiny_checkpoint, out, SegmentConfig(progress=False, skip_existing=True))
    assert [r.skipped for r in results] == [True, False, False]
    after = outputs(out)
    assert sorted(after) == [f"{n}_{kind}" for n in "abc" for kind in ("seg.nii.gz", "volumes.json")]
    assert after["a_seg.nii.gz"] == before["a_seg.nii.gz"]
    assert_complete(out)
