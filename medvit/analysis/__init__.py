"""Looking inside models: attention rollout and mean attention distance (pure torch)."""

from __future__ import annotations

from medvit.analysis.attention import (
    attention_rollout,
    mean_attention_distance,
    token_positions,
)

__all__ = ["attention_rollout", "mean_attention_distance", "token_positions"]
