"""Property-based fuzzing of what medvit reads from users: NIfTI headers and safetensors checkpoints.

Every generated input must end in a result on the right grid (shape, affine and voxels
equal to what the header declares) or in a `MedvitError`; any other exception fails.
"""

from __future__ import annotations

import gzip
import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from helpers import make_tiny_checkpoint
from medvit.pipelines.checkpoint import CARD_KEY, load_checkpoint, read_card
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.io import read_scan

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ODD_FLOATS = [0.0, -1.0, 1e-9, 1e12, 1e38, float("nan"), float("inf"), -float("inf")]
VALID_DATATYPES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280]
# Field -> odd values a damaged or hostile header may hold there.
DAMAGES: dict[str, list[Any]] = {
    "dim0": [0, -1, 1, 2, 8, 4],
    "dim_axis": [0, -2, 32767, 10**6],
    "datatype": [0, 1, 32, 128, 1536, 1792, 2048, 2304, 9999],
    "pixdim": ODD_FLOATS,
    "qfac": [0.0, -1.0, 0.5, float("nan")],
    "qform_code": [0, 6, -1, 255],
    "sform_code": [0, 6, 255],
    "both_codes_zero": [True],
    "quatern": [0.9, -1.0, 1.0000001, float("nan"), float("inf")],
    "qoffset": [float("nan"), float("inf"), 1e30],
    "srow": ODD_FLOATS,
    "srow_zero_row": [0, 1, 2],
    "scl_slope": [0.0, float("nan"), float("inf"), -float("inf"), 1e38, -0.5],
    "scl_inter": [float("nan"), float("inf"), 1e38],
    "xyzt_units": [1, 3, 4, 7],
    "intent_code": [1004, 1007, 2003, 3001, 2, 1002],
    "vox_offset": [0, 100, 351, 10**9, float("nan")],
    "payload": ["short", "none", "long"],
    "magic": [b"ni1", b"", b"n+2", b"xyz"],
}


@st.composite
def nifti_headers(draw: st.DrawFn) -> dict[str, Any]:
    """A valid header (3D, or 3D with trailing singletons), then up to three damages."""
    nifti2 = draw(st.booleans())
    shape = [draw(st.integers(1, 5)) for _ in range(3)] + [1] * draw(st.integers(0, 2))
    size = st.floats(0.25, 5.0, width=32)
    spec: dict[str, Any] = {
        "nifti2": nifti2,
        "dim": [len(shape), *shape, *[1] * (7 - len(shape))],
        "datatype": draw(st.sampled_from(VALID_DATATYPES)),
        "pixdim": [draw(st.sampled_from([1.0, -1.0])), *[draw(size) for _ in range(3)], 1.0, 1.0, 1.0, 1.0],
        "qform_code": draw(st.sampled_from([0, 1, 2])),
        "sform_code": draw(st.sampled_from([1, 2, 4])),
        "quatern": [draw(st.floats(-0.5625, 0.5625, width=32)) for _ in range(3)],
        "qoffset": [draw(st.floats(-300, 300, width=32)) for _ in range(3)],
        "srow": [[draw(st.floats(-3, 3, width=32)) for _ in range(3)] + [draw(st.floats(-300, 300, width=32))]
                 for _ in range(3)],
        "scl_slope": draw(st.sampled_from([0.0, 1.0, 2.0])),
        "scl_inter": draw(st.sampled_from([0.0, -1024.0])),
        "xyzt_units": draw(st.sampled_from([0, 2, 10])),
        "intent_code": 0,
        "vox_delta": draw(st.sampled_from([0, 16])),  # past the header's end
        "vox_offset": None,
        "payload": "exact",
        "magic": None,
        "compress": draw(st.booleans()),
    }  # fmt: skip
    if spec["sform_code"] and draw(st.booleans()):
        spec["qform_code"] = draw(st.sampled_from([1, 2]))
    for damage in draw(st.lists(st.sampled_from(sorted(DAMAGES)), max_size=3)):
        value = draw(st.sampled_from(DAMAGES[damage]))
        if damage == "dim0":
            spec["dim"][0] = value
        elif damage == "dim_axis":
            spec["dim"][draw(st.integers(1, 3))] = min(value, 32767) if not nifti2 else value
        elif damage == "pixdim":
            spec["pixdim"][draw(st.integers(1, 3))] = value
        elif damage == "qfac":
            spec["pixdim"][0] = value
        elif damage == "both_codes_zero":
            spec["qform_code"] = spec["sform_code"] = 0
        elif damage in ("quatern", "qoffset"):
            spec[damage][draw(st.integers(0, 2))] = value
            spec["qform_code"] = max(spec["qform_code"], 1)
        elif damage == "srow":
            spec["srow"][draw(st.integers(0, 2))][draw(st.integers(0, 3))] = value
        elif damage == "srow_zero_row":
            spec["srow"][value] = [0.0, 0.0, 0.0, 0.0]
        elif damage == "vox_offset":
            spec["vox_offset"] = value if not (nifti2 and value != value) else -10**6
        else:
            spec[damage] = value
    return spec


