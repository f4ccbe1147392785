"""Real volumes with labels that ship inside installable packages, and benchmark pairs built from them.

Nothing is downloaded: every source is a file of a pip or Debian package. A missing package
raises :class:`SourceMissing` naming the command that installs it.

| name | image | labels | package (install) | licence |
|---|---|---|---|---|
| ``chest_ct`` | slicerio CTChest4, CT 3 x 3 x 10 mm | 7 segments | ``pip install slicerio`` | see ``LICENCES`` |
| ``mni152`` | nilearn MNI152 2009 T1, 1 mm | grey / white matter (probability > 0.5) | ``pip install nilearn`` | |
| ``colin27`` | MRIcron Colin27 ``ch2.nii.gz`` T1, 1 mm | AAL atlas, 116 regions | ``apt-get install mricron-data`` | |
| ``itk_t1_head`` | ITK ``KmeansTest_T1UCharRaw`` T1 head, 2 x 2 x 3 mm | 5 tissue classes of its k-means segmentation (class 1 = background) | ``apt-get install insighttoolkit5-examples`` | |
| ``invesalius_head_ct`` | InVesalius ``Cranium.inv3`` head CT, 0.96 x 0.96 x 1.5 mm | soft tissue / bone by threshold | ``apt-get install invesalius-examples`` | |

API::

    load_source(name, spacing_mm=None) -> Source
    available_sources() -> list of names whose package is installed
    known_transform_pairs(source, seeds, spacing_mm=None) -> list of Pair  (fixed = source under a known transform)
    cross_subject_pairs(spacing_mm=None) -> list of Pair                     (two different subjects)

Every ``Pair`` follows the project's direction (``gvsl.conventions``): ``truth`` maps a fixed
point to the moving point (None when the correspondence is not known point-wise).
Run ``python benchmarks/datasets.py`` to print what is installed here.
"""
from __future__ import annotations

import functools
import os
import plistlib
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "GVSLExtension"))
from gvsl.samples import chest_ct, deformed_copy, mni_t1, random_deformation  # noqa: E402

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
ITK_EXAMPLE_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
INVESALIUS_CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")

# What each package's copyright file (or licence metadata) says, read on this machine.
LICENCES = {
    "chest_ct": "slicerio: MIT (dist-info METADATA); CTChest4 is a 3D Slicer sample data set",
    "mni152": "nilearn: BSD-3-Clause; MNI ICBM152 2009 template: copyright McConnell Brain Imaging Centre, "
              "permissive (use, copy, modify and distribute with the copyright notice)",
    "colin27": "Debian mricron-data: BSD-3-clause (Chris Rorden, /usr/share/doc/mricron-data/copyright, 'Files: *'); "
               "Colin27 (ch2) is the MNI single-subject template, AAL is Tzourio-Mazoyer et al. 2002 (cite it)",
    "itk_t1_head": "Debian insighttoolkit5-examples: Apache-2.0 (Insight Software Consortium / NumFOCUS, "
                   "/usr/share/doc/insighttoolkit5-examples/copyright)",
    "invesalius_head_ct": "Debian invesalius-examples: GPL-2 (CTI Renato Archer, "
                          "/usr/share/doc/invesalius-examples/copyright); the CT is 'ProMED CT 0051'",
}
INSTALL_HINTS = {
    "chest_ct": "pip install slicerio",
    "mni152": "pip install nilearn",
    "colin27": "sudo apt-get install mricron-data",
    "itk_t1_head": "sudo apt-get install insighttoolkit5-examples",
    "invesalius_head_ct": "sudo apt-get install invesalius-examples",
}
MODALITIES = {"chest_ct": "CT", "mni152": "MR", "colin27": "MR", "itk_t1_head": "MR", "invesalius_head_ct": "CT"}
SOURCES = tuple(INSTALL_HINTS)
# InVesalius ships no segmentation, only the threshold ranges of its two masks in Cranium.inv3
# (mask_0: bone 226..3071 HU, mask_1: soft tissue from -142 HU); the same thresholds make labels.
INVESALIUS_SOFT_TISSUE_HU = -142.0
INVESALIUS_BONE_HU = 226.0


