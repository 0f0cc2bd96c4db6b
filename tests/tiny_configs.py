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

IMAGE_M_TO_Z: dict[str, dict[str, Any]] = {}

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
