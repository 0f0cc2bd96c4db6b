"""Model families, one module per paper under `image/`, `video/` and `volume/`.

Nothing is imported here: `medvit.registry` finds the variants in the families' source and
imports a family when one of its models is built.
"""