class SourceMissing(RuntimeError):
    """A packaged source is not installed here; the message names the package."""


@dataclass
class Source:
    name: str
    image: sitk.Image
    labels: Optional[sitk.Image]
    label_names: Dict[int, str]
    modality: str  # "CT" or "MR"
    licence: str
    install_hint: str

    @property
    def background(self) -> float:
        """Value outside the body: what a transform brings in from outside the volume."""
        return -1024.0 if self.modality == "CT" else float(sitk.GetArrayViewFromImage(self.image).min())


@dataclass
class Pair:
    name: str
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: Optional[sitk.Image]
    moving_labels: Optional[sitk.Image]
    label_names: Dict[int, str]
    kind: str  # "known transform" or "cross-subject"
    truth: Optional[sitk.Transform] = None  # fixed point -> moving point, when known
    modality: str = "MR"
    licence: str = ""
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- loaders


def _missing(name: str, what: str) -> SourceMissing:
    return SourceMissing(f"{name}: {what} not found; install it with: {INSTALL_HINTS[name]}")


def _load_chest_ct():
    try:
        image, labels, names = chest_ct()
    except RuntimeError as exc:
        raise _missing("chest_ct", "slicerio's CTChest4") from exc
    return image, labels, {i + 1: n for i, n in enumerate(names)}


def _load_mni152():
    try:
        t1, labels, names = mni_t1(resolution=1)
    except RuntimeError as exc:
        raise _missing("mni152", "nilearn") from exc
    return t1, labels, {i + 1: n for i, n in enumerate(names)}


def _load_colin27():
    image_path, atlas_path = MRICRON_TEMPLATES / "ch2.nii.gz", MRICRON_TEMPLATES / "aal.nii.gz"
    if not (image_path.is_file() and atlas_path.is_file()):
        raise _missing("colin27", str(image_path))
    image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(atlas_path), sitk.sitkUInt8)
    names = {}
    for line in (MRICRON_TEMPLATES / "aal.nii.txt").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    labels.CopyInformation(image)  # same grid; this removes float round-off in the headers
    return image, labels, names


def _load_itk_t1_head():
    image_path = ITK_EXAMPLE_DATA / "KmeansTest_T1UCharRaw.nii.gz"
    label_path = ITK_EXAMPLE_DATA / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz"
    if not (image_path.is_file() and label_path.is_file()):
        raise _missing("itk_t1_head", str(image_path))
    image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    # The k-means classes are numbered 0..6: class 1 is the background and class 0 holds
    # 126 stray voxels; renumber the five
    # tissue classes by mean intensity (darkest = 1) so that names say what they are.
    values = sitk.GetArrayViewFromImage(image)
    tissue = [k for k in np.unique(raw) if k not in (0, 1)]
    order = sorted(tissue, key=lambda k: values[raw == k].mean())
    labels = np.zeros(raw.shape, np.uint8)
    names = {}
    for new, old in enumerate(order, start=1):
        labels[raw == old] = new
        names[new] = f"k-means class {new} (mean T1 {values[raw == old].mean():.0f})"
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    return image, label_image, names


def _load_invesalius_head_ct():
    if not INVESALIUS_CRANIUM.is_file():
        raise _missing("invesalius_head_ct", str(INVESALIUS_CRANIUM))
    members = {}
    with tarfile.open(INVESALIUS_CRANIUM, "r:gz") as archive:
        for member in archive.getmembers():
            base = os.path.basename(member.name)
            if base in ("main.plist", "matrix.dat"):
                members[base] = archive.extractfile(member).read()
    main = plistlib.loads(members["main.plist"])
    shape = tuple(main["matrix"]["shape"])  # (slices, rows, columns)
    array = np.frombuffer(members["matrix.dat"], dtype=main["matrix"]["dtype"]).reshape(shape)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    # The project file stores spacing (x, y, z) but no origin or direction: identity, origin 0.
    image.SetSpacing([float(s) for s in main["spacing"]])
    labels = np.zeros(shape, np.uint8)
    labels[array >= INVESALIUS_SOFT_TISSUE_HU] = 1
    labels[array >= INVESALIUS_BONE_HU] = 2
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    return image, label_image, {1: "soft tissue", 2: "bone"}


