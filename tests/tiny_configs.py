"""Few-second CPU configurations of every registered variant, for the tests.

They live with the tests, never in the production registry: a user's `create_model(name)`
always builds the variant as published. `tests/medvit/test_registry.py` checks that every
registered name has exactly one entry here.
"""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------- image families, a-l

_BOTNET = dict(depths=(1, 1, 1, 2), channels=(32, 64, 64, 128), img_size=64, num_classes=10)
# DeiT-shaped: two blocks of width 32 on 32 px (CaiT, CPVT, DeiT)
_DEIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, num_classes=10)
_CEIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, stem_width=8, num_classes=10)
_CONVIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, local_up_to_layer=2, num_classes=10)
_CONVMIXER = dict(embed_dim=32, depth=2, num_classes=10, img_size=28)
_CROSSVIT = dict(
    img_size=48, img_scale=(1.0, 1.0), embed_dim=(16, 32), depth=((1, 1, 0),), num_heads=(2, 2),
    mlp_ratio=(2.0, 2.0), num_classes=10,
)
_CVT = dict(embed_dim=(16, 32, 32), depth=(1, 1, 1), num_heads=(1, 2, 2), img_size=32, num_classes=10)
_DEEPVIT = dict(embed_dim=36, depth=2, num_heads=3, reattn_depth=1, img_size=32, stem_width=8, num_classes=10)
_HALONET = dict(
    depths=(1, 1, 1, 1), widths=(16, 16, 32, 32), block_size=2, halo_size=1, num_heads=2, img_size=64,
    num_classes=10,
)
_HVT = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
_LEVIT = dict(
    img_size=32, embed_dim=(16, 24, 32), key_dim=4, depth=(1, 1, 1), num_heads=(2, 3, 4), num_classes=10
)
_LOCALVIT = dict(embed_dim=32, depth=2, num_heads=2, se_reduction=32, img_size=32, num_classes=10)

IMAGE_A_TO_L: dict[str, dict[str, Any]] = {
    "botnet50": _BOTNET,
    "botnet_s1_59": dict(_BOTNET, depths=(1, 1, 1, 1)),
    "botnet_s1_128": dict(_BOTNET, depths=(1, 1, 2, 1)),
    "cait_xxs24_224": _DEIT,
    "cait_xs24_384": _DEIT,
    "cait_s24_224": _DEIT,
    "ceit_tiny": _CEIT,
    "ceit_small": _CEIT,
    "convit_tiny": _CONVIT,
    "convit_small": _CONVIT,
    "convit_base": _CONVIT,
    "convmixer_768_32": _CONVMIXER,
    "convmixer_1024_20_ks9_p14": _CONVMIXER,
    "convmixer_1536_20": _CONVMIXER,
    "cpvt_tiny": _DEIT,
    "cpvt_small": _DEIT,
    "cpvt_base": _DEIT,
    "crossvit_tiny_240": _CROSSVIT,
    "crossvit_small_240": _CROSSVIT,
    "crossvit_base_240": _CROSSVIT,
    "crossvit_9_240": _CROSSVIT,
    "crossvit_15_240": _CROSSVIT,
    "crossvit_18_240": _CROSSVIT,
    "cvt_13": _CVT,
    "cvt_21": _CVT,
    "cvt_w24": _CVT,
    "cvt_13_3d": _CVT,  # three-dimensional through the variant's own spatial_dims=3
    "deepvit_small": _DEEPVIT,
    "deepvit_large": _DEEPVIT,
    "deit_tiny_patch16_224": _DEIT,
    "deit_small_patch16_224": _DEIT,
    "deit_base_patch16_224": _DEIT,
    "deit_tiny_distilled_patch16_224": _DEIT,
    "deit_small_distilled_patch16_224": _DEIT,
    "deit_base_distilled_patch16_224": _DEIT,
    "halonet_h0": _HALONET,
    "halonet_h1": _HALONET,
    "halonet_h2": _HALONET,
    "hvt_ti_1": dict(_HVT, num_pool_stages=1),
    "hvt_ti_4": dict(_HVT, num_pool_stages=2),
    "hvt_s_1": dict(_HVT, num_pool_stages=1),
    "hvt_s_4": dict(_HVT, num_pool_stages=2),
    "levit_128s": _LEVIT,
    "levit_128": _LEVIT,
    "levit_192": _LEVIT,
    "levit_256": _LEVIT,
    "levit_384": _LEVIT,
    "localvit_tiny": _LOCALVIT,
    "localvit_small": _LOCALVIT,
}

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

