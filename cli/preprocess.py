"""`medvit preprocess`: fingerprint a dataset and cache its preprocessed volumes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from medvit.cli._common import terminate_unwinds, user_errors
from medvit.pipelines.dataset_preprocessing import PreprocessConfig, preprocess_dataset
from medvit.pipelines.datasets import PREPROCESSED_JSON, load_dataset
from medvit.pipelines.errors import DatasetError
from medvit.pipelines.fingerprint import FINGERPRINT_JSON
from medvit.pipelines.preprocessing import INTENSITY_PRESETS
from medvit.pipelines.verify import format_problems, verified_dataset


def _xyz(values: list[float], unit: str = "") -> str:
    return " x ".join(f"{v:g}" for v in values) + unit


@click.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--spacing", nargs=3, type=float, default=None, metavar="X Y Z",
    help="Target voxel size in mm along RAS x, y, z (default: the planned spacing).",
)  # fmt: skip
@click.option(
    "--intensity", type=click.Choice(INTENSITY_PRESETS), default=None,
    help="Intensity preset (default: ct for CT, mr for MR, none otherwise).",
)  # fmt: skip
@click.option("--max-cases", type=click.IntRange(min=1), default=None, help="Use only the first N training cases.")
@click.option(
    "--verify", is_flag=True,
    help="First check every case (readable, label on the image's grid, declared label values, one channel, "
    "finite, no duplicates); refuse, listing every problem, before anything is written.",
)  # fmt: skip
@user_errors
def preprocess(
    data: Path, out: Path, spacing: tuple[float, float, float] | None, intensity: str | None, max_cases: int | None,
    verify: bool,
) -> None:
    """Fingerprint DATA and write resampled, normalised volumes to OUT.

    DATA is a dataset.json (MSD or nnU-Net v2) or the folder holding it. OUT gets
    imagesTr/ and labelsTr/ (NIfTI), fingerprint.json and medvit_preprocessed.json,
    which `medvit train` accepts in place of the source dataset. With --verify the whole
    dataset is checked first (as `medvit train` always does) and preprocessing starts
    only when it has no problem; warnings are printed and do not stop it.
    """
    if verify:
        spec, warnings = verified_dataset(data, "nothing was preprocessed")
        for line in format_problems(warnings):
            click.echo(line, err=True)
        note = f" ({len(warnings)} warning(s) above)" if warnings else ""
        click.echo(f"Verified {len(spec.cases)} training case(s) of {spec.name}: no problems{note}")
    else:
        spec = load_dataset(data)
    if max_cases is not None:
        spec = dataclasses.replace(spec, cases=spec.cases[:max_cases])
    config = PreprocessConfig(spacing=spacing or None, intensity=intensity)
    with terminate_unwinds():
        out_dir = preprocess_dataset(spec, out, config)

    try:
        fp = json.loads((out_dir / FINGERPRINT_JSON).read_text())
        manifest = json.loads((out_dir / PREPROCESSED_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{out_dir}: cannot read back the files just written ({exc})") from None
    prep = manifest["preprocessing"]
    n = fp["num_cases"]
    click.echo(f"Dataset {spec.name} ({spec.layout}, {spec.modality}): {n} training case{'' if n == 1 else 's'}")
    click.echo(f"  median spacing {_xyz(fp['median_spacing'], ' mm')}, median shape {_xyz(fp['median_shape'])}")
    click.echo("  label volumes (mean per case):")
    for lid, name in fp["labels"].items():
        click.echo(f"    {lid:>3} {name:<20} {fp['label_volume_ml_mean'][lid]:10.1f} ml")
    suggested = fp["suggested"]
    click.echo(f"Suggested: spacing {_xyz(suggested['spacing'], ' mm')}, patch size {_xyz(suggested['patch_size'])}")
    click.echo(
        f"Used: spacing {_xyz(prep['spacing'], ' mm')}, intensity {prep['intensity']}, "
        f"patch size {_xyz(manifest['plan']['patch_size'])}"
    )
    written = len(manifest["cases"])
    click.echo(f"Wrote {written} preprocessed case(s) to {out_dir / 'imagesTr'} and {out_dir / 'labelsTr'}")
    click.echo(f"Wrote {out_dir / FINGERPRINT_JSON} and {out_dir / PREPROCESSED_JSON}")
