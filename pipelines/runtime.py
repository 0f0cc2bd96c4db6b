"""Run-time choices: device, precision, and how the C allocator serves inference."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator

import torch

from medvit.pipelines.errors import MedvitError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` without a GPU is a user error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedvitError("--device cuda was asked for, but no CUDA GPU is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise MedvitError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def process_rank() -> tuple[int, int, int]:
    """(world size, rank, local rank) of this process from the launcher's environment
    (torchrun sets WORLD_SIZE, RANK and LOCAL_RANK); (1, 0, 0) outside one.

    Raises:
        MedvitError: The variables are not integers, or the rank is out of range.
    """
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    try:
        world, rank, local = (int(os.environ.get(n, d)) for n, d in zip(names, ("1", "0", "0")))
    except ValueError:
        shown = ", ".join(f"{n}={os.environ.get(n)!r}" for n in names)
        raise MedvitError(f"the launcher's {shown} are not all integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise MedvitError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return world, rank, local


def local_device(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this process's own GPU (LOCAL_RANK) under a launcher."""
    if device.type != "cuda" or device.index is not None:
        return device
    _, _, local = process_rank()
    return torch.device("cuda", local % max(1, torch.cuda.device_count()))


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The autocast dtype for inference: `auto` = fp16 on CUDA, bf16 on CPUs that have it,
    else fp32; `fp32` is the exact path."""
    if precision not in PRECISIONS:
        raise MedvitError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise MedvitError("fp16 inference needs a CUDA device; use bf16 or fp32 on the CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def training_dtype(device: torch.device, amp: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of training steps, None for fp32: fp16 (with loss scaling) on CUDA,
    bf16 on CPUs with native bf16 kernels; `amp=None` turns it on where the device has it,
    `amp=True` where it can run (not on a CPU without bf16, where it would be slower)."""
    if amp is False:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` when enabled (fp16 on CUDA by default); fp32 is a no-op."""
    if not enabled or dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype or torch.float16)
    if dtype is not None:
        return torch.autocast("cpu", dtype=dtype)
    return contextlib.nullcontext()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Hand memory that glibc keeps after large frees back to the OS (`malloc_trim`).

    Called between the phases of a segmentation (model load, preprocessing, inference) so
    the temporaries of one phase do not stay resident through the next. A fixed low mmap
    threshold would do this continuously, but its page faults cost a third of the
    inference time. No-op where the C library is not glibc.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# glibc mallopt parameters, and the values its dynamic threshold settles at on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_CEILING = 32 * 2**20


_reuse_lock = threading.Lock()
_reuse_depth = 0


@contextlib.contextmanager
def reuse_large_blocks(limit_bytes: int = 2**30) -> Iterator[None]:
    """Serve allocations up to `limit_bytes` from glibc's heap while the block runs.

    glibc maps every block above 32 MB afresh and unmaps it when freed, so each large
    activation of a window's forward (a 48-channel 96^3 map is 85 MB in bf16) costs
    ~20k page faults, about as much as the arithmetic on it: a third of Swin-UNETR's
    CPU forward. Inside the block such blocks come from the heap and are reused window
    after window. The heap holds a few maps more than the forward's live set (torch's
    64-byte aligned blocks do not always fit the holes earlier ones left) and stops growing
    after a few windows (Swin-UNETR's bf16 forward: +220 MB, flat from the 8th window).
    Inference only: around training steps it made Swin-UNETR steps 25 % faster, but
    autograd's mix of block sizes fragmented the heap to a 17.6 GB peak in a `medvit train` run.
    The setting is process-wide: nested or concurrent blocks (threads) share it, and the
    last one out leaves the thresholds where glibc's dynamic rule ends (32 MB mmap, twice
    that to trim) and hands the kept memory back. No-op where the C library is not glibc.
    """
    global _reuse_depth
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    with _reuse_lock:
        if _reuse_depth == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, int(limit_bytes))
            libc.mallopt(_M_TRIM_THRESHOLD, int(limit_bytes))
        _reuse_depth += 1
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_CEILING)
                libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_CEILING)
                return_freed_memory()
