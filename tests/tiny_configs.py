"""Few-second CPU configurations of every registered variant, for the tests.

They live with the tests, never in the production registry: a user's `create_model(name)`
always builds the variant as published. `tests/medvit/test_registry.py` checks that every
registered name has exactly one entry here.
"""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------- image families, a-l

IMAGE_A_TO_L: dict[str, dict[str, Any]] = {}

# ---------------------------------------------------------------- image families m-z

# the PVT / PVT v2 / MiT pyramids: four one-block stages
_PVT_2D: dict[str, Any] = dict(
    img_size=32, depth=(1, 1, 1, 1), embed_dim=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), num_classes=10
)
_PVT_3D: dict[str, Any] = dict(_PVT_2D, img_size=(32, 32, 32))
_MIXER: dict[str, Any] = dict(embed_dim=32, depth=2, num_classes=10)
_MVIT_IMAGE: dict[str, Any] = dict(embed_dim=16, depth=(1, 1, 1, 1), img_size=64, num_classes=10)
_PIT: dict[str, Any] = dict(
    img_size=32, patch_size=4, stride=2, embed_dim=(8, 16, 32), depth=(1, 1, 1), num_heads=(1, 2, 4),
    num_classes=10,
)
# two blocks in the first stage so the shifted-window path (mask, roll, padding) runs
_SWIN_IMAGE: dict[str, Any] = dict(embed_dim=16, depth=(2, 2, 1, 1), num_heads=(1, 2, 2, 2), window_size=4)
# So-ViT is T2T-ViT with a second-order head: its entries add `cov_dim`
_T2T: dict[str, Any] = dict(embed_dim=32, depth=2, num_heads=2, token_dim=8, img_size=32, num_classes=10)
_TNT: dict[str, Any] = dict(
    img_size=32, patch_size=16, embed_dim=32, inner_dim=8, depth=2, num_heads=2, num_heads_inner=2,
    num_classes=10,
)
_VIL: dict[str, Any] = dict(
    img_size=32, embed_dim=(8, 16, 16, 32), depth=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=1,
    num_classes=10,
)
_PLAIN_VIT: dict[str, Any] = dict(embed_dim=32, depth=2, num_heads=2)
_HYBRID: dict[str, Any] = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, backbone_depths=(1, 1, 1))
_XCIT: dict[str, Any] = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, num_classes=10)

