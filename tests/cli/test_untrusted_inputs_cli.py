"""`medvit segment` and `medvit info` on damaged inputs: one `Error:` line, exit 1, nothing written."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner, Result

from medvit.cli.main import main

SERIES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct_dicom"


def _nifti(path: Path, **fields: object) -> Path:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    header = nib.Nifti1Header(image.header.binaryblock, check=False)
    header["vox_offset"] = 352
    for key, value in fields.items():
        header[key] = value
    blob = header.binaryblock + b"\0" * 4 + np.zeros(8 * 8 * 8, np.int16).tobytes()
    path.write_bytes(gzip.compress(blob) if path.name.endswith(".gz") else blob)
    return path


def _series(folder: Path, damage: Callable[[list[Path]], None]) -> Path:
    if not SERIES.is_dir():
        pytest.skip(f"shared DICOM series not found at {SERIES} (a clone outside the workplace)")
    folder.mkdir()
    for f in sorted(SERIES.iterdir()):
        shutil.copyfile(f, folder / f.name)
    damage(sorted(folder.iterdir()))
    return folder


def _truncate(files: list[Path]) -> None:
    files[6].write_bytes(files[6].read_bytes()[:5000])


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "nan_sform": (lambda d: _nifti(d / "nan_sform.nii.gz", srow_x=[np.nan, 0, 0, 0]), "the sform holds NaN"),
    "no_orientation": (lambda d: _nifti(d / "bare.nii.gz", qform_code=0, sform_code=0), "no patient orientation"),
    "zero_pixdim": (lambda d: _nifti(d / "flat.nii", pixdim=[1, 2, 0, 3, 1, 1, 1, 1]), "invalid voxel size (pixdim)"),
    "huge_header": (lambda d: _nifti(d / "huge.nii.gz", dim=[3, 32767, 32767, 32767, 1, 1, 1, 1]), "implausible size"),
    "short_file": (lambda d: _nifti(d / "short.nii", dim=[3, 80, 80, 80, 1, 1, 1, 1]), "truncated"),
    "complex": (lambda d: _nifti(d / "complex.nii.gz", datatype=32, bitpix=64), "unsupported voxel type complex64"),
    "volumes": (lambda d: _nifti(d / "four.nii.gz", dim=[4, 8, 8, 4, 2, 1, 1, 1]), "2 volumes"),
    "folder_named_nii": (lambda d: (d / "dir.nii.gz").mkdir() or d / "dir.nii.gz", "is a folder, not a scan file"),
    "missing_slice": (lambda d: _series(d / "gap", lambda fs: fs[9].unlink()), "missing slices"),
    "truncated_slice": (lambda d: _series(d / "cut", _truncate), "damaged or truncated DICOM file"),
    "duplicate_slice": (lambda d: _series(d / "dup", lambda fs: shutil.copyfile(fs[3], fs[3].parent / "copy")),
                        "duplicated slice position"),
}  # fmt: skip


def _assert_one_error_line(result: Result, path: Path, problem: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: {path}: "), lines[0]
    assert problem in lines[0], (problem, lines[0])


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_info_reports_one_line(tmp_path: Path, case: str) -> None:
    make, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    result = CliRunner().invoke(main, ["info", str(path)])
    _assert_one_error_line(result, path, problem)


@pytest.mark.parametrize("case", ["nan_sform", "huge_header", "complex", "missing_slice", "truncated_slice"])
def test_segment_reports_one_line_and_writes_nothing(tmp_path: Path, tiny_checkpoint: Path, case: str) -> None:
    make, problem = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["segment", str(path), "--model", str(tiny_checkpoint), "-o", str(out), "-q"])
    _assert_one_error_line(result, path, problem)
    assert not out.exists() or list(out.iterdir()) == []


def test_segment_with_a_damaged_checkpoint_card(tmp_path: Path, tiny_checkpoint: Path) -> None:
    raw = tiny_checkpoint.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(raw.replace(b'\\"patch_size\\": [32, 32, 32]', b'\\"patch_size\\": [32, -3, 32]'))
    assert broken.read_bytes() != raw
    scan = _nifti(tmp_path / "ok.nii.gz")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["segment", str(scan), "--model", str(broken), "-o", str(out), "-q"])
    _assert_one_error_line(result, broken, "patch_size must be 2 or 3 positive integers")
    assert not out.exists()
