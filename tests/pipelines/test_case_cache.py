"""Training's cases on disk: filled once, keyed by what they depend on, read a crop at a time;
batches that do not depend on the number of worker processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from medvit.pipelines.case_cache import CaseCache, read_box
from medvit.pipelines.crop_sampling import SampleCropsd
from medvit.pipelines.datasets import load_dataset
from medvit.pipelines.errors import DatasetError
from medvit.pipelines.phantom import write_phantom_dataset
from medvit.pipelines.preprocessing import Preprocessing
from medvit.pipelines.train_data import CropDataset, EpochLoader
from medvit.pipelines.transforms import preprocess_transforms

PREP = Preprocessing(spacing=(4.0, 4.0, 6.0), intensity="ct")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 3, seed=5, shape=(40, 32, 16), spacing=(3.0, 3.0, 6.0))


class CountingLoad:
    def __init__(self, prep: Preprocessing = PREP) -> None:
        self.tf = preprocess_transforms(prep, ("image", "label"), label_ids=[1, 2, 3, 4])
        self.calls = 0

    def __call__(self, item):
        self.calls += 1
        return self.tf(item)


def _cache(root: Path, load=None, prep: Preprocessing = PREP) -> CaseCache:
    return CaseCache(root, load or CountingLoad(prep), {"preprocessing": prep.to_dict()}, num_classes=5)


def test_a_case_is_preprocessed_once_and_read_back_exactly(dataset, tmp_path) -> None:
    case = load_dataset(dataset).cases[0]
    load = CountingLoad()
    cache = _cache(tmp_path, load)
    first = cache.get(case)
    again = _cache(tmp_path, load).get(case)  # another run (or rank) with the same preprocessing
    assert load.calls == 1 and again.folder == first.folder
    want = load.tf({"image": str(case.image), "label": str(case.label)})
    image, label = first.arrays()
    assert isinstance(image, np.memmap)
    np.testing.assert_array_equal(image, np.asarray(want["image"]))
    np.testing.assert_array_equal(label, np.asarray(want["label"])[0].astype(np.uint8))
    np.testing.assert_allclose(first.affine, np.asarray(want["image"].affine))
    assert first.voxel_ml == pytest.approx(4 * 4 * 6 / 1000)
    flat = label.reshape(-1)
    for k in range(5):
        assert (flat[first.centres(f"class{k}")] == k).all()
    assert first.centres("class1").size == min((flat == 1).sum(), 50_000)
    assert (flat[first.centres("fg")] > 0).all() and (flat[first.centres("bg")] == 0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.folder.name]  # no temporaries left


def test_the_key_follows_the_source_and_the_preprocessing(dataset, tmp_path) -> None:
    case = load_dataset(dataset).cases[1]
    base = _cache(tmp_path).folder(case)
    other_prep = Preprocessing(spacing=(3.0, 3.0, 6.0), intensity="ct")
    assert _cache(tmp_path, prep=other_prep).folder(case) != base
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "img.nii.gz").write_bytes(case.image.read_bytes())
    moved = type(case)(case.name, copy / "img.nii.gz", case.label)
    assert _cache(tmp_path).folder(moved) != base
    st = case.label.stat()
    try:
        os.utime(case.label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the label edited
        assert _cache(tmp_path).folder(case) != base
    finally:
        os.utime(case.label, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_failed_fill_leaves_nothing(dataset, tmp_path) -> None:
    case = load_dataset(dataset).cases[0]

    def broken(item):
        raise DatasetError.at(item["image"], "cannot be read")

    with pytest.raises(DatasetError, match="cannot be read"):
        _cache(tmp_path, broken).get(case)
    assert not any(tmp_path.iterdir())


def test_a_killed_fills_leftover_is_removed_and_a_running_fill_is_not(dataset, tmp_path) -> None:
    case = load_dataset(dataset).cases[2]
    cache = _cache(tmp_path)
    key = cache.key(case)
    killed, running, other = tmp_path / f".{key}.dead", tmp_path / f".{key}.live", tmp_path / ".0123.dead"
    for leftover in (killed, running, other):
        leftover.mkdir()
        (leftover / "image.npy").write_bytes(b"partial")
    hours_ago = time.time() - 2 * 3600
    os.utime(killed, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    cache.get(case)
    # this case's old leftover is gone; a young one may be another process's fill; another
    # case's leftover waits for that case's next fill
    assert not killed.exists() and running.exists() and other.exists()


def test_read_box_pads_with_zeros() -> None:
    a = np.arange(1, 1 + 2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    box = read_box(a, (-1, 3, 1), (3, 4, 2))
    assert box.shape == (2, 3, 4, 2)
    np.testing.assert_array_equal(box[:, 1:, :2], a[:, 0:2, 3:5, 1:3])
    assert not box[:, 0].any() and not box[:, :, 2:].any()
    assert not read_box(a, (10, 0, 0), (2, 2, 2)).any()


def _indexed_case(tmp_path: Path, shape=(30, 20, 12)):
    """A cached case whose image holds 1 + each voxel's flat index, so a crop shows where it came from."""
    image = (1 + np.arange(np.prod(shape), dtype=np.float32)).reshape(1, *shape)
    label = np.zeros(shape, np.uint8)
    label[20:26, 3:8, 2:6] = 1
    label[2:4, 15:18, 9:11] = 2

    class Meta(np.ndarray):
        affine = np.diag([2.0, 2.0, 3.0, 1.0])

    def load(item):
        return {"image": image.view(Meta), "label": label[None].astype(np.float32)}

    case = type("Case", (), {"name": "idx", "image": tmp_path / "i", "label": tmp_path / "l"})()
    (tmp_path / "i").write_bytes(b"i")
    (tmp_path / "l").write_bytes(b"l")
    return CaseCache(tmp_path / "cache", load, {}, num_classes=3).get(case), image, label