def _write_nifti(path: Path, spec: dict[str, Any]) -> tuple[nib.Nifti1Header, bytes]:
    klass = nib.Nifti2Header if spec["nifti2"] else nib.Nifti1Header
    header = klass(check=False)
    for key in ("dim", "pixdim", "qform_code", "sform_code", "scl_slope", "scl_inter", "xyzt_units", "intent_code"):
        header[key] = spec[key]
    header["datatype"] = spec["datatype"]
    for name, value in zip(("quatern_b", "quatern_c", "quatern_d"), spec["quatern"]):
        header[name] = value
    for name, value in zip(("qoffset_x", "qoffset_y", "qoffset_z"), spec["qoffset"]):
        header[name] = value
    for name, row in zip(("srow_x", "srow_y", "srow_z"), spec["srow"]):
        header[name] = row
    offset = spec["vox_offset"]
    header["vox_offset"] = header.single_vox_offset + spec["vox_delta"] if offset is None else offset
    if spec["magic"] is not None:
        header["magic"] = spec["magic"]
    ndim = int(spec["dim"][0])
    declared = int(np.prod(spec["dim"][1 : ndim + 1])) if 1 <= ndim <= 7 else 0
    itemsize = 8 + 16  # the widest voxel type, and room for a 16-byte later offset
    if 0 <= declared <= 4096:
        payload = np.random.default_rng(declared).integers(0, 120, size=max(declared, 0) * itemsize, dtype=np.uint8)
        data = payload.tobytes()
    else:
        data = b"\x01" * 64
    data = {"exact": data, "short": data[: len(data) // 2], "long": data + b"\0" * 64, "none": b""}[spec["payload"]]
    blob = header.binaryblock + b"\0" * 4 + data
    path.write_bytes(gzip.compress(blob) if spec["compress"] else blob)
    return header, blob


def _expected(header: nib.Nifti1Header, blob: bytes) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """What the header declares: the 3D shape, the affine nibabel's rules give, the voxels."""
    ndim = int(header["dim"][0])
    full = tuple(int(d) for d in header["dim"][1 : ndim + 1])
    affine = header.get_best_affine()
    dtype = header.get_data_dtype()
    count = int(np.prod(full))
    start = int(header["vox_offset"])
    raw = np.frombuffer(blob[start : start + count * dtype.itemsize], dtype=dtype).reshape(full, order="F")
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    voxels = raw.astype(raw.dtype.newbyteorder("="))
    if np.isfinite(slope) and slope != 0 and (slope, inter) != (1.0, 0.0):
        # scaled in the precision of the header's own scl fields (float32 in NIfTI-1, float64
        # in NIfTI-2) when that is wider, then stored as the reader's float type
        fields = header["scl_slope"].dtype
        work = np.result_type(np.float64 if dtype == np.float64 else np.float32, fields)
        out = np.float64 if dtype == np.float64 else np.float32
        voxels = (raw.astype(work) * work.type(slope) + work.type(inter)).astype(out)
    return full[:3], affine, voxels.reshape(full[:3])


# NIfTI-2 scales in float64: a float32 reference would round the intercept first
_FLOAT64_SCALING = dict(
    nifti2=True, dim=[3, 1, 1, 3, 1, 1, 1, 1], datatype=16, pixdim=[1.0] * 8, qform_code=0, sform_code=1,
    quatern=[0.0, 0.0, 0.0], qoffset=[0.0, 0.0, 0.0], srow=[[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]],
    scl_slope=1.0, scl_inter=1e38, xyzt_units=0, intent_code=0, vox_delta=0, vox_offset=None, payload="exact", magic=None,
    compress=False,
)


@FUZZ
@given(spec=nifti_headers())
@example(spec=_FLOAT64_SCALING)
def test_fuzzed_nifti_header_is_read_on_its_grid_or_refused(spec: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("scan.nii.gz" if spec["compress"] else "scan.nii")
        header, blob = _write_nifti(path, spec)
        try:
            scan = read_scan(path)
        except MedvitError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            return
        shape, affine, voxels = _expected(header, blob)
        assert scan.shape == shape
        np.testing.assert_allclose(scan.affine, affine, rtol=1e-6, atol=1e-6)
        assert np.all(np.isfinite(scan.affine))
        assert abs(np.linalg.det(scan.affine[:3, :3])) > 0
        np.testing.assert_array_equal(scan.array, voxels)


# ---------------------------------------------------------------- safetensors checkpoints


@pytest.fixture(scope="module")
def checkpoint_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], bytes]:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny.safetensors")
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


BAD_VALUES = [None, 0, -3, 1.5, True, "x", "", [], [0], [1, -2, 3], {}, {"a": 1}, [[1]], float("inf")]


@st.composite
def checkpoint_mutations(draw: st.DrawFn) -> list[tuple[str, Any]]:
    # Damage to the file's structure always ends in a refusal; card-level and no damage
    # are drawn more often so that loads that succeed are checked too.
    kinds = st.sampled_from(["card_field", "card_field", "card_drop", "card_text", "metadata", "entry", "length",
                             "header_text", "label", "label", "truncate", "none", "none", "none", "none"])  # fmt: skip
    mutations = []
    for kind in draw(st.lists(kinds, max_size=3)):
        if kind == "card_field":
            field = draw(st.sampled_from(["model_name", "model_args", "labels", "preprocessing", "patch_size",
                                          "slicing", "format_version", "extra", "medvit_version"]))  # fmt: skip
            mutations.append((kind, (field, draw(st.sampled_from(BAD_VALUES)))))
        elif kind == "card_drop":
            mutations.append((kind, draw(st.sampled_from(["model_name", "labels", "patch_size", "preprocessing"]))))
        elif kind == "card_text":
            mutations.append((kind, draw(st.sampled_from(["{", "[]", "null", "1", '{"model_name": 1}', "\x00", "{}"]))))
        elif kind == "metadata":
            mutations.append((kind, draw(st.sampled_from([None, [], {"other": "x"}, {CARD_KEY: 5}]))))
        elif kind == "entry":
            what = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "extra"]))
            value = draw(st.sampled_from(["F8_E4M3", "U16", "C64", "XX", None, [2, -1], [10**12], [0, 10**15],
                                          [5, 2], [-1, 3], [], "F16", [1]]))  # fmt: skip
            mutations.append((kind, (draw(st.integers(0, 1000)), what, value)))
        elif kind == "length":
            mutations.append((kind, draw(st.sampled_from([-8, -1, 1, 10**6, 2**63 - 1]))))
        elif kind == "header_text":
            mutations.append((kind, draw(st.sampled_from(["cut", "list", "garbage"]))))
        elif kind == "label":
            field = draw(st.sampled_from(["id", "name", "key"]))
            mutations.append((kind, (field, draw(st.sampled_from([0, -1, 70000, "x", None, 1.5, 2])))))
        elif kind == "truncate":
            mutations.append((kind, draw(st.integers(1, 4000))))
        else:
            mutations.append((kind, None))
    return mutations