_LOADERS = {"chest_ct": _load_chest_ct, "mni152": _load_mni152, "colin27": _load_colin27,
            "itk_t1_head": _load_itk_t1_head, "invesalius_head_ct": _load_invesalius_head_ct}


def resample_isotropic(image: sitk.Image, spacing_mm: float, labels: bool = False) -> sitk.Image:
    """``image`` on an isotropic grid of ``spacing_mm`` with the same origin corner, direction and extent."""
    old_spacing = np.asarray(image.GetSpacing())
    old_size = np.asarray(image.GetSize())
    size = np.maximum(1, np.round(old_size * old_spacing / spacing_mm)).astype(int)
    # Keep the physical box: the first voxel centre moves by half the change in spacing.
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    corner = np.asarray(image.GetOrigin()) - direction @ (old_spacing / 2)
    origin = corner + direction @ (np.full(3, spacing_mm) / 2)
    if not labels:
        # Anti-aliasing before decimation, sigma as in scikit-image's rescale: (factor - 1) / 2 voxels.
        sigma = np.maximum(0.0, (spacing_mm - old_spacing) / 2.0)
        if sigma.max() > 0:
            image = sitk.SmoothingRecursiveGaussian(image, sigma.tolist())
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, size.tolist(), sitk.Transform(), interpolator, origin.tolist(),
                         [float(spacing_mm)] * 3, image.GetDirection(), 0, image.GetPixelID())


@functools.lru_cache(maxsize=8)
def _load_native(name: str):
    if name not in _LOADERS:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    return _LOADERS[name]()


def load_source(name: str, spacing_mm: Optional[float] = None) -> Source:
    """One packaged volume with its label map; ``spacing_mm`` resamples both to an isotropic
    grid (only ever coarser than native along an axis is a good idea: 2 mm brains run fast)."""
    image, labels, names = _load_native(name)
    if spacing_mm is not None:
        image = resample_isotropic(image, spacing_mm)
        labels = resample_isotropic(labels, spacing_mm, labels=True) if labels is not None else None
    return Source(name, image, labels, dict(names), MODALITIES[name], LICENCES[name], INSTALL_HINTS[name])


def available_sources(verbose: bool = False) -> List[str]:
    """Names of the sources whose package is installed here; ``verbose`` prints how to get the others."""
    found = []
    for name in SOURCES:
        try:
            _load_native(name)
            found.append(name)
        except SourceMissing as exc:
            if verbose:
                print(f"skipped {exc}", file=sys.stderr)
    return found


# ----------------------------------------------------------------------------- pairs


def known_transform_pairs(source: Union[str, Source], seeds: Sequence[int] = (0, 1, 2),
                          spacing_mm: Optional[float] = None, **deformation) -> List[Pair]:
    """For each seed: moving = the source, fixed = a copy under a random affine + B-spline
    transform (``gvsl.samples.random_deformation``; ``deformation`` overrides its ranges).
    ``truth`` maps each fixed point to its moving point exactly."""
    src = load_source(source, spacing_mm) if isinstance(source, str) else source
    pairs = []
    for seed in seeds:
        truth = random_deformation(src.image, seed=seed, **deformation)
        fixed, fixed_labels = deformed_copy(src.image, src.labels, truth, src.background)
        pairs.append(Pair(f"{src.name} seed {seed}", fixed, src.image, fixed_labels, src.labels, src.label_names,
                          "known transform", truth, src.modality, src.licence, {"seed": seed}))
    return pairs


