"""DICOM Segmentation output: frames on the right source slices, segments as the card names them."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

import medvit
from helpers import PHANTOM_LABELS, dicom_series_with_uids
from medvit.pipelines.dicom_seg import write_dicom_seg
from medvit.pipelines.errors import MedvitError, ScanError
from medvit.pipelines.io import read_scan
from medvit.pipelines.segment import BatchError, SegmentConfig, Segmenter, segment

SCT_TISSUE, SCT_LIVER, SCT_SPLEEN = "85756007", "10200004", "78961009"


@pytest.fixture(scope="module")
def series(shared_data, tmp_path_factory) -> Path:
    """The shared 20-slice CT series with its blanked study and series UIDs filled in."""
    return dicom_series_with_uids(shared_data / "ct_dicom", tmp_path_factory.mktemp("dicom") / "ct_series")


@pytest.fixture(scope="module")
def both(series, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("both")
    (result,) = segment([series], tiny_checkpoint, out, SegmentConfig(progress=False, sw_batch_size=8,
                                                                     output_type="both"))
    return result


@pytest.fixture
def predicted(both, monkeypatch) -> list[Path]:
    """Segmenter.predict gives the real model's mask of `both` (its kept labels), without
    running the model again; returns the scans it was asked for."""
    mask = np.asarray(nib.load(both.mask).dataobj)
    asked: list[Path] = []

    def predict(self: Segmenter, scan) -> np.ndarray:  # noqa: ANN001
        scan = getattr(scan, "scan", scan)  # a Prepared scan from the batch loop
        asked.append(scan.path)
        assert scan.shape == mask.shape
        return np.where(np.isin(mask, list(self.label_names)), mask, 0).astype(mask.dtype)

    monkeypatch.setattr(Segmenter, "predict", predict)
    return asked


def slices_by_position(folder: Path) -> list[pydicom.Dataset]:
    """The series' slice headers sorted along their normal, read here without medvit."""
    slices = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    normal = np.cross(*np.reshape(np.array(slices[0].ImageOrientationPatient, dtype=float), (2, 3)))
    return sorted(slices, key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)))


def sop_uid(ds: pydicom.Dataset) -> str:
    return ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID


def nifti_slice_of(ds: pydicom.Dataset, affine: np.ndarray) -> int:
    """The NIfTI k of a slice, from its ImagePositionPatient (LPS) and the NIfTI affine (RAS)."""
    lps = np.array(ds.ImagePositionPatient, dtype=float)
    ijk = np.linalg.solve(affine, np.array([-lps[0], -lps[1], lps[2], 1.0]))
    np.testing.assert_allclose(ijk[:2], 0.0, atol=1e-3)  # the slice's first pixel is voxel (0, 0, k)
    return int(round(ijk[2]))


def test_seg_frames_equal_the_nifti_mask_slice_by_slice(both, series) -> None:
    assert both.mask.name == "ct_series_seg.nii.gz" and both.dicom_seg.name == "ct_series_seg.dcm"
    nifti = nib.load(both.mask)
    mask = np.asarray(nifti.dataobj)
    present = [lid for lid in PHANTOM_LABELS if (mask == lid).any()]
    assert len(present) >= 2  # the random model writes several labels on this CT
    seg = hd.seg.segread(both.dicom_seg)
    slices = slices_by_position(series)
    uids = [sop_uid(ds) for ds in slices]
    ks = [nifti_slice_of(ds, nifti.affine) for ds in slices]
    assert sorted(ks) == list(range(20))
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    assert pixels.shape == (20, 512, 512)
    for k, frame in zip(ks, pixels, strict=True):
        np.testing.assert_array_equal(frame, mask[:, :, k].T)  # (rows, columns) = (j, i)
    # one frame per slice and label present there, each pointing at its slice
    expected = sum(len(np.unique(mask[:, :, k])) - (0 in mask[:, :, k]) for k in range(20))
    assert seg.NumberOfFrames == expected
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = slices[uids.index(ref)]
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient, source.ImagePositionPatient)


def test_segments_name_the_cards_labels(both, series) -> None:
    seg = hd.seg.segread(both.dicom_seg)
    assert {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence} == PHANTOM_LABELS
    types = {d.SegmentLabel: d.SegmentedPropertyTypeCodeSequence[0].CodeValue for d in seg.SegmentSequence}
    assert types == {"liver": SCT_LIVER, "spleen": SCT_SPLEEN, "kidney_right": SCT_TISSUE, "kidney_left": SCT_TISSUE}
    for d in seg.SegmentSequence:
        category = d.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeMeaning) == ("SCT", "Anatomical Structure")
        algorithm = d.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "medvit unetr_tiny" and algorithm.AlgorithmVersion == medvit.__version__
        assert d.SegmentAlgorithmType == "AUTOMATIC"
    source = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    assert seg.SegmentationType == "BINARY" and seg.Manufacturer == "medvit"
    assert seg.ManufacturerModelName == "unetr_tiny" and seg.SoftwareVersions == medvit.__version__
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert not list(both.dicom_seg.parent.glob(".tmp-*"))


