"""Evaluation metrics shared by the demo, fine-tuning and benchmarks."""
from __future__ import annotations

from typing import Dict, Iterable

import numpy as np


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels: Iterable[int]) -> Dict[int, float]:
    """Dice 2|P∩R| / (|P| + |R|) per label; NaN where the label is absent from both."""
    out = {}
    for label in labels:
        p = prediction == label
        r = reference == label
        denominator = int(p.sum()) + int(r.sum())
        out[int(label)] = float("nan") if denominator == 0 else 2.0 * float(np.logical_and(p, r).sum()) / denominator
    return out
