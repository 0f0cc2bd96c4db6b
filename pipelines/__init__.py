"""Workflows: read scans, check and plan datasets, preprocess, train, segment, evaluate, convert weights."""

from __future__ import annotations
