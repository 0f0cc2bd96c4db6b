"""`python -m medvit.cli ...` (and `torchrun -m medvit.cli train ...`)."""

from __future__ import annotations

from medvit.cli.main import main

main()
