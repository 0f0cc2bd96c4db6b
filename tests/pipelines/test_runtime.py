"""Run-time choices: devices, precision, and the allocator setting used during inference."""

from __future__ import annotations

import ctypes.util
import json
import resource
import subprocess
import sys

import pytest
import torch

from medvit.pipelines.errors import MedvitError
from medvit.pipelines.runtime import inference_dtype, resolve_device

GLIBC = bool(ctypes.util.find_library("c")) and hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt")


# run in a fresh interpreter: what earlier tests left in the heap changes which blocks glibc
# can reuse, and the setting is process-wide
_PROBE = """
import json, resource, torch
from medvit.layers import ConvBlock
from medvit.pipelines.runtime import reuse_large_blocks

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

block = ConvBlock(3, 6, 6).eval()  # a decoder stage: conv, norm, activation, residual


def faults_per_step(x, steps):
    # one step is one window's forward; it allocates and frees maps of x's size
    out = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block(x)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out


torch.set_grad_enabled(False)
x = torch.randn(1, 6, 128, 128, 128)  # 48 MB maps: above glibc's 32 MB mmap ceiling
outside = faults_per_step(x, 3)
start = rss()
with reuse_large_blocks():
    inside = faults_per_step(x, 6)
    with reuse_large_blocks():  # a nested block (another caller) leaving must not end it
        pass
    nested = faults_per_step(x, 2)
    held = rss() - start
print(json.dumps(dict(outside=outside, inside=inside, nested=nested, held=held, left=rss() - start, map=x.nbytes)))
"""


@pytest.mark.skipif(not GLIBC, reason="the allocator setting applies to glibc only")
def test_large_blocks_are_reused_inside_and_handed_back_after() -> None:
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    r = json.loads(run.stdout)
    map_pages = r["map"] // resource.getpagesize()
    # by default every step maps its maps afresh and faults every page in
    assert min(r["outside"]) > 2 * map_pages, r
    # inside, the heap settles within a few steps and then serves the maps from reused memory:
    # most later steps fault in no new map (glibc may still hand a block back now and then)
    assert sum(f < map_pages // 10 for f in r["inside"][2:]) >= 2, r
    assert sum(r["inside"]) < sum(r["outside"]) / 2, r
    # a nested block leaving keeps the outer setting: no step maps afresh as every step outside does
    # (one block handed back and faulted in again is a map's pages, not the outside's many)
    assert max(r["nested"]) < min(r["outside"]) / 2, r
    assert r["map"] <= r["held"] < 8 * r["map"], r  # the freed maps stay in the heap while inside...
    assert r["left"] < r["map"], r  # ...and are handed back to the OS on leaving


def test_device_and_precision_choices_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(MedvitError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(MedvitError, match="needs a CUDA device"):
        inference_dtype(torch.device("cpu"), "fp16")
    assert inference_dtype(torch.device("cpu"), "fp32") == torch.float32


def test_cuda_defaults_to_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert inference_dtype(torch.device("cuda"), "auto") == torch.float16


@pytest.mark.parametrize("has_bf16", [True, False])
def test_training_precision(monkeypatch: pytest.MonkeyPatch, has_bf16: bool) -> None:
    import medvit.pipelines.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.training_dtype(cuda, None) == runtime.training_dtype(cuda, True) == torch.float16
    assert runtime.training_dtype(cuda, False) is None and runtime.training_dtype(cpu, False) is None
    want = torch.bfloat16 if has_bf16 else None  # bf16 without native kernels would be slower than fp32
    assert runtime.training_dtype(cpu, None) == runtime.training_dtype(cpu, True) == want
