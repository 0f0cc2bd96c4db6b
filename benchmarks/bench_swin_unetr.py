"""Swin-UNETR forward speed on CPU: MONAI's SwinUNETR vs medvit's, with the same weights.

Builds MONAI's SwinUNETR in the paper configuration (feature size 48, 96^3, 14 classes)
with random weights, converts the same weights into `swin_unetr_base`, and prints the
median per-patch forward time (after a warm-up) of:
- MONAI fp32 as a user runs it (glibc's default allocator behaviour);
- MONAI fp32 again under `reuse_large_blocks`, the allocator setting `medvit segment`
  runs its windows under (so the ratio against it shows what is not the allocator);
- ours in fp32 and in bf16 (weights and activations, what `medvit segment --precision
  auto` runs on CPUs with AVX512-BF16), both under that setting, as `medvit segment` runs.
It also prints the largest difference of our fp32 logits from MONAI's and the argmax
agreement of bf16 with fp32.

    OMP_NUM_THREADS=2 python benchmarks/bench_swin_unetr.py --size 96 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import medvit
from medvit.convert import load_monai
from medvit.pipelines.runtime import reuse_large_blocks


def _median_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float, torch.Tensor]:
    """Median wall and process-CPU seconds per call (CPU time, summed over threads, is the
    steadier figure on a shared machine: time the hypervisor gives to others is not in it)."""
    out = fn()  # warm-up: oneDNN primitive creation, allocator
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="cubic patch side (multiple of 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model after one warm-up")
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--num-classes", type=int, default=14)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--skip-monai", action="store_true", help="time ours only (no reference logits)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, 1, args.size, args.size, args.size)
    ours = medvit.create_model(
        "swin_unetr_base", feature_size=args.feature_size, num_classes=args.num_classes, img_size=args.size
    ).eval()
    print(f"threads {torch.get_num_threads()}, patch {args.size}^3, feature size {args.feature_size}")

    ref_out = None
    t_ref = c_ref = t_reuse = float("nan")
    if not args.skip_monai:
        from monai.networks.nets import SwinUNETR

        ref = SwinUNETR(in_channels=1, out_channels=args.num_classes, feature_size=args.feature_size).eval()
        load_monai(ours, ref.state_dict())
        with torch.no_grad():
            t_ref, c_ref, ref_out = _median_time(lambda: ref(x), args.repeats)
            print(f"MONAI fp32                 {t_ref:8.3f} s/patch  {c_ref:8.3f} CPU s/patch")
            with reuse_large_blocks():
                t_reuse, c_reuse, _ = _median_time(lambda: ref(x), args.repeats)
            print(f"MONAI fp32, heap reuse     {t_reuse:8.3f} s/patch  {c_reuse:8.3f} CPU s/patch")
        del ref

    def report(name: str, t: float, c: float) -> None:
        print(f"{name:26} {t:8.3f} s/patch  {c:8.3f} CPU s/patch  {t_ref / t:5.2f}x MONAI (wall)"
              f"  {c_ref / c:5.2f}x (CPU)  {t_reuse / t:5.2f}x MONAI with heap reuse (wall)")

    with torch.no_grad(), reuse_large_blocks():
        t32, c32, out32 = _median_time(lambda: ours(x), args.repeats)
        report("medvit fp32", t32, c32)
        ours.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        t16, c16, out16 = _median_time(lambda: ours(xb), args.repeats)
        report("medvit bf16", t16, c16)
    if ref_out is not None:
        print(f"max |medvit fp32 - MONAI| = {(out32 - ref_out).abs().max().item():.2e}")
    agree = (out16.float().argmax(1) == out32.argmax(1)).float().mean().item()
    print(f"argmax agreement bf16 vs fp32 = {agree:.4%}")


if __name__ == "__main__":
    main()
