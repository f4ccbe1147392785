"""Multi-scale per-voxel descriptors and the feature-similarity heatmap.

The last decoder layer alone (8 channels in the width-0.25 model) cannot tell one voxel of
soft tissue from another: its heatmap is "hot" over the whole body. As in SAM (Yan et al.,
IEEE TMI 2022), a coarse embedding picks the region and a fine one the voxel. Here the
descriptor of a voxel is every decoder level of the one network pass, coarse to fine:
the bottleneck (/16), up1 (/8), up2 (/4), up3 (/2) and the last layer (/1), each normalised
to unit length per voxel. The similarity of two voxels is the weighted mean of the per-level
cosine similarities, so it stays in [-1, 1] (1 = identical at every level).

Each level is normalised per voxel, upsampled with the network's own interpolation
(trilinear, ``align_corners=True``, on the grid padded to a multiple of 16) to the stride-2
grid and normalised again; the combined coarse map is then upsampled to the working grid.
The upsampled features are never stored: upsampling is linear, so a query's dot products
are computed at each level's own resolution and upsampled, then divided by the length of the
upsampled features (one map per level and image, computed once per pair). A query costs
two full-grid upsamplings of one map (milliseconds at 64^3 on a CPU).

Search: the best match is the maximum of the combined map, refined to a fraction of a voxel
by a parabola through it and its neighbours on each axis (:func:`subvoxel_peak`; on the
benchmark pairs the shipped model's median error fell from 1.24 to 1.13 working voxels, the
random network's from 2.30 to 2.22). A coarse-to-fine search (the
combined map picks the region, the levels of stride <= ``fine_stride`` pick the voxel inside
a ``window``) is available; on the benchmark pairs it was not better than the plain maximum
(mean median error 1.94 vs 1.83 working voxels with the shipped model), so it is off by
default. Weights were chosen with :mod:`gvsl.heatmap_eval` on the chest CT, MNI152 and
MNI152-vs-Colin27 pairs of ``benchmarks/heatmaps.py``: the bottleneck (4^3 cells on a 64^3
grid) made every pair worse; the last layer alone was 4-13 voxels off.

Feature dictionaries (``MatchResult.features``): ``"fixed"`` / ``"moving"`` hold the finest
level (C, D, H, W) as before; ``"fixed@16"``, ``"fixed@8"``, ... the coarser levels on the
padded grid, ``"fixed@16:norm"``... the length of their upsampled features on the stride-2
grid. A dictionary without coarse levels (an old state file) gives the old heatmap.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .conventions import sample_at

STRIDES = (16, 8, 4, 2, 1)  # bottleneck, up1, up2, up3, last layer: coarse to fine
# Weight of each level in the combined similarity, and the coarse-to-fine window (working-grid
# voxels, radius). Chosen by the heatmap measure; see the module docstring.
DEFAULT_WEIGHTS = (0.0, 1.0, 2.0, 1.0, 1.0)
DEFAULT_WINDOW = 0
DEFAULT_FINE_STRIDE = 4
PAD_MULTIPLE = 16


def descriptor_features(out, index: int = 0) -> Dict[str, torch.Tensor]:
    """Unit-norm descriptors of sample ``index`` of a :class:`gvsl.network.GVSLOutput`, on the CPU."""
    features = {"fixed": F.normalize(out.features_a[index].float(), dim=0).cpu(),
                "moving": F.normalize(out.features_b[index].float(), dim=0).cpu()}
    for name, levels in (("fixed", getattr(out, "levels_a", None)), ("moving", getattr(out, "levels_b", None))):
        shape = tuple(features[name].shape[1:])
        for stride, level in zip(STRIDES[:-1], levels or []):
            level = F.normalize(level[index].float(), dim=0).cpu()
            features[f"{name}@{stride}"] = level
            if stride > 2:
                features[f"{name}@{stride}:norm"] = upsampled_length(level, shape)
    return features


def padded_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    return tuple(int(np.ceil(s / PAD_MULTIPLE) * PAD_MULTIPLE) for s in shape)


def _pad_before(shape: Sequence[int]) -> np.ndarray:
    return np.array([(p - s) // 2 for p, s in zip(padded_shape(shape), shape)], dtype=np.float64)


def available_strides(features: Dict[str, torch.Tensor], image: str) -> Tuple[int, ...]:
    return tuple(s for s in STRIDES if (image if s == 1 else f"{image}@{s}") in features)


def upsample_to(level_map: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(C, d, h, w) on a level of the padded grid -> (C, D, H, W) on the working grid of ``shape``."""
    up = F.interpolate(level_map[None], size=padded_shape(shape), mode="trilinear", align_corners=True)[0]
    d0, h0, w0 = (int(v) for v in _pad_before(shape))
    return up[:, d0:d0 + shape[0], h0:h0 + shape[1], w0:w0 + shape[2]]


