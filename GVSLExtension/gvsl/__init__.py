"""GVSL: Geometric Visual Similarity Learning (He et al., CVPR 2023) for 3D volumes.

Public API::

    gvsl.GVSL(width=1.0)          # the torch.nn.Module; out = model(a, b)
    gvsl.load_model(path)         # our checkpoints or the official GVSL3D-UNet weights
    gvsl.match_pair(fixed, moving, model)   # physical-space matching (see gvsl.match)

Conventions (axes, LPS/RAS, transform directions) live in :mod:`gvsl.conventions`.
"""
from .checkpoint import CheckpointError, load_model
from .network import GVSL, GVSLOutput

__version__ = "0.1.0"


def __getattr__(name):
    # The matching stack pulls in SimpleITK and MONAI; import it on first use.
    if name in ("match_pair", "MatchResult"):
        from . import match
        return getattr(match, name)
    raise AttributeError(name)


__all__ = ["GVSL", "GVSLOutput", "load_model", "match_pair", "MatchResult", "CheckpointError"]