_MVIT_VIDEO = dict(embed_dim=16, depth=(1, 1, 1, 1), img_size=32, num_frames=4, num_classes=10)
_TIMESFORMER = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, num_frames=4, num_classes=10)
_VIVIT = dict(embed_dim=32, depth=2, temporal_depth=1, num_heads=2, num_frames=4, img_size=32, num_classes=10)
# a MiT / PVT v2 encoder under the SegFormer and UNETR decoders
_SEG_PYRAMID = dict(depth=(1, 1, 1, 1), embed_dim=(8, 16, 24, 32), num_heads=(1, 2, 3, 4))
_SEGFORMER_2D = dict(img_size=32, decoder_dim=16, encoder_args=_SEG_PYRAMID)
_SEGFORMER_3D = dict(img_size=32, decoder_dim=8, encoder_args=_SEG_PYRAMID)
# three stages on 32^3: grids 16, 8 (padded to window 5, shifted), 4 (window shrunk to the
# grid, MONAI's full-window bias table), 2 after the final merge (instance norm needs > 1 voxel)
_SWIN_UNETR = dict(img_size=32, feature_size=6, depth=(2, 2, 1), num_heads=(1, 2, 2), window_size=5, num_classes=3)
_TRANSUNET_ENCODER = dict(embed_dim=32, depth=2, num_heads=2, backbone_depths=(1, 1, 1))
_UNETR_VIT = dict(
    img_size=32, feature_size=4, skip_indices=(0, 1, 2), encoder_args=dict(embed_dim=32, depth=3, num_heads=2)
)
# four stages (stride 8): the fewest that deep supervision takes
_UNET = dict(img_size=32, features=(4, 8, 8, 8), num_classes=3)
_UNETR_PYRAMID = dict(img_size=32, feature_size=4, encoder_args=_SEG_PYRAMID)

VIDEO_AND_VOLUME: dict[str, dict[str, Any]] = {
    # video
    "mvit_base_16x4": _MVIT_VIDEO,
    "mvit_base_32x3": _MVIT_VIDEO,
    "stam_base_patch16_224_16f": dict(
        embed_dim=32, depth=2, num_heads=2, temporal_depth=2, temporal_heads=2, img_size=32, num_frames=4,
        num_classes=10,
    ),
    "timesformer_base": _TIMESFORMER,
    "timesformer_hr": _TIMESFORMER,
    "timesformer_l": _TIMESFORMER,
    "vivit_b_16x2_st": _VIVIT,
    "vivit_b_16x2_fe": _VIVIT,
    "vivit_b_16x2_fsa": _VIVIT,
    "vivit_b_16x2_fdp": _VIVIT,
    "vivit_l_16x2_st": _VIVIT,
    "vivit_l_16x2_fe": _VIVIT,
    "vivit_l_16x2_fsa": _VIVIT,
    "vivit_l_16x2_fdp": _VIVIT,
    "vtn_vit_base": dict(
        backbone_args=dict(embed_dim=32, depth=1, num_heads=2, img_size=32), num_frames=4, embed_dim=32, depth=1,
        num_heads=2, window_size=1, num_classes=10,
    ),
    # volume
    "medt": dict(img_size=64, patch_size=32, depths=(1, 1, 1, 1), num_heads=2, stem_hidden=16, width_factor=0.0625),
    "segformer_b0": _SEGFORMER_2D,
    "segformer_b1": _SEGFORMER_2D,
    "segformer_b2": _SEGFORMER_2D,
    "segformer_b3": _SEGFORMER_2D,
    "segformer_b4": _SEGFORMER_2D,
    "segformer_b5": _SEGFORMER_2D,
    "segformer3d_b0": _SEGFORMER_3D,
    "segformer3d_b1": _SEGFORMER_3D,
    "swin_unetr_base": _SWIN_UNETR,
    "swin_unetr_small": _SWIN_UNETR,
    "transunet_r50_vit_b16": dict(
        img_size=32, head_channels=16, decoder_channels=(16, 8, 8, 4), encoder_args=_TRANSUNET_ENCODER
    ),
    "transunet3d_r50_vit_b16": dict(
        img_size=32, head_channels=16, decoder_channels=(16, 8, 8, 4),
        encoder_args={**_TRANSUNET_ENCODER, "backbone_channels": (128, 128, 128)},
    ),
    "unet_nnunet_2d": _UNET,
    "unet_nnunet_3d": _UNET,
    "unetr_base": _UNETR_VIT,
    "unetr_small": _UNETR_VIT,
    "unetr_tiny": _UNETR_VIT,
    "unetr_swin_tiny": dict(
        img_size=32, feature_size=4,
        encoder_args=dict(embed_dim=16, depth=(2, 2, 1, 1), num_heads=(1, 2, 2, 2), window_size=4),
    ),
    "unetr_pvt_v2_b1": _UNETR_PYRAMID,
    "unetr_mit_b0": _UNETR_PYRAMID,
}

# ----------------------------------------------------------------

TINY: dict[str, dict[str, Any]] = {**IMAGE_A_TO_L, **IMAGE_M_TO_Z, **VIDEO_AND_VOLUME}


def tiny_overrides(name: str) -> dict[str, Any]:
    """The small test configuration of a registered variant (a fresh copy)."""
    if name not in TINY:
        raise KeyError(f"{name!r} has no tiny configuration in tests/tiny_configs.py")
    return dict(TINY[name])
