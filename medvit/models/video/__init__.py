"""Video backbones, input (B, C, T, H, W): one module per family.

Families are imported when one of their models is built (see `medvit.registry`).
"""
