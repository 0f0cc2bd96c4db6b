"""The preview PNG: where the overlay lands on each plane, orientation, aspect and legend."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, ornt_transform
from PIL import Image, ImageDraw

from medvit.pipelines import preview as pv
from medvit.pipelines.io import read_scan
from medvit.pipelines.palette import label_colour
from medvit.pipelines.preview import LEGEND_KEY, render_preview, write_preview
from medvit.pipelines.segment import SegmentConfig, Segmenter
from medvit.pipelines.train_images import overlay_slice

# A RAS grid with a different voxel size along each axis, so a wrong aspect shows.
SHAPE = (30, 24, 12)
SPACING = (2.0, 2.5, 5.0)
# The blob: patient's right (high x), anterior (high y), superior (high z), in RAS voxels.
BOX = ((20, 26), (15, 21), (7, 10))
BLOB_LABEL = 3
NAMES = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}


def _ras_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(-200, 200, size=SHAPE).astype(np.int16)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    (x0, x1), (y0, y1), (z0, z1) = BOX
    mask[x0:x1, y0:y1, z0:z1] = BLOB_LABEL
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-30.0, 12.0, 100.0)
    return image, mask, affine


def _reoriented(codes: str, tilt_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same physical scan and blob stored in another voxel order (and slightly rotated)."""
    image, mask, affine = _ras_case()
    to = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    img = nib.Nifti1Image(image, affine).as_reoriented(to)
    lab = nib.Nifti1Image(mask, affine).as_reoriented(to)
    out_affine = img.affine.copy()
    if tilt_deg:
        t = np.deg2rad(tilt_deg)
        rot = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        out_affine = rot @ out_affine
    assert "".join(nib.aff2axcodes(out_affine)) == codes
    return np.asarray(img.dataobj), np.asarray(lab.dataobj), out_affine


def _overlaid(pixels: np.ndarray) -> np.ndarray:
    """Pixels that are not grey: the scan is drawn in grey, so only the overlay has colour."""
    p = pixels.astype(int)
    return p.max(-1) - p.min(-1) > 2


def _expected_box(panel_h: int, panel_w: int, rows: tuple[float, float], cols: tuple[float, float]) -> tuple:
    """(top, bottom, left, right) in panel pixels of a box given as fractions of the panel."""
    return rows[0] * panel_h, rows[1] * panel_h, cols[0] * panel_w, cols[1] * panel_w


# Where the blob must appear, as fractions (rows top->bottom, cols left->right) of each panel:
#   axial: rows run anterior->posterior, columns patient's right->left
#   coronal: rows superior->inferior, columns right->left
#   sagittal: rows superior->inferior, columns anterior->posterior
def _fractions() -> dict[str, tuple[tuple[float, float], tuple[float, float]]]:
    (x0, x1), (y0, y1), (z0, z1) = BOX
    nx, ny, nz = SHAPE
    right_to_left = ((nx - x1) / nx, (nx - x0) / nx)
    ant_to_post = ((ny - y1) / ny, (ny - y0) / ny)
    sup_to_inf = ((nz - z1) / nz, (nz - z0) / nz)
    return {
        "axial": (ant_to_post, right_to_left),
        "coronal": (sup_to_inf, right_to_left),
        "sagittal": (sup_to_inf, ant_to_post),
    }


def _check_panels(preview: pv.Preview) -> None:
    sx, sy, sz = SPACING
    nx, ny, nz = SHAPE
    # physical aspect: width / height in millimetres of each plane
    aspects = {"axial": (nx * sx) / (ny * sy), "coronal": (nx * sx) / (nz * sz), "sagittal": (ny * sy) / (nz * sz)}
    colour = np.asarray(label_colour(BLOB_LABEL), float)
    for plane, (rows, cols) in _fractions().items():
        top, left, h, w = preview.panels[plane]
        assert w / h == pytest.approx(aspects[plane], abs=1.0 / h), plane
        panel = preview.pixels[top : top + h, left : left + w]
        hit = _overlaid(panel)
        assert hit.any(), plane
        r, c = np.nonzero(hit)
        e_top, e_bottom, e_left, e_right = _expected_box(h, w, rows, cols)
        # the overlay is exactly the blob's rectangle (to a pixel of nearest-neighbour scaling)
        assert abs(r.min() - e_top) <= 1 and abs(r.max() + 1 - e_bottom) <= 1, (plane, r.min(), r.max())
        assert abs(c.min() - e_left) <= 1 and abs(c.max() + 1 - e_right) <= 1, (plane, c.min(), c.max())
        assert hit[r.min() : r.max() + 1, c.min() : c.max() + 1].all(), plane
        # right-anterior-superior blob: top-left quadrant of every plane
        assert r.mean() < h / 2 and c.mean() < w / 2, plane
        # the overlay blends grey with the label's colour: removing the colour leaves grey
        blended = panel[hit].astype(float) - pv.OVERLAY_ALPHA * colour
        assert np.ptp(blended, axis=1).max() <= 1.5, plane
    # nowhere outside the panels is coloured except the legend's swatches
    views = preview.pixels[: pv.VIEW_HEIGHT].copy()
    for top, left, h, w in preview.panels.values():
        views[top : top + h, left : left + w] = 0
    assert not _overlaid(views).any()