def half_grid(shape: Sequence[int]) -> Tuple[int, int, int]:
    """The stride-2 level's grid (the padded working grid halved), where coarse maps are combined."""
    return tuple(p // 2 for p in padded_shape(shape))


def upsampled_length(level: torch.Tensor, shape: Sequence[int], chunk: int = 16) -> torch.Tensor:
    """Per-voxel length of the level's features upsampled to the stride-2 grid of a working
    grid of ``shape`` (8 times fewer voxels than the working grid; the map is smooth there),
    a few channels at a time so that the upsampled features are never all in memory."""
    squared = torch.zeros(half_grid(shape))
    for c0 in range(0, level.shape[0], chunk):
        up = F.interpolate(level[None, c0:c0 + chunk], size=half_grid(shape), mode="trilinear", align_corners=True)
        squared += up[0].pow(2).sum(0)
    return squared.sqrt().clamp_min(1e-6)


def _level(features, image, stride):
    return features[image if stride == 1 else f"{image}@{stride}"]


def level_similarity(features: Dict[str, torch.Tensor], source: str, target: str, voxel: np.ndarray,
                     stride: int) -> torch.Tensor:
    """Cosine similarity of one level between the source's descriptor at ``voxel`` (working-grid
    voxel (d, h, w), may be fractional) and every target voxel: on the target's working grid
    for the last layer, on its stride-2 grid for the coarser levels (see :func:`upsample_to`)."""
    src, tgt = _level(features, source, stride), _level(features, target, stride)
    full_src = tuple(features[source].shape[1:])
    full_tgt = tuple(features[target].shape[1:])
    if stride == 1:
        coords = voxel
    else:  # align_corners=True: padded full index i <-> level index i (n - 1) / (N - 1)
        padded = np.asarray(padded_shape(full_src), dtype=np.float64)
        n = np.asarray(src.shape[1:], dtype=np.float64)
        coords = (voxel + _pad_before(full_src)) * (n - 1) / np.maximum(padded - 1, 1)
    c = torch.as_tensor(np.asarray(coords, dtype=np.float32).reshape(1, 3, 1, 1, 1))
    query = F.normalize(sample_at(src[None], c, padding_mode="border").reshape(-1), dim=0)
    sim = torch.einsum("c,cdhw->dhw", query.to(tgt.dtype), tgt).float()
    if stride <= 2:
        return sim
    up = F.interpolate(sim[None, None], size=half_grid(full_tgt), mode="trilinear", align_corners=True)[0, 0]
    norm = features.get(f"{target}@{stride}:norm")
    return up / norm if norm is not None else up


def similarity(features: Dict[str, torch.Tensor], source: str, target: str, voxel,
               weights: Optional[Sequence[float]] = None, window: Optional[int] = None,
               fine_stride: Optional[int] = None, subvoxel: bool = True) -> Tuple[torch.Tensor, np.ndarray, float]:
    """Combined multi-scale similarity map (D, H, W) on the target's working grid, the best
    matching target voxel (d, h, w) and its similarity.

    ``weights``: per level, coarse to fine (``STRIDES``); levels missing from ``features``
    are skipped. ``window``: radius in voxels of the coarse-to-fine search: the best voxel is
    the maximum of the levels of stride <= ``fine_stride`` inside that window around the
    maximum of the combined map (0: the combined map's maximum). ``subvoxel``: the best voxel
    is refined to a fraction of a voxel (:func:`subvoxel_peak`); the similarity returned is
    the map's value at the integer voxel."""
    weights = DEFAULT_WEIGHTS if weights is None else tuple(weights)
    window = DEFAULT_WINDOW if window is None else window
    fine_stride = DEFAULT_FINE_STRIDE if fine_stride is None else fine_stride
    voxel = np.asarray(voxel, dtype=np.float64).reshape(3)
    present = set(available_strides(features, source)) & set(available_strides(features, target))
    used = [(s, w) for s, w in zip(STRIDES, weights) if w > 0 and s in present]
    if not used:
        used = [(1, 1.0)]
    total = sum(w for _, w in used)
    maps = {s: level_similarity(features, source, target, voxel, s) for s, _ in used}
    full = tuple(features[target].shape[1:])

    def weighted(levels):
        """Weighted sum of some levels' maps on the working grid: the coarse ones are summed on
        the stride-2 grid and upsampled once, so a query costs two full-grid upsamplings at most."""
        coarse = [(s, w) for s, w in levels if s > 1]
        out = sum(w * maps[s] for s, w in levels if s == 1) if any(s == 1 for s, _ in levels) else 0.0
        if coarse:
            out = out + upsample_to(sum(w * maps[s] for s, w in coarse)[None], full)[0]
        return out

    fine = [(s, w) for s, w in used if s <= fine_stride]
    coarse_only = [(s, w) for s, w in used if s > fine_stride]
    fine_map = weighted(fine) if fine else None
    combined = ((fine_map if fine else 0.0) + (weighted(coarse_only) if coarse_only else 0.0)) / total
    if window and fine and coarse_only:
        # Coarse to fine: the whole descriptor picks the region, the fine levels alone the voxel
        # (coarse levels also encode where a voxel sits in the grid, which biases the peak).
        centre = np.unravel_index(int(torch.argmax(combined)), tuple(combined.shape))
        lo = [max(0, c - window) for c in centre]
        hi = [min(n, c + window + 1) for c, n in zip(centre, combined.shape)]
        box = fine_map[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        best = np.asarray(np.unravel_index(int(torch.argmax(box)), tuple(box.shape))) + np.asarray(lo)
        searched = fine_map
    else:
        best = np.asarray(np.unravel_index(int(torch.argmax(combined)), tuple(combined.shape)))
        searched = combined
    score = float(combined[tuple(int(v) for v in best)])
    return combined, subvoxel_peak(searched, best) if subvoxel else best.astype(np.float64), score


def subvoxel_peak(values: torch.Tensor, best) -> np.ndarray:
    """The maximum of ``values`` (D, H, W) near its best voxel ``best`` (d, h, w), to a
    fraction of a voxel: per axis, the vertex of the parabola through the best voxel and its
    two neighbours (clamped to half a voxel; an axis keeps its integer index where the best
    voxel lies on the border, is below a neighbour, or the three values lie on a line; a tie
    with one neighbour puts the peak halfway between them). An integer argmax alone
    is off by about half a voxel on average even where the descriptors are exact."""
    best = np.asarray(best, dtype=np.int64).reshape(3)
    peak = best.astype(np.float64)
    centre = float(values[tuple(best)])
    for axis in range(3):
        if not 0 < best[axis] < values.shape[axis] - 1:
            continue
        below, above = best.copy(), best.copy()
        below[axis] -= 1
        above[axis] += 1
        f_below, f_above = float(values[tuple(below)]), float(values[tuple(above)])
        curvature = f_below - 2.0 * centre + f_above
        # Only around a maximum of the three: in the coarse-to-fine search the best voxel of the
        # window can sit on the window's edge with a higher neighbour outside it.
        if curvature < 0.0 and centre >= max(f_below, f_above):
            peak[axis] += float(np.clip(0.5 * (f_below - f_above) / curvature, -0.5, 0.5))
    return peak
