"""Classification metrics against hand computations; the predictions CSV and matching it to the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medvit.pipelines.classify_metrics import (
    classification_metrics,
    evaluate_predictions,
    match_truth,
    read_predictions_csv,
    read_truth_csv,
    write_predictions_csv,
)
from medvit.pipelines.errors import MedvitError

BINARY = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
# Three classes, two examples each; the arg-max is right on rows 0, 2 and 4.
THREE = np.array(
    [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.7, 0.2], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4]]
)
THREE_LABELS = np.array([0, 0, 1, 1, 2, 2])


def test_perfect_and_reversed_binary() -> None:
    perfect = classification_metrics(BINARY, [0, 1, 0, 1], ["neg", "pos"])
    assert perfect["accuracy"] == 1.0 and perfect["balanced_accuracy"] == 1.0
    assert perfect["auroc_macro"] == 1.0 and perfect["per_class"]["pos"]["auroc"] == 1.0
    assert perfect["confusion_matrix"] == [[2, 0], [0, 2]]
    reversed_ = classification_metrics(BINARY, [1, 0, 1, 0], ["neg", "pos"])
    assert reversed_["accuracy"] == 0.0 and reversed_["auroc_macro"] == 0.0
    assert reversed_["confusion_matrix"] == [[0, 2], [2, 0]]


def test_three_classes_by_hand() -> None:
    m = classification_metrics(THREE, THREE_LABELS, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(0.5) and m["balanced_accuracy"] == pytest.approx(0.5)
    # one-vs-rest: positives beaten over the 2 x 4 (positive, negative) pairs, ties counting half
    expected = {"a": 5.5 / 8, "b": 6.5 / 8, "c": 7.5 / 8}
    for name, auc in expected.items():
        assert m["per_class"][name]["auroc"] == pytest.approx(auc)
        assert m["per_class"][name]["precision"] == pytest.approx(0.5)
        assert m["per_class"][name]["recall"] == pytest.approx(0.5)
        assert m["per_class"][name]["support"] == 2
    assert m["auroc_macro"] == pytest.approx(sum(expected.values()) / 3)
    assert m["n"] == 6 and m["classes"] == ["a", "b", "c"]


def test_balanced_accuracy_differs_on_imbalanced_data() -> None:
    probs = np.tile([0.8, 0.2], (10, 1))  # always "common"
    labels = np.array([0] * 8 + [1] * 2)
    m = classification_metrics(probs, labels, ["common", "rare"])
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["rare"]["precision"] is None  # never predicted
    assert m["per_class"]["rare"]["recall"] == 0.0


def test_a_class_absent_from_the_labels_has_no_auroc() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    m = classification_metrics(probs, [0, 1, 1], ["a", "b", "c"])
    assert m["per_class"]["c"]["auroc"] is None and m["per_class"]["c"]["recall"] is None
    assert m["per_class"]["a"]["auroc"] == 1.0 and m["per_class"]["b"]["auroc"] == 1.0
    assert m["auroc_macro"] == 1.0  # the mean of a and b only
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)  # c is not present: left out


@pytest.mark.parametrize(
    "probs, labels",
    [(np.zeros((2, 3)), [0, 1]), (np.zeros((2, 2)), [0]), (np.zeros((2, 2)), [0, 2]), (np.zeros((0, 2)), [])],
)
def test_bad_shapes_and_labels_are_refused(probs, labels) -> None:
    with pytest.raises(ValueError):
        classification_metrics(probs, np.asarray(labels, dtype=np.int64), ["a", "b"])


def test_predictions_csv_round_trip_is_exact(tmp_path: Path) -> None:
    probs = np.array([[1 / 3, 2 / 3], [0.9, 0.1]])
    out = write_predictions_csv(tmp_path / "out" / "pred.csv", ["c1", "c2"], probs, ["no", "yes"], paths=["x.png", "y.png"])
    assert out.read_text().splitlines()[0] == "id,path,predicted,p_no,p_yes"
    assert out.read_text().splitlines()[1].startswith("c1,x.png,yes,")
    assert [p.name for p in out.parent.iterdir()] == ["pred.csv"]  # nothing temporary left
    back = read_predictions_csv(out)
    assert back.ids == ["c1", "c2"] and back.classes == ["no", "yes"] and back.paths == ["x.png", "y.png"]
    assert np.array_equal(back.probs, probs)
    bare = write_predictions_csv(tmp_path / "bare.csv", ["c1"], probs[:1], ["no", "yes"])
    assert bare.read_text().splitlines()[0] == "id,predicted,p_no,p_yes"
    assert read_predictions_csv(bare).paths is None


def test_evaluate_matches_by_id_in_any_order(tmp_path: Path) -> None:
    ids = [f"case{i}" for i in range(6)]
    pred = write_predictions_csv(tmp_path / "pred.csv", ids, THREE, ["a", "b", "c"])
    truth = tmp_path / "truth.csv"
    names = ["a", "b", "c"]
    rows = [f"{ids[i]},{names[THREE_LABELS[i]]}" for i in (5, 3, 1, 0, 2, 4)]
    truth.write_text("path,label\n" + "\n".join(rows) + "\n")
    m = evaluate_predictions(pred, truth)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert m["auroc_macro"] == pytest.approx((5.5 + 6.5 + 7.5) / 24)


def _error(call) -> str:
    with pytest.raises(MedvitError) as exc:
        call()
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_matching_errors_name_the_ids_and_files(tmp_path: Path) -> None:
    pred = write_predictions_csv(tmp_path / "pred.csv", ["a1", "a2", "a3"], np.eye(3)[:, :2], ["x", "y"])
    preds = read_predictions_csv(pred)
    assert "no prediction for 1 id(s) of truth.csv: a4" in _error(
        lambda: match_truth(preds, {"a1": "x", "a2": "y", "a3": "x", "a4": "y"}, pred, "truth.csv")
    )
    text = _error(lambda: match_truth(preds, {"a1": "x"}, pred, "truth.csv"))
    assert "pred.csv: 2 id(s) not in truth.csv: a2, a3" in text
    assert "label(s) not among the predicted classes (x, y): z" in _error(
        lambda: match_truth(preds, {"a1": "x", "a2": "y", "a3": "z"}, pred, "truth.csv")
    )


@pytest.mark.parametrize(
    "reader, text, fragment",
    [
        (read_predictions_csv, "id,score\na,1\n", "not a predictions CSV"),
        (read_predictions_csv, "id,p_x\na,0.5\na,0.2\n", "duplicate ids: a"),
        (read_predictions_csv, "id,p_x\na,0.5\nb,high\n", "line 3: a probability is not a number"),
        (read_predictions_csv, "id,p_x\na,nan\n", "line 2: a probability is not finite"),
        (read_predictions_csv, "id,p_x\n", "no rows"),
        (read_truth_csv, "id,class\na,x\n", "not a ground-truth CSV"),
        (read_truth_csv, "id,label\na,x\nb,\n", "empty label on line(s) 3"),
    ],
)
def test_csv_errors_are_one_line_naming_the_file(tmp_path: Path, reader, text: str, fragment: str) -> None:
    path = tmp_path / "table.csv"
    path.write_text(text)
    message = _error(lambda: reader(path))
    assert message.startswith(str(path)) and fragment in message
    assert "no such file" in _error(lambda: reader(tmp_path / "absent.csv"))
