"""GVSL: Geometric Visual Similarity Learning (He et al., CVPR 2023) for 3D volumes.

Public API::

    gvsl.GVSL(width=1.0)          # the torch.nn.Module; out = model(a, b)
    gvsl.load_model(path)         # our checkpoints or the official GVSL3D-UNet weights
    gvsl.match_pair(fixed, moving, model)   # physical-space matching (see gvsl.match)

Conventions (axes, LPS/RAS, transform directions) live in :mod:`gvsl.conventions`.
"""

__version__ = "0.1.0"

# Everything is imported on first use: the Slicer panel imports ``gvsl`` (to find it for
# its child processes) before it has offered to install torch and MONAI.
_LAZY = {"GVSL": "network", "GVSLOutput": "network", "load_model": "checkpoint", "CheckpointError": "checkpoint",
         "match_pair": "match", "MatchResult": "match"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["GVSL", "GVSLOutput", "load_model", "match_pair", "MatchResult", "CheckpointError"]