def _mutated_checkpoint(header: dict[str, Any], data: bytes, mutations: list[tuple[str, Any]]) -> bytes:
    header = json.loads(json.dumps(header))
    card = json.loads(header["__metadata__"][CARD_KEY])
    card_text: str | None = None
    length_delta, header_text, cut = 0, None, 0
    for kind, arg in mutations:
        if kind == "card_field":
            card[arg[0]] = arg[1]
        elif kind == "card_drop":
            card.pop(arg, None)
        elif kind == "card_text":
            card_text = arg
        elif kind == "metadata":
            header["__metadata__"] = arg
        elif kind == "entry":
            keys = sorted(k for k in header if k != "__metadata__")
            key = keys[arg[0] % len(keys)]
            if arg[1] == "drop":
                del header[key]
            elif arg[1] == "extra":
                header["extra.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
            else:
                header[key][arg[1]] = arg[2]
        elif kind == "length":
            length_delta = arg
        elif kind == "header_text":
            header_text = arg
        elif kind == "label":
            field, value = arg
            if isinstance(card.get("labels"), dict) and card["labels"]:
                first = sorted(card["labels"])[0]
                if field == "key":
                    card["labels"][str(value)] = card["labels"].pop(first)
                elif isinstance(card["labels"][first], dict):
                    card["labels"][first][field] = value
        elif kind == "truncate":
            cut = arg
    metadata = header.get("__metadata__")
    if isinstance(metadata, dict) and CARD_KEY in metadata and metadata[CARD_KEY] != 5:
        metadata[CARD_KEY] = card_text if card_text is not None else json.dumps(card)
    text = json.dumps(header).encode()
    if header_text == "cut":
        text = text[: len(text) // 2]
    elif header_text == "list":
        text = b"[1, 2, 3]"
    elif header_text == "garbage":
        text = bytes(range(256))[: len(text) % 256]
    length = len(text) + length_delta
    blob = struct.pack("<Q", max(0, min(length, 2**64 - 1))) + text + data
    return blob[: len(blob) - cut] if cut else blob


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(mutations=checkpoint_mutations())
def test_fuzzed_checkpoint_loads_exactly_or_is_refused(
    checkpoint_parts: tuple[dict[str, Any], bytes], mutations: list[tuple[str, Any]]
) -> None:
    header, data = checkpoint_parts
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        path.write_bytes(_mutated_checkpoint(header, data, mutations))
        try:
            card = read_card(path)
            model, loaded_card = load_checkpoint(path)
        except MedvitError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            return
        assert loaded_card == card
        with safe_open(str(path), framework="pt") as f:
            state = model.state_dict()
            assert set(f.keys()) == set(state)
            for key in f.keys():
                torch.testing.assert_close(state[key], f.get_tensor(key).to(state[key].dtype), rtol=0, atol=0)
