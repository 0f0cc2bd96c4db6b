"""Parity with independent implementations (MONAI UNETR/ViT, timm ViT, same weights); which models each source loads."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import inflate_image_to_video, load_monai, load_timm, load_torchvision
from tiny_configs import tiny_overrides


@torch.no_grad()
def test_monai_unetr_parity_paper_configuration(monai_nets: ModuleType) -> None:
    ref = monai_nets.UNETR(1, 14, (96, 96, 96)).eval()
    ours = load_monai(medvit.create_model("unetr_base", num_classes=14), ref.state_dict()).eval()
    x = torch.randn(1, 1, 96, 96, 96)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(spatial_dims=2, img_size=(64, 96)),
        dict(spatial_dims=3, img_size=(32, 48, 32), feature_size=8, in_channels=2, norm_name="batch"),
        dict(spatial_dims=3, img_size=32, feature_size=8, res_block=False, conv_block=False),
    ],
)
def test_monai_unetr_parity_variants(kwargs, monai_nets: ModuleType) -> None:
    mk = dict(in_channels=1, out_channels=3, hidden_size=96, mlp_dim=192, num_heads=4, feature_size=8)
    mk.update(kwargs)
    ref = monai_nets.UNETR(**mk).eval()
    ours = medvit.create_model(
        "unetr_base",
        in_chans=mk["in_channels"],
        num_classes=3,
        img_size=mk["img_size"],
        spatial_dims=mk["spatial_dims"],
        feature_size=mk["feature_size"],
        norm=mk.get("norm_name", "instance"),
        res_block=mk.get("res_block", True),
        conv_block=mk.get("conv_block", True),
        encoder_args=dict(embed_dim=96, num_heads=4, mlp_ratio=2.0),
    )
    load_monai(ours, ref.state_dict()).eval()
    if mk.get("norm_name") == "batch":  # give the running statistics non-trivial values
        ref.train()(torch.randn(2, mk["in_channels"], *ours.img_size))
        load_monai(ours, ref.state_dict())
        ref.eval()
    x = torch.randn(2, mk["in_channels"], *ours.img_size)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_monai_vit_parity_with_hidden_states(monai_nets: ModuleType) -> None:
    ref = monai_nets.ViT(1, (32, 32, 32), 8, hidden_size=64, mlp_dim=128, num_layers=3, num_heads=4).eval()
    ours = medvit.create_model(
        "vit_base_patch16_96_3d", img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4,
        mlp_ratio=2.0, qkv_bias=False, norm_eps=1e-5, class_token=False, global_pool="",
    )
    load_monai(ours, ref.state_dict()).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    out, hidden = ref(x)
    final, feats = ours.forward_intermediates(x, output_fmt="NLC")
    torch.testing.assert_close(final, out, atol=1e-4, rtol=0)
    for a, b in zip(feats, hidden):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_monai_vit_classification_and_perceptron_embedding(monai_nets: ModuleType) -> None:
    ref = monai_nets.ViT(
        1, (16, 16, 16), 8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
        classification=True, num_classes=5, post_activation=None, proj_type="perceptron",
    ).eval()
    ours = medvit.create_model(
        "vit_base_patch16_96_3d", img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        mlp_ratio=2.0, qkv_bias=False, norm_eps=1e-5, no_embed_class=True, num_classes=5,
    )
    load_monai(ours, ref.state_dict()).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    torch.testing.assert_close(ours(x), ref(x)[0], atol=1e-4, rtol=0)


def test_monai_weights_that_do_not_fit_are_refused(monai_nets: ModuleType) -> None:
    ref = monai_nets.UNETR(1, 3, 32, feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4)
    ours = medvit.create_model("unetr_base", num_classes=4, img_size=32, feature_size=8,
                               encoder_args=dict(embed_dim=96, num_heads=4, mlp_ratio=2.0))
    with pytest.raises(ValueError, match=r"shape mismatch.*head\.weight"):
        load_monai(ours, ref.state_dict())
    with pytest.raises(ValueError, match="unexpected"):
        load_monai(ours.encoder, {**ref.vit.state_dict(), "extra.weight": torch.zeros(1)})


@torch.no_grad()
def test_timm_vit_parity_base(timm: ModuleType) -> None:
    ref = timm.create_model("vit_base_patch16_224").eval()
    ours = load_timm(medvit.create_model("vit_base_patch16_224"), ref.state_dict()).eval()
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(global_pool="avg", class_token=False),
        dict(global_pool="map", class_token=False),
        dict(init_values=1e-2, qk_norm=True),
        dict(no_embed_class=True, pre_norm=True),
    ],
)
def test_timm_vit_parity_options(kwargs, timm: ModuleType) -> None:
    small = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, num_classes=7)
    ref = timm.create_model("vit_small_patch16_224", **small, **kwargs).eval()
    for p in ref.parameters():  # timm zero-initialises some tensors; make every one count
        p.add_(torch.randn_like(p) * 0.02)
    ours = load_timm(medvit.create_model("vit_small_patch16_224", **small, **kwargs), ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_checkpoint_at_another_resolution_is_resampled(timm: ModuleType) -> None:
    small = dict(embed_dim=64, depth=2, num_heads=4)
    ref = timm.create_model("vit_small_patch16_224", **small).eval()
    ours = load_timm(medvit.create_model("vit_small_patch16_384", **small), ref.state_dict()).eval()
    ref_384 = timm.create_model("vit_small_patch16_384", **small).eval()
    sd = ref.state_dict()
    sd["pos_embed"] = timm.layers.resample_abs_pos_embed(sd["pos_embed"], (24, 24), num_prefix_tokens=1)
    ref_384.load_state_dict(sd)
    x = torch.randn(1, 3, 384, 384)
    torch.testing.assert_close(ours(x), ref_384(x), atol=1e-4, rtol=0)


def test_timm_ignore_head_for_fine_tuning(timm: ModuleType) -> None:
    small = dict(embed_dim=64, depth=2, num_heads=4, img_size=32)
    ref = timm.create_model("vit_small_patch16_224", **small)
    ours = medvit.create_model("vit_small_patch16_224", num_classes=3, **small)
    with pytest.raises(ValueError, match="head"):
        load_timm(ours, ref.state_dict())
    load_timm(ours, ref.state_dict(), ignore_head=True)
    torch.testing.assert_close(ours.blocks[1].attn.qkv.weight, ref.blocks[1].attn.qkv.weight)
    assert ours.head.out_features == 3


def test_each_source_loads_only_the_classes_it_has_a_mapper_for() -> None:
    mixer = medvit.create_model("mixer_s16_224", **tiny_overrides("mixer_s16_224"))
    for load in (load_monai, load_torchvision):
        with pytest.raises(ValueError, match=f"{load.__name__} does not know how to load into MlpMixer"):
            load(mixer, {})
    with pytest.raises(ValueError, match="no image-to-video inflation is known for MlpMixer"):
        inflate_image_to_video(mixer, {})
    unetr = medvit.create_model("unetr_swin_tiny", **tiny_overrides("unetr_swin_tiny"))
    with pytest.raises(ValueError, match="need a UNETR with a ViT encoder"):
        load_monai(unetr, {})
