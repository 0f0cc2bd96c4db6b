"""Ensembles: probabilities averaged over checkpoints, mismatched checkpoints refused."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import make_tiny_checkpoint
from medvit.cli.main import main
from medvit.pipelines.checkpoint import load_checkpoint, save_checkpoint
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.io import read_scan
from medvit.pipelines.segment import SegmentConfig, Segmenter, common_rules

EXACT = SegmentConfig(progress=False, precision="fp32", device="cpu", postprocess="none")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    return (make_tiny_checkpoint(folder / "a.safetensors", seed=0),
            make_tiny_checkpoint(folder / "b.safetensors", seed=1))  # fmt: skip


def test_ensemble_probabilities_are_the_members_mean(pair, phantom_scan) -> None:
    scan = read_scan(phantom_scan[0])
    a, b = (Segmenter(c, EXACT).predict_proba(scan) for c in pair)
    assert (a.argmax(0) != b.argmax(0)).float().mean() > 0.05  # two different models
    both = Segmenter(list(pair), EXACT)
    torch.testing.assert_close(both.predict_proba(scan), (a + b) / 2, atol=2e-6, rtol=0)
    mask = both.predict(scan)
    np.testing.assert_array_equal(mask, ((a + b) / 2).argmax(0).numpy().astype(np.uint8))


def test_one_checkpoint_twice_is_that_checkpoint(pair, phantom_scan) -> None:
    scan = read_scan(phantom_scan[0])
    one = Segmenter(pair[0], EXACT).predict(scan)
    np.testing.assert_array_equal(Segmenter([pair[0], pair[0]], EXACT).predict(scan), one)


def _variant(src, dst, **changes):
    model, card = load_checkpoint(src, torch.device("cpu"))
    for key, value in changes.items():
        setattr(card, key, value)
    return save_checkpoint(model, card, dst)


def test_mismatched_members_are_refused_in_one_line(tmp_path, pair) -> None:
    _, card = load_checkpoint(pair[0], torch.device("cpu"))
    renamed = dict(card.labels)
    renamed[2] = {"id": 2, "name": "pancreas"}
    other = _variant(pair[0], tmp_path / "renamed.safetensors", labels=renamed)
    with pytest.raises(MedvitError) as info:
        Segmenter([pair[0], other], EXACT)
    text = str(info.value)
    assert text.startswith(f"{other}: labels ") and "2=pancreas" in text and "2=spleen" in text and "\n" not in text
    coarse = _variant(pair[0], tmp_path / "coarse.safetensors",
                      preprocessing={**card.preprocessing, "spacing": [2.0, 2.0, 2.0]})  # fmt: skip
    with pytest.raises(MedvitError, match=r"coarse.safetensors: model grid .* differs"):
        Segmenter([pair[0], coarse], EXACT)


def test_common_rules_keep_what_every_member_chose() -> None:
    largest = {"id": 1, "name": "liver", "rule": "largest"}
    small = {"id": 2, "name": "spleen", "rule": "min_ml", "min_ml": 3.0}
    assert common_rules([[largest, small]]) == [largest, small]
    assert common_rules([[largest, small], [small], None]) == []
    assert common_rules([[largest, small], [small, largest]]) == [largest, small]


def test_cli_ensemble_on_the_real_ct(tmp_path, pair, shared_data) -> None:
    """Two checkpoints on the shared real CT: the mask is the arg-max of the averaged probabilities."""
    ct = shared_data / "ct" / "example_ct_sm.nii.gz"
    out = tmp_path / "out"
    args = ["segment", str(ct), "-m", str(pair[0]), "-m", str(pair[1]), "-o", str(out), "-q",
            "--precision", "fp32", "--postprocess", "none"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    written = np.asarray(nib.load(str(out / "example_ct_sm_seg.nii.gz")).dataobj)
    scan = read_scan(ct)
    mean = sum(Segmenter(c, EXACT).predict_proba(scan) for c in pair) / 2
    expected = mean.argmax(0).numpy()
    assert written.shape == scan.shape
    assert (written == expected).mean() > 0.9999  # fp32 sums in another order may flip an exact tie
    volumes = json.loads((out / "example_ct_sm_volumes.json").read_text())
    assert set(volumes) == {"liver", "spleen", "kidney_right", "kidney_left"}
