"""Self-supervised pretraining of any registered encoder, pure PyTorch.

- `MoCoV3` (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision
  Transformers", ICCV 2021): momentum contrast with a predictor, symmetric InfoNCE.
- `DINO` (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
  ICCV 2021): self-distillation to a momentum teacher with centring and sharpening,
  multi-crop.
- `SiT` (Atito, Awais, Kittler, "SiT: Self-supervised vIsion Transformer", 2021):
  rotation prediction, masked-patch reconstruction and a contrastive term.

Every method reads its encoder through `EncoderFeatures` (`features.py`): the backbone
interface (`forward_features`, `forward_head(pre_logits=True)`, `forward_intermediates`)
gives a pooled vector and the deepest feature map of any registered 2D or 3D encoder.
"""

from medvit.ssl.common import cosine_momentum, ema_update
from medvit.ssl.dino import DINO, DINOHead, DINOLoss
from medvit.ssl.features import EncoderFeatures
from medvit.ssl.moco import MoCoV3, contrastive_loss
from medvit.ssl.sit import SiT, corrupt_patches, rotate_batch

METHODS = ("moco", "dino", "sit")

__all__ = [
    "DINO",
    "METHODS",
    "DINOHead",
    "DINOLoss",
    "EncoderFeatures",
    "MoCoV3",
    "SiT",
    "contrastive_loss",
    "corrupt_patches",
    "cosine_momentum",
    "ema_update",
    "rotate_batch",
]
