"""TensorBoard pictures of validation: a slice with prediction and reference outlines."""

from __future__ import annotations

import torch

from medvit.pipelines.palette import label_colour


def overlay_slice(image: torch.Tensor, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """CHW float image: left the reference, right the prediction, on the slice with most label.

    Args:
        image: `(X, Y, Z)` normalised intensities.
        pred: `(X, Y, Z)` predicted class indices.
        label: `(X, Y, Z)` reference class indices.
    """
    per_slice = (label > 0).flatten(0, 1).sum(0)
    z = int(per_slice.argmax()) if per_slice.any() else image.shape[-1] // 2
    img = image[..., z].float()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6)
    panels = []
    for mask in (label[..., z], pred[..., z]):
        rgb = img[None].repeat(3, 1, 1)
        for cls in mask.unique().tolist():
            if cls == 0:
                continue
            sel = mask == cls
            colour = torch.tensor(label_colour(cls), dtype=torch.float32).view(3, 1) / 255.0
            rgb[:, sel] = 0.5 * rgb[:, sel] + 0.5 * colour
        panels.append(torch.rot90(rgb, 1, (1, 2)))
    return torch.cat(panels, dim=2).clamp(0, 1)


__all__ = ["overlay_slice"]
