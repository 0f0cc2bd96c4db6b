"""2D image backbones: one module per family.

Families are imported when one of their models is built (see `medvit.registry`).
"""