def test_writer_puts_hand_made_labels_on_their_slices(series, tmp_path) -> None:
    scan = read_scan(series)
    files = scan.dicom_files
    assert [f.name for f in files] == [Path(ds.filename).name for ds in slices_by_position(series)]
    mask = np.zeros(scan.shape, np.uint8)
    mask[100:200, 50:120, 3:5] = 2  # columns 100-199, rows 50-119 of slices 3 and 4
    mask[300:310, 400:460, 17] = 4
    mask[0:5, 0:5, 9] = 1  # not written: left out of the names
    path = write_dicom_seg(mask, scan, {2: "spleen", 4: "kidney_left"}, tmp_path / "x_seg.dcm", "unetr_tiny")
    seg = hd.seg.segread(path)
    assert [(d.SegmentNumber, d.SegmentLabel) for d in seg.SegmentSequence] == [(1, "spleen"), (2, "kidney_left")]
    assert seg.NumberOfFrames == 3
    by_slice = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID: k
                for k, f in enumerate(files)}
    refs = sorted(
        (by_slice[f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID],
         f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    )
    assert refs == [(3, 1), (4, 1), (17, 2)]
    uids = list(by_slice)
    pixels = seg.get_pixels_by_source_instance([uids[4], uids[17]], segment_numbers=[1, 2],
                                               assert_missing_frames_are_empty=True)
    expected = np.zeros((2, 512, 512, 2), bool)
    expected[0, 50:120, 100:200, 0] = True
    expected[1, 400:460, 300:310, 1] = True
    np.testing.assert_array_equal(pixels.astype(bool), expected)


def test_label_filtering_numbers_the_kept_labels(series, tiny_checkpoint, tmp_path, predicted) -> None:
    cfg = SegmentConfig(progress=False, sw_batch_size=8, labels=["spleen", "kidney_right"], output_type="both")
    (result,) = segment([series], tiny_checkpoint, tmp_path, cfg)
    mask = np.asarray(nib.load(result.mask).dataobj)
    seg = hd.seg.segread(result.dicom_seg)
    assert [(d.SegmentNumber, d.SegmentLabel) for d in seg.SegmentSequence] == [(1, "spleen"), (2, "kidney_right")]
    uids = [sop_uid(pydicom.dcmread(f, stop_before_pixels=True)) for f in read_scan(series).dicom_files]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    expected = np.select([mask == 2, mask == 3], [1, 2], 0).transpose(2, 1, 0)
    assert np.count_nonzero(expected == 1) and np.count_nonzero(expected == 2)
    np.testing.assert_array_equal(pixels, expected)


def test_scan_files_and_anonymised_series_fail_before_the_model_runs(
    series, shared_data, tiny_checkpoint, tmp_path, predicted
) -> None:
    nifti = shared_data / "ct" / "example_ct_sm.nii.gz"
    anonymised = shared_data / "ct_dicom"
    cfg = SegmentConfig(progress=False, sw_batch_size=8, output_type="dicom-seg")
    with pytest.raises(BatchError) as err:
        segment([nifti, anonymised, series], tiny_checkpoint, tmp_path, cfg)
    assert err.value.details == [
        f"{nifti}: --output-type dicom-seg needs a DICOM series folder as input (this is a NIfTI file)",
        f"{anonymised}: its slices have no StudyInstanceUID (anonymised?); "
        "a DICOM SEG must name the study, series and slices it is of",
    ]
    assert predicted == [series]
    (done,) = err.value.results
    assert done.mask is None and done.dicom_seg == tmp_path / "ct_series_seg.dcm" and done.masks == [done.dicom_seg]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct_series_seg.dcm", "ct_series_volumes.json"]


def test_write_refuses_a_scan_without_slices(tmp_path, phantom_scan) -> None:
    scan = read_scan(phantom_scan[0])
    with pytest.raises(ScanError, match="needs a DICOM series folder"):
        write_dicom_seg(np.zeros(scan.shape, np.uint8), scan, {1: "liver"}, tmp_path / "x.dcm", "m")
    assert not list(tmp_path.iterdir())


def test_skip_existing_needs_the_dicom_seg(series, tiny_checkpoint, tmp_path, predicted) -> None:
    cfg = SegmentConfig(progress=False, sw_batch_size=8, output_type="dicom-seg")
    (first,) = segment([series], tiny_checkpoint, tmp_path, cfg)
    assert not first.skipped and not (tmp_path / "ct_series_seg.nii.gz").exists()
    leftover = tmp_path / ".tmp-0123456789ab-ct_series_seg.dcm"
    leftover.write_bytes(b"partial")
    cfg.skip_existing = True
    (again,) = segment([series], tiny_checkpoint, tmp_path, cfg)
    assert again.skipped and again.dicom_seg == first.dicom_seg and again.mask is None
    assert again.volumes_ml == first.volumes_ml and not leftover.exists()
    # the NIfTI mask that `both` also needs is missing: the scan is done again
    cfg.output_type = "both"
    (both,) = segment([series], tiny_checkpoint, tmp_path, cfg)
    assert not both.skipped and both.mask.exists()
    first.dicom_seg.unlink()
    cfg.output_type = "dicom-seg"
    (redone,) = segment([series], tiny_checkpoint, tmp_path, cfg)
    assert not redone.skipped and redone.dicom_seg.exists()
    assert len(predicted) == 3


def test_unknown_output_type_is_refused(tiny_checkpoint, tmp_path) -> None:
    with pytest.raises(MedvitError, match="--output-type must be one of nifti, dicom-seg, both"):
        segment([tmp_path], tiny_checkpoint, tmp_path / "out", SegmentConfig(output_type="dicom"))
