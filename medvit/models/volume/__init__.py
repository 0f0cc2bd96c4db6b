"""Segmentation models for volumes (and slices): one module per family.

Families are imported when one of their models is built (see `medvit.registry`).
"""