@pytest.mark.parametrize("codes,tilt", [("RAS", 0.0), ("LPS", 0.0), ("PSL", 0.0), ("LPS", 10.0)])
def test_blob_lands_where_it_is_in_the_patient(codes, tilt) -> None:
    image, mask, affine = _reoriented(codes, tilt)
    preview = render_preview(image, mask, affine, NAMES)
    _check_panels(preview)
    ras = render_preview(*_ras_case(), NAMES)
    # the nearest patient axes are the same in every case: the very same picture
    np.testing.assert_array_equal(preview.pixels, ras.pixels)


def test_mirrored_blob_moves_to_the_other_side() -> None:
    """A blob on the patient's left must land on the image's right in axial and coronal."""
    image, mask, affine = _ras_case()
    mirrored = mask[::-1].copy()
    preview = render_preview(image, mirrored, affine, NAMES)
    for plane in ("axial", "coronal"):
        top, left, h, w = preview.panels[plane]
        _, c = np.nonzero(_overlaid(preview.pixels[top : top + h, left : left + w]))
        assert c.min() > w / 2, plane


def _caption_pixels(text: str, shape: tuple[int, int]) -> np.ndarray:
    canvas = Image.new("RGB", (shape[1], shape[0]))
    ImageDraw.Draw(canvas).text((0, 0), text, fill=(255, 255, 255), font=pv._font())
    return np.asarray(canvas)


def test_legend_names_and_colours(tmp_path) -> None:
    image, mask, affine = _ras_case()
    mask[2:5, 2:5, 2:5] = 7  # a label the card does not name
    out = write_preview(image, mask, affine, tmp_path / "p.png", NAMES)
    written = Image.open(out)
    pixels = np.asarray(written.convert("RGB"))
    preview = render_preview(image, mask, affine, NAMES)
    np.testing.assert_array_equal(pixels, preview.pixels)
    assert not list(tmp_path.glob(".tmp-*"))

    stored = json.loads(written.text[LEGEND_KEY])
    assert [(e["label"], e["name"], e["found"]) for e in stored] == [
        (1, "liver", False), (2, "spleen", False), (3, "kidney_right", True), (4, "kidney_left", False),
        (7, "label 7", True),
    ]
    assert stored[2]["colour"] == "#{:02x}{:02x}{:02x}".format(*label_colour(3)) == "#ffe119"
    assert len({e["colour"] for e in stored}) == len(stored)

    legend_top = pv.VIEW_HEIGHT
    assert pixels.shape[0] > legend_top
    for entry, item in zip(preview.legend, stored):
        assert "#{:02x}{:02x}{:02x}".format(*entry.colour) == item["colour"]
        top, left, h, w = entry.swatch
        assert top >= legend_top
        swatch = pixels[top : top + h, left : left + w].reshape(-1, 3)
        assert (swatch == np.asarray(entry.colour)).all(), entry
        caption = entry.name if entry.found else f"{entry.name} (not found)"
        t_top, t_left = entry.text
        region = pixels[t_top : t_top + pv._ROW, t_left : t_left + pv._text_width(caption) + 2]
        assert (region > 128).any(), caption
        np.testing.assert_array_equal(region, _caption_pixels(caption, region.shape[:2]), err_msg=caption)


def test_segmenter_passes_the_kept_label_names(tmp_path, tiny_checkpoint, phantom_scan) -> None:
    img, _ = phantom_scan
    seg = Segmenter(tiny_checkpoint, SegmentConfig(progress=False, preview=True, labels=["spleen", "kidney_left"]))
    result = seg.segment_file(img, tmp_path)
    stored = json.loads(Image.open(result.preview).text[LEGEND_KEY])
    assert [(e["label"], e["name"]) for e in stored] == [(2, "spleen"), (4, "kidney_left")]
    mask = np.asarray(nib.load(result.mask).dataobj)
    assert [e["found"] for e in stored] == [bool((mask == 2).any()), bool((mask == 4).any())]
    assert read_scan(img).shape == mask.shape


def test_training_images_use_the_preview_colours() -> None:
    """TensorBoard's validation pictures colour each label as the preview PNG does."""
    label = torch.zeros(4, 4, 1, dtype=torch.long)
    label[:, :2] = 9  # beyond the first six colours
    picture = overlay_slice(torch.zeros(4, 4, 1), torch.zeros_like(label), label)  # grey 0: pure half colour
    reference = picture[:, :, :4]  # left panel, rotated: label 9 in some pixels
    expected = 0.5 * torch.tensor(label_colour(9), dtype=torch.float32) / 255.0
    coloured = reference.flatten(1).T[(reference.flatten(1) > 0).any(0)]
    assert len(coloured) == 8 and torch.allclose(coloured, expected.expand_as(coloured))