IMAGE_M_TO_Z: dict[str, dict[str, Any]] = {
    "mit_b0": _PVT_2D,
    "mit_b1": _PVT_2D,
    "mit_b2": _PVT_2D,
    "mit_b3": _PVT_2D,
    "mit_b4": _PVT_2D,
    "mit_b5": _PVT_2D,
    "mit_b0_3d": _PVT_3D,
    "mit_b1_3d": _PVT_3D,
    "mixer_s16_224": dict(_MIXER, img_size=32),
    "mixer_s32_224": dict(_MIXER, img_size=64),
    "mixer_b16_224": dict(_MIXER, img_size=32),
    "mixer_b32_224": dict(_MIXER, img_size=64),
    "mixer_l16_224": dict(_MIXER, img_size=32),
    "mixer_l32_224": dict(_MIXER, img_size=64),
    "mvit_b_16": _MVIT_IMAGE,
    "mvit_b_24": _MVIT_IMAGE,
    "mvit_b_16_3d": dict(_MVIT_IMAGE, img_size=32, in_chans=1),
    "mvitv2_tiny": _MVIT_IMAGE,
    "mvitv2_small": _MVIT_IMAGE,
    "mvitv2_base": _MVIT_IMAGE,
    "pit_ti_224": _PIT,
    "pit_xs_224": _PIT,
    "pit_s_224": _PIT,
    "pit_b_224": _PIT,
    "pvt_tiny": _PVT_2D,
    "pvt_small": _PVT_2D,
    "pvt_medium": _PVT_2D,
    "pvt_large": _PVT_2D,
    "pvt_tiny_3d": _PVT_3D,
    "pvt_v2_b0": _PVT_2D,
    "pvt_v2_b1": _PVT_2D,
    "pvt_v2_b2": _PVT_2D,
    "pvt_v2_b2_li": _PVT_2D,
    "pvt_v2_b3": _PVT_2D,
    "pvt_v2_b4": _PVT_2D,
    "pvt_v2_b5": _PVT_2D,
    "pvt_v2_b0_3d": _PVT_3D,
    "so_vit_7": dict(_T2T, cov_dim=6),
    "so_vit_10": dict(_T2T, cov_dim=6),
    "so_vit_14": dict(_T2T, cov_dim=6),
    "swin_tiny_patch4_window7_224": dict(_SWIN_IMAGE, img_size=48, num_classes=10),
    "swin_small_patch4_window7_224": dict(_SWIN_IMAGE, img_size=48, num_classes=10),
    "swin_base_patch4_window7_224": dict(_SWIN_IMAGE, img_size=48, num_classes=10),
    "swin_tiny_patch4_window7_3d": dict(_SWIN_IMAGE, img_size=32),
    "t2t_vit_14": _T2T,
    "t2t_vit_19": _T2T,
    "t2t_vit_24": _T2T,
    "tnt_s_patch16_224": _TNT,
    "tnt_b_patch16_224": _TNT,
    "vil_tiny": _VIL,
    "vil_small": _VIL,
    "vit_tiny_patch16_224": dict(_PLAIN_VIT, img_size=32, num_classes=10),
    "vit_tiny_patch16_384": dict(_PLAIN_VIT, img_size=32, num_classes=10),
    "vit_tiny_patch32_224": dict(_PLAIN_VIT, img_size=64, num_classes=10),
    "vit_tiny_patch32_384": dict(_PLAIN_VIT, img_size=64, num_classes=10),
    "vit_tiny_patch14_224": dict(_PLAIN_VIT, img_size=28, num_classes=10),
    "vit_tiny_patch16_96_3d": dict(_PLAIN_VIT, img_size=32),
    "vit_small_patch16_224": dict(_PLAIN_VIT, img_size=32, num_classes=10),
    "vit_small_patch16_384": dict(_PLAIN_VIT, img_size=32, num_classes=10),
    "vit_small_patch32_224": dict(_PLAIN_VIT, img_size=64, num_classes=10),
    "vit_small_patch32_384": dict(_PLAIN_VIT, img_size=64, num_classes=10),
    "vit_small_patch14_224": dict(_PLAIN_VIT, img_size=28, num_classes=10),
    "vit_small_patch16_96_3d": dict(_PLAIN_VIT, img_size=32),
    "vit_base_patch16_224": dict(_PLAIN_VIT, img_size=32, num_classes=10),
    "vit_base_patch16_384": dict(_PLAIN_VIT, img_size=32, num_classes=10),
    "vit_base_patch32_224": dict(_PLAIN_VIT, img_size=64, num_classes=10),
    "vit_base_patch32_384": dict(_PLAIN_VIT, img_size=64, num_classes=10),
    "vit_base_patch14_224": dict(_PLAIN_VIT, img_size=28, num_classes=10),
    "vit_base_patch16_96_3d": dict(_PLAIN_VIT, img_size=32),
    "vit_large_patch16_224": dict(_PLAIN_VIT, img_size=32, num_classes=10),
    "vit_large_patch16_384": dict(_PLAIN_VIT, img_size=32, num_classes=10),
    "vit_large_patch32_224": dict(_PLAIN_VIT, img_size=64, num_classes=10),
    "vit_large_patch32_384": dict(_PLAIN_VIT, img_size=64, num_classes=10),
    "vit_large_patch14_224": dict(_PLAIN_VIT, img_size=28, num_classes=10),
    "vit_large_patch16_96_3d": dict(_PLAIN_VIT, img_size=32),
    "vit_huge_patch16_224": dict(_PLAIN_VIT, img_size=32, num_classes=10),
    "vit_huge_patch16_384": dict(_PLAIN_VIT, img_size=32, num_classes=10),
    "vit_huge_patch32_224": dict(_PLAIN_VIT, img_size=64, num_classes=10),
    "vit_huge_patch32_384": dict(_PLAIN_VIT, img_size=64, num_classes=10),
    "vit_huge_patch14_224": dict(_PLAIN_VIT, img_size=28, num_classes=10),
    "vit_huge_patch16_96_3d": dict(_PLAIN_VIT, img_size=32),
    "vit_giant_patch14_224": dict(_PLAIN_VIT, img_size=28, num_classes=10),
    "vit_base_r50_s16_224": dict(_HYBRID, num_classes=10),
    "vit_base_r50_s16_384": dict(_HYBRID, num_classes=10),
    "vit_base_r50_s16_96_3d": dict(_HYBRID, backbone_channels=(128, 128, 128)),
    "xcit_tiny_12_p16_224": _XCIT,
    "xcit_small_12_p16_224": _XCIT,
}

# ---------------------------------------------------------------- video and volume families

VIDEO_AND_VOLUME: dict[str, dict[str, Any]] = {}

# ----------------------------------------------------------------

TINY: dict[str, dict[str, Any]] = {**IMAGE_A_TO_L, **IMAGE_M_TO_Z, **VIDEO_AND_VOLUME}


def tiny_overrides(name: str) -> dict[str, Any]:
    """The small test configuration of a registered variant (a fresh copy)."""
    if name not in TINY:
        raise KeyError(f"{name!r} has no tiny configuration in tests/tiny_configs.py")
    return dict(TINY[name])