def brain_tissue_labels(image: sitk.Image, brain_mask: sitk.Image) -> sitk.Image:
    """1 = grey matter, 2 = white matter: a 3-class Otsu (CSF, grey, white) of T1 intensities inside the brain."""
    values = sitk.GetArrayFromImage(image)
    inside = sitk.GetArrayFromImage(brain_mask) > 0
    thresholds = sitk.OtsuMultipleThresholdsImageFilter()
    thresholds.SetNumberOfThresholds(2)
    brain_values = sitk.GetImageFromArray(values[inside].reshape(1, 1, -1).astype(np.float32))
    thresholds.Execute(brain_values)
    low, high = thresholds.GetThresholds()
    labels = np.zeros(values.shape, np.uint8)
    labels[inside & (values > low)] = 1
    labels[inside & (values > high)] = 2
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out


def colin27_brain_mask(spacing_mm: Optional[float] = None) -> sitk.Image:
    """MRIcron's brain mask of Colin27 (``ch2bet``), on the grid of ``load_source("colin27", spacing_mm)``."""
    brain = sitk.ReadImage(str(MRICRON_TEMPLATES / "ch2bet.nii.gz"))
    brain.CopyInformation(_load_native("colin27")[0])
    if spacing_mm is not None:
        brain = resample_isotropic(brain, spacing_mm, labels=True)
    return brain


def cross_subject_pairs(spacing_mm: Optional[float] = 2.0) -> List[Pair]:
    """Pairs of two different subjects with comparable labels (no point-wise truth):

    * MNI152 (fixed, a 152-subject average) vs Colin27 (moving, one subject), grey / white
      matter. MNI152's come from its probability maps; Colin27's from a 3-class Otsu of T1
      intensity inside MRIcron's brain mask ``ch2bet``. Both are in MNI space, so the pair
      starts roughly aligned, as after a rigid pre-alignment.
    """
    pairs = []
    try:
        mni = load_source("mni152", spacing_mm)
        colin = load_source("colin27", spacing_mm)
    except SourceMissing as exc:
        print(f"skipped cross-subject pair: {exc}", file=sys.stderr)
        return pairs
    colin_tissue = brain_tissue_labels(colin.image, colin27_brain_mask(spacing_mm))
    pairs.append(Pair("mni152 vs colin27", mni.image, colin.image, mni.labels, colin_tissue,
                      {1: "grey matter", 2: "white matter"}, "cross-subject", None, "MR",
                      f"{mni.licence}; {colin.licence}"))
    return pairs


def benchmark_pairs(seeds: Sequence[int] = (0, 1), brain_spacing_mm: float = 2.0,
                    head_ct_spacing_mm: float = 2.0, verbose: bool = True) -> List[Pair]:
    """Every installed source under known transforms (``seeds``) plus the cross-subject pairs.
    1 mm brains and the sub-millimetre head CT are resampled to the given spacings for speed;
    the chest CT and ITK head stay native."""
    spacing = {"mni152": brain_spacing_mm, "colin27": brain_spacing_mm, "invesalius_head_ct": head_ct_spacing_mm}
    pairs = []
    for name in available_sources(verbose=verbose):
        pairs += known_transform_pairs(load_source(name, spacing.get(name)), seeds)
    return pairs + cross_subject_pairs(brain_spacing_mm)


if __name__ == "__main__":
    for name in SOURCES:
        try:
            s = load_source(name)
        except SourceMissing as exc:
            print(f"{name:20s} MISSING: {exc}")
            continue
        print(f"{name:20s} {s.modality} size {s.image.GetSize()} spacing "
              f"{tuple(round(v, 2) for v in s.image.GetSpacing())} labels {len(s.label_names)}  [{s.licence}]")
    for p in cross_subject_pairs():
        print(f"cross-subject: {p.name}, fixed {p.fixed.GetSize()}, moving {p.moving.GetSize()}")
