"""Atomic writes: the target appears whole or not at all, and no temporary file stays."""

from __future__ import annotations

import json

import pytest

from medvit.pipelines.atomic import remove_temporaries, temporary_name, write_atomic, write_json


def test_temporary_name_is_hidden_beside_the_target_and_keeps_its_suffix(tmp_path) -> None:
    tmp = temporary_name(tmp_path / "ct_seg.nii.gz")
    assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-") and tmp.name.endswith("-ct_seg.nii.gz")
    assert temporary_name(tmp_path / "a") != temporary_name(tmp_path / "a")


def test_write_json_creates_folders_and_replaces_the_old_file(tmp_path) -> None:
    target = tmp_path / "sub" / "v.json"
    write_json(target, {"liver": 1.5})
    write_json(target, {"liver": 2.5})
    assert json.loads(target.read_text()) == {"liver": 2.5}
    assert [p.name for p in target.parent.iterdir()] == ["v.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # also what SIGTERM unwinds as in the CLI

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


def test_remove_temporaries_takes_only_those_of_the_target(tmp_path) -> None:
    target = tmp_path / "ct[1]_seg.nii.gz"  # glob characters in the name are taken literally
    left = [temporary_name(target), temporary_name(target)]
    other = temporary_name(tmp_path / "ct1_seg.nii.gz")
    for path in (*left, other, target):
        path.write_bytes(b"x")
    remove_temporaries(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, target.name])
