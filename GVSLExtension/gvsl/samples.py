"""Sample data that ships inside packages (nothing is downloaded) and known deformations.

* ``chest_ct()``: slicerio's real chest CT (CTChest4.nrrd, 3 x 3 x 10 mm, non-identity
  direction) and its 7-segment segmentation as a label map with names.
* ``mni_t1()``: nilearn's MNI152 T1 template with a grey/white-matter label map.
* ``synthetic_volume()``: a random ellipsoid phantom on any geometry, for tests.
* ``random_deformation()``: a known affine + smooth elastic ITK transform.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .conventions import LPS_TO_RAS_4X4, Grid


def chest_ct() -> Tuple[sitk.Image, sitk.Image, List[str]]:
    """(CT in HU, label map 0..7, segment names for labels 1..7) from slicerio."""
    try:
        import slicerio
    except ImportError as exc:
        raise RuntimeError("the sample chest CT ships with slicerio: pip install slicerio") from exc
    folder = os.path.join(os.path.dirname(slicerio.__file__), "data")
    ct = sitk.ReadImage(os.path.join(folder, "CTChest4.nrrd"), sitk.sitkFloat32)
    seg_info = slicerio.read_segmentation(os.path.join(folder, "Segmentation.seg.nrrd"))
    names = [s["name"] for s in seg_info["segments"]]
    extracted = slicerio.extract_segments(seg_info, [(s["name"], i + 1) for i, s in enumerate(seg_info["segments"])])
    labels = segmentation_to_image(extracted)
    labels = sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return ct, labels, names


def segmentation_to_image(segmentation: dict) -> sitk.Image:
    """slicerio's segmentation dict (voxels in IJK order, LPS/RAS ijkToLPS) -> sitk label map."""
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim == 4:
        voxels = voxels[..., 0]
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=np.float64)
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.transpose(2, 1, 0)).astype(np.uint8))
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    return image


def mni_t1(resolution: int = 2) -> Tuple[sitk.Image, sitk.Image, List[str]]:
    """(MNI152 T1, label map 1 = grey matter, 2 = white matter, names) from nilearn, at
    ``resolution`` mm (1 or 2)."""
    try:
        from nilearn import datasets
    except ImportError as exc:
        raise RuntimeError("the sample MRI ships with nilearn: pip install nilearn") from exc
    t1 = _nifti_to_sitk(datasets.load_mni152_template(resolution=resolution))
    gm = sitk.GetArrayFromImage(_nifti_to_sitk(datasets.load_mni152_gm_template(resolution=resolution)))
    wm = sitk.GetArrayFromImage(_nifti_to_sitk(datasets.load_mni152_wm_template(resolution=resolution)))
    labels = np.zeros(gm.shape, np.uint8)
    labels[(gm > 0.5) & (gm >= wm)] = 1
    labels[(wm > 0.5) & (wm > gm)] = 2
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(t1)
    return t1, label_image, ["grey matter", "white matter"]


