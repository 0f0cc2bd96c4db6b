"""medvit.models.video."""
