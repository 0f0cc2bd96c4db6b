"""Connected-component post-processing: rules, the validation choice, the card, `medvit segment`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from scipy import ndimage

from medvit.cli.main import main
from medvit.pipelines.checkpoint import CARD_KEY, ModelCard, load_checkpoint, read_card, save_checkpoint
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.postprocess import (
    ValidationCase,
    apply_postprocessing,
    candidate_rules,
    determine_postprocessing,
)
from medvit.pipelines.segment import SegmentConfig, Segmenter, segment

from helpers import make_tiny_checkpoint

LABELS = {1: {"id": 5, "name": "liver"}, 2: {"id": 2, "name": "kidney_right"}, 3: {"id": 7, "name": "pancreas"}}


def _components(mask: np.ndarray) -> int:
    return ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]


def test_rules_remove_only_what_they_say() -> None:
    mask = np.zeros((30, 30, 10), np.uint8)
    mask[2:12, 2:12, 2:8] = 5  # 600 voxels
    mask[20:22, 20:22, 2:4] = 5  # 8 voxels, far away
    mask[20:26, 2:8, 2:8] = 2  # another label, 216 voxels
    spacing = (2.0, 2.0, 2.0)  # 0.008 ml a voxel
    largest = apply_postprocessing(mask.copy(), [{"id": 5, "name": "liver", "rule": "largest"}], spacing)
    assert (largest == 5).sum() == 600 and (largest == 2).sum() == 216 and (largest == 0).sum() == mask.size - 816
    small = apply_postprocessing(mask.copy(), [{"id": 5, "rule": "min_ml", "min_ml": 0.1}], spacing)
    np.testing.assert_array_equal(small, largest)  # 0.064 ml removed, 4.8 ml kept
    kept = apply_postprocessing(mask.copy(), [{"id": 5, "rule": "min_ml", "min_ml": 0.05}], spacing)
    np.testing.assert_array_equal(kept, mask)
    np.testing.assert_array_equal(apply_postprocessing(mask.copy(), None, spacing), mask)
    with pytest.raises(MedvitError, match="malformed"):
        apply_postprocessing(mask.copy(), [{"id": 5, "rule": "min_ml"}], spacing)


def _case(spurious: int = 0, split: bool = False) -> ValidationCase:
    """Class 1 (liver): a 12x12x8 block (and with `split` a real 8x8x8 second piece); class 2
    (kidney_right): 4x6x4. The prediction adds a slightly too large liver and, with
    `spurious`, a false liver piece of spurious^3 voxels and a false kidney piece."""
    ref = np.zeros((40, 40, 12), np.uint8)
    ref[2:14, 2:14, 2:10] = 1
    if split:
        ref[25:33, 25:33, 2:10] = 1
    ref[20:24, 4:10, 3:7] = 2
    pred = ref.copy()
    pred[14:16, 2:14, 2:10] = 1
    if spurious:
        pred[36 - spurious:36, 2:2 + spurious, 1:1 + spurious] = 1
        pred[30:32, 12:14, 1:3] = 2
    return ValidationCase(pred, ref, 0.027)


def test_a_rule_that_helps_is_chosen() -> None:
    rules = determine_postprocessing([_case(spurious=3), _case()], LABELS)
    by_name = {r["name"]: r for r in rules}
    # a 27-voxel false piece: dropping pieces under 5 % of the smallest real one (1152
    # voxels) removes it as well as keeping only the largest would: the milder rule is kept
    assert by_name["liver"] == {"id": 5, "name": "liver", "rule": "min_ml", "min_ml": round(0.05 * 1152 * 0.027, 3)}
    assert by_name["kidney_right"]["rule"] == "min_ml" and by_name["kidney_right"]["id"] == 2
    assert "pancreas" not in by_name  # absent everywhere: nothing shows a rule helps
    # a 729-voxel false piece is above both volume thresholds (58, 115 voxels): only "largest" removes it
    rules = {r["name"]: r for r in determine_postprocessing([_case(spurious=9), _case()], LABELS)}
    assert rules["liver"] == {"id": 5, "name": "liver", "rule": "largest"}


def test_volume_thresholds_stay_far_below_the_organ_and_capped() -> None:
    # one validation case whose liver is one 1152-voxel piece of 3 mm voxels (31 ml): 1.6 and 3.1 ml
    rules = candidate_rules([_case()], 1)
    assert rules == [{"rule": "min_ml", "min_ml": round(0.05 * 1152 * 0.027, 3)},
                     {"rule": "min_ml", "min_ml": round(0.10 * 1152 * 0.027, 3)}, {"rule": "largest"}]
    # a 1 l organ: 50 and 100 ml would delete a scan's 40 ml part of it; both are capped at 25 ml
    big = [ValidationCase(_case().pred, _case().ref, 1.0)]
    assert candidate_rules(big, 1) == [{"rule": "min_ml", "min_ml": 25.0}, {"rule": "largest"}]


def test_a_rule_that_hurts_or_does_not_help_is_not_chosen() -> None:
    cases = [_case(split=True)]
    # keeping only the largest piece would drop the real second piece of class 1 (Dice
    # falls); the volume rules change nothing (Dice equal): no rule is kept for it
    rules = {r["name"]: r for r in determine_postprocessing(cases, LABELS)}
    assert "liver" not in rules
    only_split = [_case(split=True), _case(split=True)]
    assert all(r["name"] != "liver" for r in determine_postprocessing(only_split, LABELS))
    # the rule "largest" alone would have changed the mask: it is not applied because it was not chosen
    mask = np.where(cases[0].pred == 1, 5, 0).astype(np.uint8)
    assert _components(apply_postprocessing(mask.copy(), [{"id": 5, "rule": "largest"}], (3.0,) * 3) == 5) == 1
    assert _components(apply_postprocessing(mask.copy(), list(rules.values()), (3.0,) * 3) == 5) == 2


@pytest.mark.parametrize("bad", [[{"id": 1, "rule": "biggest"}], [{"id": "1", "rule": "largest"}],
                                 [{"id": 1, "rule": "min_ml"}], {"id": 1}])
def test_a_card_with_malformed_rules_is_refused(tmp_path, tiny_checkpoint, bad) -> None:
    d = json.loads(read_card(tiny_checkpoint).to_json())
    d["postprocessing"] = bad
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={CARD_KEY: json.dumps(d)})
    with pytest.raises(MedvitError, match="postprocessing must be"):
        read_card(path)


def test_old_checkpoint_card_without_rules_loads(tmp_path, tiny_checkpoint) -> None:
    card = read_card(tiny_checkpoint)
    d = json.loads(card.to_json())
    del d["postprocessing"]
    assert ModelCard.from_json(json.dumps(d)).postprocessing is None
    old = tmp_path / "old.safetensors"
    save_file({"w": torch.zeros(1)}, str(old), metadata={CARD_KEY: json.dumps(d)})
    assert read_card(old).postprocessing is None and read_card(old).model_name == "unetr_tiny"


@pytest.fixture(scope="module")
def ruled_checkpoint(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("pp") / "plain.safetensors")
    model, card = load_checkpoint(path)
    card.postprocessing = [{"id": 1, "name": "liver", "rule": "largest"}]
    return save_checkpoint(model, card, path.with_name("ruled.safetensors"))


def test_segment_applies_the_cards_rule_and_none_disables_it(tmp_path, ruled_checkpoint, phantom_scan) -> None:
    img, _ = phantom_scan
    auto = segment([img], ruled_checkpoint, tmp_path / "auto", SegmentConfig(progress=False, precision="fp32"))[0]
    raw = segment([img], ruled_checkpoint, tmp_path / "none",
                  SegmentConfig(progress=False, precision="fp32", postprocess="none"))[0]
    a = np.asarray(nib.load(auto.mask).dataobj)
    r = np.asarray(nib.load(raw.mask).dataobj)
    assert _components(r == 1) > 1  # random weights: a scattered liver
    assert _components(a == 1) == 1
    changed = a != r
    assert changed.any() and np.all(r[changed] == 1) and np.all(a[changed] == 0)
    assert auto.volumes_ml["liver"] < raw.volumes_ml["liver"]
    with pytest.raises(MedvitError, match="--postprocess"):
        Segmenter(ruled_checkpoint, SegmentConfig(postprocess="largest"))


def test_segment_cli_postprocess_option(tmp_path, ruled_checkpoint, phantom_scan) -> None:
    img, _ = phantom_scan
    masks = {}
    for mode in ("auto", "none"):
        res = CliRunner().invoke(main, ["segment", str(img), "-m", str(ruled_checkpoint), "-o", str(tmp_path / mode),
                                        "--postprocess", mode, "--precision", "fp32", "-q"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        masks[mode] = np.asarray(nib.load(tmp_path / mode / "phantom_seg.nii.gz").dataobj)
    assert _components(masks["auto"] == 1) == 1 < _components(masks["none"] == 1)
    res = CliRunner().invoke(main, ["segment", str(img), "-m", str(ruled_checkpoint), "-o", str(tmp_path / "x"),
                                    "--postprocess", "some"])
    assert res.exit_code != 0 and "--postprocess" in res.output


def test_card_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path, tiny_checkpoint) -> None:
    """A longer card (the rules) can make the safetensors header length's first byte 0x80,
    the first byte of a pickle."""
    model, card = load_checkpoint(tiny_checkpoint)
    path = tmp_path / "c.safetensors"
    card.extra = {"pad": ""}
    save_checkpoint(model, card, path)
    delta = (0x80 - path.read_bytes()[0]) % 256  # headers are padded to 8 bytes: try around it
    for pad in range(max(0, delta - 8), delta + 9):
        card.extra = {"pad": "x" * pad}
        save_checkpoint(model, card, path)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_card(path).extra["pad"] == "x" * pad
    pickled = tmp_path / "p.pt"
    torch.save({"w": torch.zeros(1)}, pickled, _use_new_zipfile_serialization=False)
    with pytest.raises(MedvitError, match="pickle"):
        read_card(pickled)
