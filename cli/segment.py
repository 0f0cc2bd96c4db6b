"""`medvit segment`: masks for scans, on each scan's own grid."""

from __future__ import annotations

from pathlib import Path

import click

from medvit.cli._common import device_option, terminate_unwinds, user_errors


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", "checkpoints", required=True, multiple=True, type=click.Path(path_type=Path),
              help="A medvit checkpoint (.safetensors), or a model from `medvit export` (.onnx, run in fp32); "
                   "repeat it to average an ensemble (same labels and grid).")
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for <stem>_seg.nii.gz (or <stem>_seg.dcm) and <stem>_volumes.json.")
@click.option("--overlap", default=0.5, show_default=True, help="Sliding-window overlap fraction.")
@click.option("--sw-batch-size", type=int, default=None, help="Windows per forward pass [default: 1 on CPU, 4 on CUDA].")
@device_option()
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32 (the exact path).")
@click.option("--tta", is_flag=True, help="Average over the 8 axis flips (8x slower).")
@click.option("--labels", multiple=True, help="Keep only these label names (repeatable).")
@click.option("--preview", is_flag=True, help="Also write <stem>_preview.png.")
@click.option("--statistics", is_flag=True,
              help="Also write <stem>_stats.json: per label, voxels, volume and the scan's intensities inside it "
                   "(mean, std, min, max, percentiles; HU for CT models).")
@click.option("--postprocess", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: the connected-component rules the checkpoint chose on validation; none: raw mask.")
@click.option("--output-type", type=click.Choice(["nifti", "dicom-seg", "both"]), default="nifti", show_default=True,
              help="nifti: <stem>_seg.nii.gz; dicom-seg: <stem>_seg.dcm, a DICOM Segmentation object referencing "
                   "the source series (DICOM series folders only); both.")
@click.option("--body-crop", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: CT models run only the windows that hold some of the body (background outside them); "
                   "none: over the whole grid.")
@click.option("--skip-existing", is_flag=True,
              help="Leave out scans whose masks and <stem>_volumes.json exist (resume a stopped batch); "
                   "with --preview / --statistics, their preview / stats file too.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@user_errors
def segment(inputs, checkpoints, out_dir, overlap, sw_batch_size, device, precision, tta, labels, preview,
            statistics, postprocess, output_type, body_crop, skip_existing, quiet) -> None:
    """Segment INPUTS: scan files, DICOM series folders or folders of scans.

    A bad scan does not stop the batch: every other scan is segmented, then each bad
    one is listed as `<file>: <problem>` and the exit status is 1. A bad model or
    output folder stops everything before the first scan.

    Under torchrun (`torchrun --nproc_per_node N -m medvit.cli segment ...`, on one or
    several nodes) each process segments its own share of the scans.
    """
    from medvit.pipelines.segment import SegmentConfig, segment as run, card_summary
    from medvit.pipelines.checkpoint import read_card

    cards = [read_card(c) for c in checkpoints]
    if not quiet:
        for c, card in zip(checkpoints, cards):
            click.echo(f"model: {card_summary(card)}" + (f" [{c.name}]" if len(cards) > 1 else ""))
    cfg = SegmentConfig(overlap=overlap, sw_batch_size=sw_batch_size, device=device, precision=precision, tta=tta,
                        labels=list(labels) or None, preview=preview, statistics=statistics, progress=not quiet,
                        skip_existing=skip_existing, postprocess=postprocess, output_type=output_type, body_crop=body_crop)

    def show(r) -> None:  # noqa: ANN001
        if r.skipped:
            click.echo(f"{r.input}: already segmented ({r.volumes} exists), skipped")
            return
        vols = ", ".join(f"{k} {v:.1f} ml" for k, v in r.volumes_ml.items())
        windows = f" [{r.windows[0]} of {r.windows[1]} windows]" if r.windows and not quiet else ""
        click.echo(f"{r.input} -> {', '.join(map(str, r.masks))} ({vols}){windows}")

    with terminate_unwinds():
        run(inputs, list(checkpoints), out_dir, cfg, on_result=show)