def _nifti_to_sitk(nifti) -> sitk.Image:
    """nibabel image (RAS affine, array in i, j, k order) -> SimpleITK (LPS)."""
    array = np.asarray(nifti.get_fdata(), dtype=np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    affine = LPS_TO_RAS_4X4 @ nifti.affine  # nibabel's RAS -> LPS
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    return image


def synthetic_volume(size=(48, 48, 40), spacing=(1.0, 1.0, 1.0), direction=None, origin=(0.0, 0.0, 0.0),
                     seed: int = 0, n_blobs: int = 12, ct: bool = True) -> Tuple[sitk.Image, sitk.Image]:
    """A phantom (body ellipsoid with inner blobs) and its label map, on any geometry.
    ``size``/``spacing`` in ITK order; the phantom is defined in physical space, so two
    calls with different geometry but the same seed show the same anatomy."""
    rng = np.random.default_rng(seed)
    geometry = Grid(tuple(origin), tuple(spacing), tuple(np.eye(3).ravel() if direction is None else direction),
                    tuple(size))
    phys = geometry.physical_points()
    centre = geometry.physical_bounds_center()
    half = geometry.physical_extent() / 2
    rel = (phys - centre) / (half * 0.8)
    body = (rel ** 2).sum(-1) <= 1.0
    values = np.where(body, 40.0, -1000.0) if ct else np.where(body, 300.0, 0.0)
    labels = np.zeros(len(phys), np.uint8)
    for k in range(n_blobs):
        c = centre + rng.uniform(-0.5, 0.5, 3) * half
        r = rng.uniform(0.12, 0.25, 3) * half.min()
        inside = (((phys - c) / r) ** 2).sum(-1) <= 1.0
        values = np.where(inside & body, rng.uniform(-300, 800) if ct else rng.uniform(50, 900), values)
        labels = np.where(inside & body, 1 + k % 3, labels)
    values = values + rng.normal(0, 10.0 if ct else 5.0, values.shape)
    image = sitk.GetImageFromArray(values.reshape(geometry.shape).astype(np.float32))
    label_image = sitk.GetImageFromArray(labels.reshape(geometry.shape))
    for im in (image, label_image):
        geometry.apply_to(im)
    return image, label_image


def random_deformation(reference: sitk.Image, seed: int = 0, max_rotation_deg: float = 8.0,
                       max_translation_mm: float = 8.0, max_scale: float = 0.06,
                       elastic_mm: float = 4.0, control_spacing_mm: float = 40.0) -> sitk.Transform:
    """A known transform (affine about the image centre, then a smooth B-spline field):
    resampling through it maps points of the deformed space to the original's."""
    rng = np.random.default_rng(seed)
    grid = Grid.of(reference)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(grid.physical_bounds_center().tolist())
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    rot = sitk.Euler3DTransform()
    rot.SetRotation(*angles.tolist())
    scale = np.diag(1.0 + rng.uniform(-max_scale, max_scale, 3))
    matrix = np.asarray(rot.GetMatrix()).reshape(3, 3) @ scale
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(rng.uniform(-max_translation_mm, max_translation_mm, 3).tolist())
    extent = grid.physical_extent()
    mesh = [max(1, int(round(e / control_spacing_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(reference, mesh, order=3)
    params = rng.normal(0.0, elastic_mm / 2.0, len(bspline.GetParameters()))
    bspline.SetParameters(np.clip(params, -elastic_mm, elastic_mm).tolist())
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(bspline)
    return composite


def deformed_copy(image: sitk.Image, labels: Optional[sitk.Image], transform: sitk.Transform,
                  default: float = -1024.0):
    """The image (and labels) resampled through ``transform`` on the image's own grid."""
    warped = sitk.Resample(image, image, transform, sitk.sitkLinear, default, image.GetPixelID())
    warped_labels = None
    if labels is not None:
        warped_labels = sitk.Resample(labels, image, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return warped, warped_labels


def write_sample_dataset(folder, deformed_copies: int = 4, seed: int = 0, which: str = "both") -> List[str]:
    """Write the shipped chest CT and/or MNI T1 (``which``: ct, mri, both), each with
    ``deformed_copies`` randomly deformed twins, as .nii.gz (images/) with label maps
    (labels/). Returns the image paths."""
    from pathlib import Path
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    written = []
    sources = []
    if which in ("ct", "both"):
        sources.append(("chestct", *chest_ct()[:2], -1024.0))
    if which in ("mri", "both"):
        sources.append(("mni", *mni_t1()[:2], 0.0))
    for name, image, labels, background in sources:
        for k in range(deformed_copies + 1):
            if k == 0:
                img, lab = image, labels
            else:
                img, lab = deformed_copy(image, labels, random_deformation(image, seed=seed * 100 + k), background)
            path = folder / "images" / f"{name}_{k:02d}.nii.gz"
            sitk.WriteImage(img, str(path))
            sitk.WriteImage(lab, str(folder / "labels" / f"{name}_{k:02d}.nii.gz"))
            written.append(str(path))
    return written


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="write the bundled sample data set")
    parser.add_argument("folder")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--which", default="both", choices=["ct", "mri", "both"])
    a = parser.parse_args()
    for p in write_sample_dataset(a.folder, a.copies, a.seed, a.which):
        print(p)
