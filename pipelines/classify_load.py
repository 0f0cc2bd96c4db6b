"""One classification item as a float32 tensor: read, intensities to 0..1, channels, size.

Layouts: an image is (C, H, W), a volume (C, D, H, W), a clip (C, T, H, W). Arrays are used
as read, without reorientation: a NIfTI/NRRD/MHA/DICOM volume's (i, j, k) voxel axes are
(D, H, W) (`medvit.pipelines.io.read_scan`), a 2D NIfTI's (i, j) are (H, W), a `.npy`
clip is (T, H, W[, C]).

Intensity `auto` (`scale_intensity`):

- Images, frames, `.npy` arrays and video stored as 8-bit integers are divided by 255,
  16-bit unsigned ones by 65535.
- Anything else, and every greyscale DICOM, NIfTI, NRRD and MHA item whatever its voxel
  type (after the DICOM rescale slope and intercept; colour DICOM is 8-bit RGB): CT-like
  (minimum below -500) -> the HU window `DEFAULT_CT_WINDOW` (-175..250) scaled to 0..1 and
  clipped, as the `ct` preset does; otherwise the 0.5 and 99.5 percentiles of the item map
  to 0 and 1, clipped (a constant item becomes 0).

`ct` and `percentile` force one rule. Channels: a single channel is repeated to `in_chans`;
RGB becomes one channel by luminance (0.299 R + 0.587 G + 0.114 B, as Pillow's `L`) when
`in_chans` is 1; an alpha channel is dropped. Size: linear interpolation, antialiased when
shrinking (`torch.nn.functional.interpolate(antialias=True)`, applied axis pair by axis pair
for volumes and clips, which is trilinear with antialiasing). Clips: `frames` indices
`floor((i + 0.5) * T / frames)`, the centres of equal segments (frames repeat when the clip
is shorter). `normalise` is the last step of training and prediction alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medvit.pipelines.errors import MedvitError, short_reason
from medvit.pipelines.intensity import scale_intensity as _window
from medvit.pipelines.preprocessing import DEFAULT_CT_WINDOW

__all__ = [
    "FRAME_SUFFIXES",
    "IMAGE_SUFFIXES",
    "INTENSITY_RULES",
    "VIDEO_FILE_SUFFIXES",
    "frame_files",
    "frame_indices",
    "load_item",
    "normalise",
    "resize",
    "scale_intensity",
    "video_decoder_problem",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FRAME_SUFFIXES = IMAGE_SUFFIXES
VIDEO_FILE_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
INTENSITY_RULES = ("auto", "ct", "percentile")
CT_LIKE_MINIMUM = -500.0
PERCENTILES = (0.5, 99.5)
_LUMA = (0.299, 0.587, 0.114)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """A 0..1 tensor to -1..1: `(x - 0.5) / 0.5` on every channel (training and prediction alike)."""
    return (x - 0.5) / 0.5


def frame_files(folder: Path) -> list[Path]:
    """The frame images of a clip folder, sorted by name; empty when it holds anything else."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if entries and all(p.is_file() and p.name.lower().endswith(FRAME_SUFFIXES) for p in entries):
        return entries
    return []


def frame_indices(total: int, frames: int | None) -> list[int]:
    """`frames` indices spread over `total` frames: the centre of each of `frames` equal segments."""
    if frames is None:
        return list(range(total))
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    return [min(int((i + 0.5) * total / frames), total - 1) for i in range(frames)]


def video_decoder_problem(path: Path) -> str:
    """Why the video file `path` cannot be decoded: medvit has no video decoder among its dependencies."""
    return (
        f"cannot decode {path.suffix} video: no video decoder (torchvision.io has none in this torchvision and "
        "PyAV is not a medvit dependency); save the clip as a folder of frame images or a .npy (T,H,W[,C])"
    )


