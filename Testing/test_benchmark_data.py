"""The benchmark data helpers (benchmarks/datasets.py, benchmarks/pretrain_data.py) on a
small synthetic source: the packaged volumes themselves need Debian packages CI lacks."""
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import datasets  # noqa: E402
import pretrain_data  # noqa: E402
from gvsl.samples import synthetic_volume  # noqa: E402

CT_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def small_source():
    image, labels = synthetic_volume(size=(32, 30, 24), spacing=(2.0, 2.0, 3.0), direction=CT_DIRECTION, seed=1)
    return datasets.Source("phantom", image, labels, {1: "a", 2: "b", 3: "c"}, "CT", "test", "none")


def test_held_out_slab_is_the_superior_quarter_and_disjoint():
    source = small_source()
    train, held = pretrain_data.split_held_out(source.image)
    assert train.GetSize()[2] + held.GetSize()[2] == source.image.GetSize()[2]
    assert held.GetSize()[2] == 6
    z_train = [train.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(train.GetSize()[2])]
    z_held = [held.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(held.GetSize()[2])]
    assert min(z_held) > max(z_train)  # LPS +z is superior


def test_synthetic_contrast_keeps_geometry_and_changes_intensities():
    source = small_source()
    variant = pretrain_data.synthetic_contrast(source.image, source.labels, np.random.default_rng(0))
    assert variant.GetSize() == source.image.GetSize()
    assert np.allclose(variant.GetDirection(), source.image.GetDirection())
    values = sitk.GetArrayViewFromImage(variant)
    assert values.min() >= 0 and np.isfinite(values).all()
    original = sitk.GetArrayViewFromImage(source.image)
    assert abs(np.corrcoef(values.ravel(), original.ravel())[0, 1]) < 0.99


def test_known_transform_pair_truth_maps_fixed_structures_onto_moving_ones():
    source = small_source()
    pair = datasets.known_transform_pairs(source, seeds=(3,))[0]
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(pair.fixed_labels)
    moving_stats = sitk.LabelShapeStatisticsImageFilter()
    moving_stats.Execute(pair.moving_labels)
    for label in stats.GetLabels():
        mapped = np.asarray(pair.truth.TransformPoint(stats.GetCentroid(label)))
        assert np.linalg.norm(mapped - np.asarray(moving_stats.GetCentroid(label))) < 4.0


def test_isotropic_resampling_keeps_the_physical_box():
    source = small_source()
    coarse = datasets.resample_isotropic(source.image, 4.0)
    assert coarse.GetSpacing() == (4.0, 4.0, 4.0)
    for image in (source.image, coarse):
        assert np.allclose(np.asarray(image.GetSize()) * np.asarray(image.GetSpacing()), [64, 60, 72], atol=4.0)
    centre = lambda im: np.asarray(im.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in im.GetSize()]))
    assert np.allclose(centre(source.image), centre(coarse), atol=2.0)