@pytest.mark.parametrize("size", [(8, 8, 8), (16, 24, 16)])  # the second needs padding
def test_crops_are_the_volume_at_their_box(tmp_path, size) -> None:
    cached, image, label = _indexed_case(tmp_path)
    sampler = SampleCropsd(size, 3, num_samples=40, ratios=[0.2, 0.4, 0.4])
    sampler.set_random_state(seed=0)
    seen = set()
    for crop in sampler({"case": cached}):
        img, lab = crop["image"].numpy()[0], crop["label"].numpy()[0]
        assert img.shape == lab.shape == size
        inside = img > 0
        idx = np.unravel_index(img[inside].astype(np.int64) - 1, label.shape)
        np.testing.assert_array_equal(lab[inside], label[idx])
        assert not lab[~inside].any()
        # the box is contiguous: the voxel one step along each axis is the next index
        first = np.argwhere(inside)[0]
        origin = np.array([i[0] for i in idx]) - first
        seen.add(tuple(origin))
        grid = np.indices(size).reshape(3, -1).T + origin
        ok = ((grid >= 0) & (grid < label.shape)).all(1)
        np.testing.assert_array_equal(inside.reshape(-1), ok)
        np.testing.assert_array_equal(img.reshape(-1)[ok], 1 + np.ravel_multi_index(tuple(grid[ok].T), label.shape))
    labels = [set(np.unique(c["label"].numpy())) for c in sampler({"case": cached})]
    assert sum(2.0 in s for s in labels) >= 10  # the 24-voxel class gets its share of 40 crops
    assert len(seen) > (5 if size == (8, 8, 8) else 2)  # padded along y and z, only x varies


def _loader(dataset: Path, root: Path, workers: int) -> EpochLoader:
    cases = load_dataset(dataset).cases
    tf = Compose([SampleCropsd((16, 16, 8), 5, num_samples=2, ratios=[0.2] * 5)])
    return EpochLoader(CropDataset(cases, _cache(root), tf, seed=3, rank=0), batch_size=2, workers=workers)


def _epochs(loader: EpochLoader, start: int, count: int) -> list[torch.Tensor]:
    out = []
    for epoch in range(start, start + count):
        loader.set_epoch(epoch)
        out += [torch.as_tensor(batch["image"]).clone() for batch in loader]
    loader.close()
    return out


def test_batches_do_not_depend_on_workers_or_on_resuming(dataset, tmp_path) -> None:
    serial = _epochs(_loader(dataset, tmp_path, 0), 0, 3)
    assert len(serial) == 6 and [b.shape[0] for b in serial] == [4, 2] * 3  # 3 cases, 2 crops each
    assert not torch.equal(serial[0][:2], serial[2][:2])  # epochs draw afresh
    workers = _epochs(_loader(dataset, tmp_path, 2), 0, 3)
    resumed = _epochs(_loader(dataset, tmp_path, 1), 1, 2)
    for a, b in zip(serial, workers):
        assert torch.equal(a, b)
    for a, b in zip(serial[2:], resumed):
        assert torch.equal(a, b)


def test_a_worker_error_is_one_line(dataset, tmp_path) -> None:
    cases = load_dataset(dataset).cases

    def broken(item):
        raise DatasetError.at(item["image"], "voxel data is truncated")

    cache = CaseCache(tmp_path, broken, {}, num_classes=5)
    tf = Compose([SampleCropsd((16, 16, 8), 5, num_samples=1, ratios=[0.2] * 5)])
    loader = EpochLoader(CropDataset(cases, cache, tf, seed=0, rank=0), batch_size=1, workers=1)
    loader.set_epoch(0)
    with pytest.raises(DatasetError) as err:
        next(iter(loader))
    assert "\n" not in str(err.value) and "voxel data is truncated" in str(err.value)
    assert str(cases[0].image.parent) in str(err.value)