def scale_intensity(x: torch.Tensor, rule: str = "auto", unit: float | None = None) -> torch.Tensor:
    """Intensities to 0..1 by `rule` (see the module docstring); `unit` is the integer
    full scale (255, 65535) of a plain 8/16-bit item, None for medical and float items."""
    if rule not in INTENSITY_RULES:
        raise ValueError(f"intensity must be one of {INTENSITY_RULES}, got {rule!r}")
    x = x.to(torch.float32)
    if rule == "auto" and unit is not None:
        return x / unit
    if rule == "ct" or (rule == "auto" and x.numel() and float(x.min()) < CT_LIKE_MINIMUM):
        return _window(x, "ct", DEFAULT_CT_WINDOW)
    lo, hi = np.percentile(x.numpy(), PERCENTILES)
    if hi <= lo:
        return torch.zeros_like(x)
    return ((x - float(lo)) / float(hi - lo)).clamp_(0.0, 1.0)


def _unit(array: np.ndarray, medical: bool) -> float | None:
    if medical:
        return None
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(array.dtype)


def _channels_last(array: np.ndarray, spatial: int, path: Path) -> np.ndarray:
    """(*spatial, C) with C of 1 or 3, from `spatial` axes alone or with 1-4 channels last (alpha dropped)."""
    if array.ndim == spatial:
        return array[..., None]
    channels = array.shape[-1] if array.ndim == spatial + 1 else 0
    if channels in (2, 4):
        return array[..., : channels - 1]
    if channels in (1, 3):
        return array
    raise MedvitError.at(path, f"pixels of shape {array.shape}: expected {spatial} axes and 1, 3 or 4 channels")


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
            elif img.mode == "1":
                img = img.convert("L")
            array = np.asarray(img)
    except Exception as exc:
        raise MedvitError.at(path, f"not a readable image ({short_reason(exc)})") from None
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _read_dicom_image(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            raise MedvitError.at(path, f"multi-frame DICOM ({frames} frames); expected one image")
        pixels = ds.pixel_array
        if int(getattr(ds, "SamplesPerPixel", 1)) == 1:
            pixels = apply_modality_lut(pixels, ds).astype(np.float32)
            if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
                pixels = pixels.max() + pixels.min() - pixels
    except MedvitError:
        raise
    except Exception as exc:
        raise MedvitError.at(path, f"not a readable single-image DICOM file ({short_reason(exc)})") from None
    return np.asarray(pixels)


def _read_nifti_image(path: Path) -> np.ndarray:
    from medvit.pipelines.nifti import check_nifti

    info = check_nifti(path, one_volume=False)
    shape = list(info.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    if len(shape) != 2:
        raise MedvitError.at(path, f"NIfTI of shape {tuple(info.shape)} is not a 2D image")
    try:
        array = info.image.get_fdata(dtype=np.float32) if info.scaled else np.asarray(info.image.dataobj)
    except Exception as exc:
        raise MedvitError.at(path, f"damaged or truncated NIfTI file ({short_reason(exc)})") from None
    return array.reshape(shape)


def _read_npy(path: Path, ndims: Sequence[int]) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise MedvitError.at(path, f"not a readable .npy array ({short_reason(exc)})") from None
    if array.ndim not in ndims:
        raise MedvitError.at(path, f"array of shape {array.shape} has {array.ndim} dimensions, expected {ndims}")
    return array


def _image_array(path: Path) -> tuple[np.ndarray, bool]:
    """(H, W, C) pixels and whether the item is a medical file (intensity by value)."""
    lower = path.name.lower()
    if lower.endswith((".dcm", ".dicom", ".ima")):
        pixels = _read_dicom_image(path)  # grey: rescaled values, by value; colour: 8-bit RGB
        return _channels_last(pixels, 2, path), pixels.ndim == 2
    if lower.endswith((".nii", ".nii.gz")):
        return _read_nifti_image(path)[..., None], True
    if lower.endswith(".npy"):
        return _channels_last(np.asarray(_read_npy(path, (2, 3))), 2, path), False
    return _channels_last(_read_pil(path), 2, path), False


def _volume_array(path: Path) -> tuple[np.ndarray, bool]:
    """(D, H, W) voxels and whether the item is a medical file."""
    if path.name.lower().endswith(".npy"):
        return np.asarray(_read_npy(path, (3,))), False
    from medvit.pipelines.io import read_scan

    return read_scan(path).array, True


def _clip_array(path: Path, frames: int | None) -> np.ndarray:
    """(T, H, W, C) of the sampled frames."""
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise MedvitError.at(path, "clip folder holds no frame images (or something besides them)")
        chosen = [_channels_last(_read_pil(files[i]), 2, files[i]) for i in frame_indices(len(files), frames)]
        shapes = {a.shape for a in chosen}
        if len(shapes) > 1:
            raise MedvitError.at(path, f"frames of different sizes or channels: {sorted(shapes)}")
        return np.stack(chosen)
    if path.name.lower().endswith(".npy"):
        array = _read_npy(path, (3, 4))
        return _channels_last(np.asarray(array[frame_indices(array.shape[0], frames)]), 3, path)
    raise MedvitError.at(path, video_decoder_problem(path))


def _writable(array: np.ndarray) -> np.ndarray:
    """`array` C-contiguous and writable (torch refuses read-only arrays), copied only when needed."""
    return np.require(array, requirements=["C", "W"])


def _to_channels(x: torch.Tensor, in_chans: int, path: Path) -> torch.Tensor:
    """(C, ...) with C of 1 or 3 to `in_chans` channels."""
    if x.shape[0] == in_chans:
        return x
    if x.shape[0] == 1:
        return x.expand(in_chans, *x.shape[1:]).contiguous()
    if x.shape[0] == 3 and in_chans == 1:
        luma = torch.tensor(_LUMA, dtype=x.dtype).view(3, *([1] * (x.dim() - 1)))
        return (x * luma).sum(0, keepdim=True)
    raise MedvitError.at(path, f"has {x.shape[0]} channels; cannot make the model's {in_chans}")


def _resize2d(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize the last two axes of (N, C, A, B) bilinearly, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The last axes of `x` to `size`: (H, W) of (C, H, W) or (C, T, H, W), or (D, H, W) of
    (C, D, H, W); linear, antialiased when shrinking.

    Linear interpolation is separable: (H, W) are resized first, then D against an unchanged
    W, so 3D is trilinear (with antialiasing when shrinking, which trilinear lacks in torch).
    """
    size = tuple(int(s) for s in size)
    if len(size) == 2:
        lead = x.shape[:-2]
        return _resize2d(x.reshape(1, -1, *x.shape[-2:]), size).reshape(*lead, *size)
    d, h, w = size
    x = _resize2d(x, (h, w))  # (C, D, H, W): D as channels
    x = _resize2d(x.transpose(1, 2), (d, w)).transpose(1, 2)  # (C, H, D, W): H as channels
    return x.contiguous()


def load_item(
    item_path: str | Path,
    kind: str,
    size: Sequence[int],
    in_chans: int,
    frames: int | None = None,
    intensity: str = "auto",
) -> torch.Tensor:
    """One item as float32 in 0..1 (before `normalise`), at the model's size and channels.

    Args:
        item_path: An image/DICOM/NIfTI/.npy file, a volume file or DICOM series folder, or a
            clip (frame folder, .npy, video file).
        kind: `image` -> (C, H, W); `volume` -> (C, D, H, W); `video` -> (C, T, H, W).
        size: (H, W) for images and clips, (D, H, W) for volumes.
        in_chans: Channels out.
        frames: Frames sampled from a clip; None keeps all.
        intensity: `auto`, `ct` or `percentile` (module docstring).

    Raises:
        MedvitError: The item cannot be read as `kind` (one line naming it).
        ValueError: `kind`, `size` or `intensity` is not valid.
    """
    path = Path(item_path)
    expected = 3 if kind == "volume" else 2
    if kind not in ("image", "volume", "video"):
        raise ValueError(f"kind must be image, volume or video, got {kind!r}")
    if len(size) != expected:
        raise ValueError(f"size for {kind} items has {expected} axes, got {tuple(size)}")
    if not path.exists():
        raise MedvitError.at(path, "no such file or folder")
    if kind == "image":
        array, medical = _image_array(path)
        x = torch.from_numpy(_writable(array)).permute(2, 0, 1)
    elif kind == "volume":
        array, medical = _volume_array(path)
        x = torch.from_numpy(_writable(array))[None]
    else:
        array, medical = _clip_array(path, frames), False
        x = torch.from_numpy(_writable(array)).permute(3, 0, 1, 2)
    x = scale_intensity(x, intensity, _unit(array, medical))
    return resize(_to_channels(x, int(in_chans), path), size).to(torch.float32)
