"""Tests generated from the registry: every variant builds at full size and trains tiny."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

import medvit
from tiny_configs import tiny_overrides

ALL = medvit.list_models()


def _input_for(model: torch.nn.Module) -> torch.Tensor:
    """Every model states its input: `in_chans` and `img_size` (plus `num_frames` for video)."""
    size = tuple(model.img_size)
    frames = getattr(model, "num_frames", None)
    return torch.randn(2, model.in_chans, *((frames,) if frames else ()), *size)


@pytest.mark.parametrize("name", ALL)
def test_full_configuration_builds(name: str) -> None:
    with torch.device("meta"):
        model = medvit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert model.model_name == name
    assert isinstance(model.in_chans, int) and len(model.img_size) == model.spatial_dims


@pytest.mark.parametrize("name", ALL)
def test_tiny_forward_backward(name: str) -> None:
    model = medvit.create_model(name, **tiny_overrides(name))
    x = _input_for(model)
    out = model(x)
    assert torch.isfinite(out).all()
    assert out.shape[0] == 2
    if getattr(model, "num_classes", 0) and out.ndim == 2:
        assert out.shape[1] == model.num_classes
    if out.ndim > 2:  # segmentation: logits on the input grid
        assert out.shape[2:] == x.shape[2:]
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # in eval mode a model is deterministic and each sample's output depends on that sample only
    model.eval()
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(x), full, atol=0, rtol=0)
        torch.testing.assert_close(model(x[:1]), full[:1], atol=1e-4, rtol=1e-4)


def test_list_models_pattern() -> None:
    assert medvit.list_models("unetr_*") == [
        "unetr_base", "unetr_mit_b0", "unetr_pvt_v2_b1", "unetr_small", "unetr_swin_tiny", "unetr_tiny"
    ]
    vits = medvit.list_models("vit_*_patch16_224")
    assert vits == sorted(vits) and "vit_base_patch16_224" in vits and "vit_huge_patch16_224" in vits
    assert medvit.list_models("nothing*") == []


def test_unknown_name_lists_closest() -> None:
    with pytest.raises(ValueError, match="unknown model name 'vit_bse_patch16_224'.*vit_base_patch16_224"):
        medvit.create_model("vit_bse_patch16_224")


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("vit_base_patch16_224", img_size=100)
    with pytest.raises(ValueError, match="invalid arguments"):
        medvit.create_model("vit_base_patch16_224", no_such_argument=1)
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("unetr_base", img_size=(96, 96, 40))


def test_parameter_counts_match_timm(timm: ModuleType) -> None:
    names = [n for n in medvit.list_models("vit_*") if n in timm.list_models()]
    assert len(names) >= 15
    for name in names:
        with torch.device("meta"):
            model = medvit.create_model(name, num_classes=1000)
            # like with like where our default head is the paper's, not timm's (ViT-g/14: MAP)
            pool = dict(global_pool=model.global_pool, class_token=model.cls_token is not None)
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000, **pool).parameters())
        assert sum(p.numel() for p in model.parameters()) == ref, name


def test_unetr_base_is_the_paper_configuration() -> None:
    with torch.device("meta"):
        model = medvit.create_model("unetr_base", num_classes=14)
    enc = model.encoder
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads) == (768, 12, 12)
    assert enc.patch_size == (16, 16, 16) and model.img_size == (96, 96, 96)
    assert model.stem.conv1.out_channels == 16 and model.skip_indices == (3, 6, 9)
    # MONAI's UNETR has 92.80M parameters, 18,432 of them unused cross-attention norms
    assert sum(p.numel() for p in model.parameters()) == 92_802_478 - 18_432


def test_models_by_kind() -> None:
    from medvit.registry import model_kind

    video = medvit.list_models(kind="video")
    assert {"timesformer_base", "vivit_b_16x2_fe", "mvit_base_16x4", "vtn_vit_base"} <= set(video)
    assert "unetr_base" in medvit.list_models(kind="volume") and model_kind("vit_base_patch16_224") == "image"
    assert not set(video) & set(medvit.list_models(kind="image"))
    with pytest.raises(ValueError, match="kind"):
        medvit.list_models(kind="audio")


def test_catalogue_is_what_the_families_register() -> None:
    from medvit import registry

    catalogue = registry.catalog()
    # the figure the README quotes; a family that stops registering (or a name the source
    # scan misses) changes it
    assert len(catalogue) >= 170
    registered = registry.import_all()
    assert set(registered) == set(catalogue)
    assert all(registered[name].__module__ == module for name, module in catalogue.items())


def test_each_variant_is_registered_once_and_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medvit import registry

    # a second family defining a registered name is refused, naming both modules
    family = tmp_path / "image"
    family.mkdir(parents=True)
    for kind in ("video", "volume"):
        (tmp_path / kind).mkdir()
    (family / "a.py").write_text("@register_model\ndef vit_x(**kwargs):\n    pass\n")
    (family / "b.py").write_text("@register_model\ndef vit_x(**kwargs):\n    pass\n")
    monkeypatch.setattr(registry, "_MODELS_ROOT", tmp_path)
    registry.catalog.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="'vit_x' is registered in medvit.models.image.a and medvit.models.image.b"):
            registry.catalog()
    finally:
        monkeypatch.undo()
        registry.catalog.cache_clear()

    def vit_base_patch16_224(**kwargs):  # same name, another function
        raise AssertionError

    registry.model_entrypoint("vit_base_patch16_224")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_model(vit_base_patch16_224)


def test_every_variant_has_one_tiny_configuration() -> None:
    from tiny_configs import IMAGE_A_TO_L, IMAGE_M_TO_Z, TINY, VIDEO_AND_VOLUME

    sections = [set(IMAGE_A_TO_L), set(IMAGE_M_TO_Z), set(VIDEO_AND_VOLUME)]
    assert sum(map(len, sections)) == len(TINY)
    assert set(TINY) == set(medvit.list_models())
