"""Forward time of medvit's `unetr_base` against MONAI's UNETR with the same weights.

Usage: python benchmarks/bench_models.py [--size 96] [--repeats 3] [--threads N]

Both models run in this process, in eval mode under `torch.inference_mode`, on the same
96^3 input, alternating so that both see the same machine state; the median of the
repeats is reported. A ratio > 1 means medvit is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets import UNETR as MonaiUNETR

import medvit
from medvit.convert import load_monai


def _time(model: torch.nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--classes", type=int, default=14)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ref = MonaiUNETR(1, args.classes, args.size).eval()
    ours = medvit.create_model("unetr_base", num_classes=args.classes, img_size=args.size).eval()
    load_monai(ours, ref.state_dict())
    x = torch.randn(1, 1, args.size, args.size, args.size)

    with torch.inference_mode():
        diff = (ref(x) - ours(x)).abs().max().item()  # also warms up both
        t_ref, t_ours = [], []
        for _ in range(args.repeats):
            t_ref.append(_time(ref, x))
            t_ours.append(_time(ours, x))
    m_ref, m_ours = statistics.median(t_ref), statistics.median(t_ours)
    print(f"input 1x1x{args.size}^3, {args.classes} classes, {args.threads} threads, torch {torch.__version__}")
    print(f"MONAI UNETR   forward: {m_ref:.3f} s (median of {args.repeats})")
    print(f"medvit unetr_base forward: {m_ours:.3f} s (median of {args.repeats})")
    print(f"speed ratio (MONAI / medvit): {m_ref / m_ours:.2f}x")
    print(f"max |logit difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
