"""Key rules of the U-Net decoder blocks shared by MONAI's UNETR and SwinUNETR."""

from __future__ import annotations

import re

from medvit.convert._common import rename_first

# A MONAI UnetResBlock / UnetBasicBlock, relative to its own prefix.
_CONV_BLOCK_RULES = [
    (r"conv([12])\.conv\.", r"conv\1."),
    (r"conv3\.conv\.", "shortcut.0."),
    (r"norm3\.", "shortcut.1."),
]


def conv_block_key(rest: str) -> str:
    """A key inside a MONAI `UnetResBlock` / `UnetBasicBlock` -> inside our `ConvBlock`."""
    return rename_first(rest, _CONV_BLOCK_RULES)


def up_path_key(k: str) -> str:
    """MONAI's `decoderN` up-blocks and `out` head (UNETR and Swin-UNETR) -> ours; others unchanged."""
    m = re.match(r"^decoder(\d)\.transp_conv\.conv\.(.+)$", k)
    if m:
        return f"ups.{5 - int(m.group(1))}.up.{m.group(2)}"
    m = re.match(r"^decoder(\d)\.conv_block\.(.+)$", k)
    if m:
        return f"ups.{5 - int(m.group(1))}.fuse.{conv_block_key(m.group(2))}"
    m = re.match(r"^out\.conv\.conv\.(weight|bias)$", k)
    if m:
        return f"head.{m.group(1)}"
    return k
