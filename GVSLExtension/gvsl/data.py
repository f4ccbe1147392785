"""Reading, checking, normalising and resampling volumes; the pre-training pair sampler.

SimpleITK does the reading (any format it knows, DICOM series folders) and the
resampling; the geometry conventions are those of :mod:`gvsl.conventions`.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .conventions import Grid, transform_points, working_grid

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
PRESETS = ("ct", "mr", "auto")
CACHE_VERSION = 1


MIN_VOXELS_PER_AXIS = 4  # fewer holds no 3D structure (and nothing for a 9^3 NCC window)
MAX_SPACING_RATIO = 10.0  # thicker slices than this are warned about: isotropic resampling invents them
MIN_WORKING_VOXELS = 4  # an image must span this many voxels of the working grid along each axis


class InputError(ValueError):
    """Unusable input; the message names the file and the problem."""


class InputWarning(UserWarning):
    """Usable input whose results deserve doubt; the message names the file and why."""


def warn_input(message: str):
    warnings.warn(message, InputWarning, stacklevel=3)


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in VOLUME_SUFFIXES) and not name.endswith(".seg.nrrd")


def _dicom_series(folder: Path) -> List[str]:
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    except RuntimeError:
        return []


DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # .IMA: Siemens


def _is_dicom_file(path: Path) -> bool:
    """A DICOM file by its name or, for names like UIDs (``1.2.840...``) or none, by the
    ``DICM`` marker after its 128-byte preamble."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    if is_volume_file(path) or path.name.startswith("."):
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _has_dicom_files(folder: Path, files: Sequence[str], probe: int = 32) -> bool:
    candidates = [f for f in files if not is_volume_file(folder / f)]
    return any(_is_dicom_file(folder / f) for f in candidates[:probe])


def dicom_series_table(folder) -> List[Tuple[str, str, int]]:
    """(series UID, description, number of files) of every DICOM series in ``folder``."""
    table = []
    for uid in _dicom_series(Path(folder)):
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        description = ""
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(names[0])
            reader.ReadImageInformation()
            for key in ("0008|103e", "0020|0011"):  # series description, series number
                if reader.HasMetaDataKey(key) and reader.GetMetaData(key).strip():
                    description = reader.GetMetaData(key).strip()
                    description = description if key == "0008|103e" else f"series {description}"
                    break
        except (RuntimeError, IndexError):
            pass
        table.append((uid, description, len(names)))
    return table


def _describe_series(folder, table) -> str:
    return "; ".join(f"{folder}::{uid} ({description or 'no description'}, {count} files)"
                     for uid, description, count in table)


def single_series(path) -> str:
    """``path`` itself, or for a DICOM folder ``folder::series_uid`` of its one series. A
    folder of several series is refused with their list: taking the first would silently
    match or segment the wrong scan."""
    path = str(path)
    if "::" in path or not os.path.isdir(path):
        return path
    table = dicom_series_table(path)
    if not table:
        raise InputError(f"{path}: folder holds no DICOM series")
    if len(table) > 1:
        raise InputError(f"{path}: holds {len(table)} DICOM series; choose one by giving FOLDER::SERIES_UID "
                         f"instead of the folder: {_describe_series(path, table)}")
    return f"{path}::{table[0][0]}"


def find_volumes(source) -> List[str]:
    """Volumes under a folder (recursive; DICOM series folders count as one volume per
    series, written ``folder::series_uid``) or listed in a text file (one path a line,
    relative paths taken from the file's folder, ``#`` comments)."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if source.is_file():
        if is_volume_file(source):
            return [str(source)]
        found = []
        for line in source.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                p = Path(line)
                found.append(str(p if p.is_absolute() else source.parent / p))
        return found
    found = []
    for folder, _dirs, files in sorted(os.walk(source)):
        folder = Path(folder)
        found += [str(folder / f) for f in sorted(files) if is_volume_file(folder / f)]
        if _has_dicom_files(folder, files):
            found += [f"{folder}::{uid}" for uid in _dicom_series(folder)]
    return found


def read_image(path, check: bool = True) -> sitk.Image:
    """Read one volume (file or DICOM series) and, with ``check``, refuse it unless it is a
    usable 3D scalar volume (label maps skip the intensity checks). Raises
    :class:`InputError` naming the file."""
    path = str(path)
    try:
        if "::" in path:
            folder, uid = path.split("::", 1)
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid) if os.path.isdir(folder) else ()
            if not names:
                table = dicom_series_table(folder) if os.path.isdir(folder) else []
                raise InputError(f"{path}: no DICOM series {uid!r} in {folder}"
                                 f"{'; it holds ' + _describe_series(folder, table) if table else ''}")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(names)
            image = reader.Execute()
        elif os.path.isdir(path):
            return read_image(single_series(path), check)
        else:
            if not os.path.exists(path):
                raise InputError(f"{path}: file not found")
            image = sitk.ReadImage(path)
            check_complete(path)
            if path.lower().endswith(NIFTI_SUFFIXES) and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) \
                    and not sitk.GetArrayViewFromImage(image).all():  # ITK reads NaN as 0: look for them
                nan = nifti_nan_mask(path)
                if nan is not None and nan.size == image.GetNumberOfPixels():
                    array = sitk.GetArrayFromImage(image)
                    array.reshape(-1)[nan] = np.nan  # as the file says, for check_image to judge
                    restored = sitk.GetImageFromArray(array, isVector=False)
                    restored.CopyInformation(image)
                    image = restored
    except InputError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        reason = next((ln for ln in first if "Description" in ln or "ERROR" in ln), first[-1] if first else "")
        raise InputError(f"{path}: unreadable ({reason.strip()[:200]})") from None
    return check_image(image, path) if check else image


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nifti_declared_bytes(header: bytes) -> Optional[int]:
    """vox_offset + voxel bytes that a NIfTI-1 or NIfTI-2 header declares (None if not NIfTI)."""
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = max(int(struct.unpack(order + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = max(struct.unpack(order + "q", header[168:176])[0], 544)
            break
    else:
        return None
    count = int(np.prod([max(int(d), 1) for d in dims[1:1 + max(1, min(int(dims[0]), 7))]], dtype=np.int64))
    return offset + count * max(int(bitpix), 8) // 8


def _gzip_length(path: str) -> int:
    """Bytes a .gz file decompresses to; a stream cut short stops counting where it ends."""
    total = 0
    with open(path, "rb") as raw:
        decompressor = zlib.decompressobj(wbits=31)
        while True:
            chunk = raw.read(1 << 20)
            if not chunk:
                return total if decompressor.eof else -(total + 1)  # negative: no end-of-stream marker
            data = decompressor.decompress(chunk)
            total += len(data)
            while decompressor.eof and decompressor.unused_data:  # concatenated gzip members
                rest = decompressor.unused_data
                decompressor = zlib.decompressobj(wbits=31)
                total += len(decompressor.decompress(rest))


def nifti_shortfall(path: str, require_header: bool = False) -> Optional[str]:
    """Why a NIfTI file holds less than its header declares, or None if it is complete.
    Costs one 4-byte read for a complete .nii.gz (the gzip trailer's length); only a
    suspect file is decompressed to count. ``require_header``: an unparseable header is a
    shortfall too (for files we just wrote)."""
    compressed = path.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            declared = _nifti_declared_bytes(handle.read(544))
    except (OSError, EOFError, zlib.error):
        declared = None
    if declared is None:
        return "the NIfTI header is missing or cut" if require_header else None
    if compressed:
        with open(path, "rb") as raw:
            raw.seek(-4, os.SEEK_END)
            trailer = struct.unpack("<I", raw.read(4))[0]
        if trailer == declared % (1 << 32):
            return None
        present = _gzip_length(path)
        cut = present < 0
        present = abs(present + 1) if cut else present
    else:
        present, cut = os.path.getsize(path), False
    if cut or present < declared:
        return (f"the header declares {declared} bytes, the file holds {present}"
                f"{' and its compressed stream ends early' if cut else ''}")
    return None


def nifti_nan_mask(path: str) -> Optional[np.ndarray]:
    """Where a float NIfTI file holds NaN (flat, in file order = ITK's buffer order), or None
    when it holds none or is not a float NIfTI. ITK's NIfTI reader turns NaN into 0, so
    without this an all-NaN volume reads as "every voxel is 0" and holes become zeros."""
    compressed = path.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            header = handle.read(544)
            for order in ("<", ">"):
                if struct.unpack(order + "i", header[:4])[0] == 348:
                    datatype = struct.unpack(order + "h", header[70:72])[0]
                    offset = max(int(struct.unpack(order + "f", header[108:112])[0]), 352)
                    break
                if struct.unpack(order + "i", header[:4])[0] == 540:
                    datatype = struct.unpack(order + "h", header[12:14])[0]
                    offset = max(struct.unpack(order + "q", header[168:176])[0], 544)
                    break
            else:
                return None
            dtype = {16: "f4", 64: "f8"}.get(datatype)
            if dtype is None:
                return None
            handle.seek(offset)
            values = np.frombuffer(handle.read(), dtype=np.dtype(order + dtype))
    except (OSError, EOFError, zlib.error, struct.error):
        return None
    mask = np.isnan(values)
    return mask if mask.any() else None


def check_complete(path: str):
    """Compare what a NIfTI header declares with what the file holds. ITK reads a cut
    NIfTI file without an error and fills the missing part with zeros; other formats
    (NRRD, MetaImage) raise on their own."""
    if not path.lower().endswith(NIFTI_SUFFIXES):
        return
    shortfall = nifti_shortfall(path)
    if shortfall:
        raise InputError(f"{path}: truncated: {shortfall}; re-copy or re-export it")


def image_grid(path) -> "Grid":
    """The physical grid of an image file from its header only (nothing decompressed)."""
    path = str(path)
    if "::" in path or os.path.isdir(path):
        return Grid.of(read_image(path, check=False))
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path}: unreadable (its header cannot be parsed)") from None
    dim = reader.GetDimension()
    if dim < 3:
        raise InputError(f"{path}: is {dim}D; a 3D volume is needed")
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    return Grid(tuple(reader.GetOrigin()[:3]), tuple(reader.GetSpacing()[:3]),
                tuple(float(v) for v in direction.ravel()), tuple(reader.GetSize()[:3]))


def check_points(points: Sequence[dict], grids: dict, source: str = "points") -> List[dict]:
    """Query points ``{"point": [x, y, z], "image": "fixed"|"moving", "where": "row 3"}``:
    three finite LPS coordinates inside the image each is placed on (``grids`` maps
    "fixed"/"moving" to that image's :class:`Grid`). The error names the row or item."""
    checked = []
    for k, item in enumerate(points):
        where = f"{source} {item.get('where', f'item {k + 1}')}"
        image = item.get("image", "fixed")
        if image not in ("fixed", "moving"):
            raise InputError(f"{where}: image must be 'fixed' or 'moving', got {image!r}")
        try:
            point = np.asarray(item["point"], dtype=float).reshape(-1)
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: needs a point with 3 numbers x, y, z (LPS mm)") from None
        if point.size != 3:
            raise InputError(f"{where}: needs 3 coordinates x, y, z, got {point.size}")
        if not np.isfinite(point).all():
            raise InputError(f"{where}: coordinates {point.tolist()} are not all finite numbers")
        grid = grids.get(image) if grids else None
        if grid is not None:
            voxel = transform_points(grid.physical_to_voxel(), point[None])[0]  # (d, h, w)
            if not all(-0.5 <= voxel[a] <= grid.shape[a] - 0.5 for a in range(3)):
                corners = np.array([[d, h, w] for d in (0, grid.shape[0] - 1) for h in (0, grid.shape[1] - 1)
                                    for w in (0, grid.shape[2] - 1)], dtype=float)
                lps = transform_points(grid.voxel_to_physical(), corners)
                raise InputError(f"{where}: LPS point {np.round(point, 2).tolist()} mm lies outside the {image} "
                                 f"image (its voxel centres span {np.round(lps.min(0), 1).tolist()} to "
                                 f"{np.round(lps.max(0), 1).tolist()} mm)")
        checked.append({**item, "point": point.tolist(), "image": image})
    return checked


def check_image(image: sitk.Image, name: str = "<image>") -> sitk.Image:
    """Refuse 2D, 4D, multi-component, empty or NaN-filled volumes; replace sporadic NaNs."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         f"a scalar volume is needed")
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputError(f"{name}: is {dim}D (size {image.GetSize()}); a 3D volume is needed")
    size = image.GetSize()
    if min(size) < 2 or np.prod(size) == 0:
        raise InputError(f"{name}: is empty or a single slice (size {size}); a 3D volume is needed")
    if min(size) < MIN_VOXELS_PER_AXIS:
        raise InputError(f"{name}: is only {' x '.join(map(str, size))} voxels; at least {MIN_VOXELS_PER_AXIS} "
                         f"along each axis are needed to hold 3D structure")
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if spacing.min() <= 0 or not np.isfinite(spacing).all():
        raise InputError(f"{name}: has spacing {tuple(spacing)}; spacings must be positive")
    if spacing.max() / spacing.min() > MAX_SPACING_RATIO:
        warn_input(f"{name}: voxels are {' x '.join(f'{v:g}' for v in spacing)} mm "
                   f"({spacing.max() / spacing.min():.0f}:1); resampling to isotropic voxels interpolates "
                   f"across the {spacing.max():g}-mm gaps, so detail along that axis is invented")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.any():
            raise InputError(f"{name}: holds no finite value (NaN/inf everywhere)")
        if not finite.all():
            low = array[finite].min()
            warn_input(f"{name}: {int((~finite).sum())} of {finite.size} voxels are NaN or infinite; they are "
                       f"treated as the volume's minimum ({float(low):g})")
            fixed = np.where(finite, array, low).astype(array.dtype)
            clean = sitk.GetImageFromArray(fixed)
            clean.CopyInformation(image)
            image = clean
            array = fixed
    if array.dtype == np.float64:
        largest = float(np.abs(array).max())
        if largest > float(np.finfo(np.float32).max):
            raise InputError(f"{name}: values reach {largest:.3g}, beyond the float32 working type "
                             f"(+-3.4e38: they would become infinite); rescale the volume")
    if float(array.max()) == float(array.min()):
        raise InputError(f"{name}: is empty (every voxel is {float(array.min())})")
    return image


# Percentiles of a large volume come from an evenly strided sample of this many voxels: the
# 0.5-99.5 and 1 % points move by far less than a grey level, and a 512x512x600 CT is not
# sorted in full (2 s of a Match pair).
PERCENTILE_SAMPLE_VOXELS = 1 << 22


def _percentile_sample(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1)
    stride = max(1, flat.size // PERCENTILE_SAMPLE_VOXELS)
    return flat[::stride]


def resolve_preset(array: np.ndarray, preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"unknown intensity preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset != "auto":
        return preset
    # CT is stored in Hounsfield units: air at about -1000.
    return "ct" if float(np.percentile(_percentile_sample(array), 1)) < -500 else "mr"


def normalize_intensity(array: np.ndarray, preset: str) -> Tuple[np.ndarray, str]:
    """Map intensities to [0, 1]: ``ct`` clips HU to [-1024, 1024]; ``mr`` maps the
    0.5-99.5 percentiles. Returns (float32 array, the preset used)."""
    preset = resolve_preset(array, preset)
    out = np.array(array, dtype=np.float32, copy=True)
    # In place: a full-size CT is 0.6 GB per temporary.
    if preset == "ct":
        np.clip(out, -1024.0, 1024.0, out=out)
        out += 1024.0
        out *= 1.0 / 2048.0
    else:
        low, high = np.percentile(_percentile_sample(out), [0.5, 99.5])
        out -= np.float32(low)
        out *= np.float32(1.0 / max(high - low, 1e-6))
        np.clip(out, 0.0, 1.0, out=out)
    return out, preset


def intensity_window(array: np.ndarray, preset: str) -> Tuple[float, float, str]:
    """The (low, high) input range that :func:`normalize_intensity` maps to [0, 1], and the
    preset used."""
    preset = resolve_preset(array, preset)
    if preset == "ct":
        return -1024.0, 1024.0, preset
    low, high = np.percentile(_percentile_sample(array), [0.5, 99.5])
    return float(low), float(max(high, low + 1e-6)), preset


def normalized_image(image: sitk.Image, preset: str) -> Tuple[sitk.Image, str]:
    """:func:`normalize_intensity` of a SimpleITK image, as a float32 image on its grid. ITK's
    one-pass, multi-threaded window filter does it without the numpy round trip (two 0.6 GB
    copies of a 512x512x600 CT)."""
    low, high, used = intensity_window(sitk.GetArrayViewFromImage(image), preset)
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    out = sitk.IntensityWindowing(image, windowMinimum=low, windowMaximum=high, outputMinimum=0.0, outputMaximum=1.0)
    return out, used


def fitting_grid(images: Sequence[sitk.Image], spacing_mm: float = 1.0, max_size: Optional[int] = None,
                 multiple: int = 16, names: Optional[Sequence[str]] = None) -> List[Grid]:
    """Working grids (identity direction, isotropic) of one common size, each centred on
    its own image and covering the largest extent; spacing grows if ``max_size`` caps the
    size. Sizes are multiples of ``multiple`` so the U-Net needs no padding. An image that
    would span fewer than :data:`MIN_WORKING_VOXELS` working voxels along an axis is
    refused: what remains of it is a line or a sheet, and every measure on it is noise."""
    own_extents = [Grid.of(im).physical_extent() for im in images]
    extents = np.max(own_extents, axis=0)  # LPS mm (x, y, z)
    asked = spacing_mm
    if max_size is not None:
        spacing_mm = max(spacing_mm, float(extents.max()) / max_size)

    def name_of(k):
        return names[k] if names else ("fixed image", "moving image")[k] if len(images) == 2 else f"image {k}"

    widest = int(np.argmax([float(np.max(e)) for e in own_extents]))
    for k, extent in enumerate(own_extents):
        if float(np.min(extent)) / spacing_mm < MIN_WORKING_VOXELS:
            message = (f"{name_of(k)}: covers {' x '.join(f'{e:.1f}' for e in extent)} mm, only "
                       f"{float(np.min(extent)) / spacing_mm:.1f} voxels across on the {spacing_mm:.2f}-mm "
                       f"isotropic working grid (at least {MIN_WORKING_VOXELS} are needed)")
            if spacing_mm > asked + 1e-9 and widest != k and \
                    float(np.min(extent)) / asked >= MIN_WORKING_VOXELS:
                # Not this image's fault: the other one's extent made the common grid this coarse.
                wide = own_extents[widest]
                raise InputError(f"{name_of(widest)}: spans {' x '.join(f'{e:.1f}' for e in wide)} mm, so the "
                                 f"working grid (at most {max_size} voxels a side) coarsens to {spacing_mm:.2f} mm, "
                                 f"on which {name_of(k)} ({' x '.join(f'{e:.1f}' for e in extent)} mm) is only "
                                 f"{float(np.min(extent)) / spacing_mm:.1f} voxels across (at least "
                                 f"{MIN_WORKING_VOXELS} are needed); check {name_of(widest)}'s spacing, or raise "
                                 f"--max-size")
            raise InputError(message + "; a volume this thin has no 3D structure to match (check its spacing)")
    size_xyz = np.ceil(extents / spacing_mm / multiple).astype(int) * multiple
    if max_size is not None:
        size_xyz = np.minimum(size_xyz, max(multiple, (max_size // multiple) * multiple))
    shape = (int(size_xyz[2]), int(size_xyz[1]), int(size_xyz[0]))
    return [working_grid(Grid.of(im).physical_bounds_center(), shape, spacing_mm) for im in images]


def resample_to(image: sitk.Image, grid: Grid, linear: bool = True, default: float = 0.0) -> sitk.Image:
    return sitk.Resample(image, grid.size, sitk.Transform(), sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                         grid.origin, grid.spacing, grid.direction, default, image.GetPixelID())


# ----------------------------------------------------------------------- pre-training


def cache_key(paths: Sequence[str], *parameters) -> str:
    """Names a cache entry after its input files' versions and the preprocessing parameters."""
    parts = []
    for path in paths:
        st = os.stat(path.split("::", 1)[0])
        parts += [os.path.abspath(path), st.st_mtime_ns, st.st_size]
    text = json.dumps(parts + list(parameters) + [CACHE_VERSION])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def write_cache_atomic(target: Path, write) -> Path:
    """``write(handle)`` into a temporary file beside ``target``, then rename: concurrent
    ranks or an interrupted run never leave a half-written cache entry."""
    from .safe_io import TEMP_PREFIX, ResultWriteError, write_failure_reason
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=target.suffix, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, target)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ResultWriteError(f"{target.parent}: cannot write the preprocessing cache "
                                   f"({write_failure_reason(exc, target.parent)}); free space or give "
                                   f"another --cache-dir") from None
        raise
    return target


def preprocess_volume(path: str, preset: str, spacing_mm: float) -> np.ndarray:
    """Read, normalise and resample one volume onto an isotropic identity-direction grid."""
    image, _ = normalized_image(read_image(path), preset)
    grid = fitting_grid([image], spacing_mm, max_size=None, multiple=1)[0]
    return sitk.GetArrayFromImage(resample_to(image, grid)).astype(np.float16)


def cached_volume(path: str, preset: str, spacing_mm: float, cache_dir) -> np.ndarray:
    """:func:`preprocess_volume` once per file version; later epochs and runs read the
    memory-mapped ``.npy`` from ``cache_dir``."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{cache_key([path], preset, spacing_mm)}.npy"
    if not target.exists():
        array = preprocess_volume(path, preset, spacing_mm)
        write_cache_atomic(target, lambda handle: np.save(handle, array))
    return np.load(target, mmap_mode="r")


@dataclass
class DatasetReport:
    used: List[str]
    skipped: List[str]  # "path: reason"


def load_training_volumes(source, preset: str, spacing_mm: float, cache_dir, log=print):
    """All usable volumes of ``source``; bad files are reported by name and skipped."""
    from .safe_io import ResultWriteError
    paths = find_volumes(source)
    arrays, used, skipped = [], [], []
    for path in paths:
        try:
            arrays.append(cached_volume(path, preset, spacing_mm, cache_dir))
            used.append(path)
        except (InputError, OSError) as exc:
            if isinstance(exc, ResultWriteError):
                raise  # the cache's disk, not this volume, is the problem
            message = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
            skipped.append(message)
            log(f"skipped {message}")
    if len(arrays) < 2:
        detail = ("; ".join(skipped[:5])) if skipped else "none found"
        raise InputError(f"{source}: pre-training needs at least 2 usable volumes, found {len(arrays)} "
                         f"({detail})")
    return arrays, DatasetReport(used, skipped)


class PairSampler:
    """Crops of two different volumes at the same relative position, so that both show
    roughly the same anatomy (the official code used whole pre-cropped volumes); the
    spatial augmentation then gives the Z-matching head its task. One RNG per rank."""

    def __init__(self, arrays: Sequence[np.ndarray], patch: Sequence[int], seed: int,
                 groups: Optional[Sequence[str]] = None):
        """``groups``: one label per array; when given, a pair's two volumes share a label
        (same body region). Labels held by a single volume give no pairs."""
        self.arrays = list(arrays)
        self.patch = tuple(int(p) for p in patch)
        self.rng = np.random.default_rng(seed)
        self.pair_pool = None
        if groups is not None:
            if len(groups) != len(self.arrays):
                raise ValueError(f"{len(groups)} group labels for {len(self.arrays)} volumes")
            members = {}
            for index, label in enumerate(groups):
                members.setdefault(label, []).append(index)
            self.pair_pool = [m for m in members.values() if len(m) >= 2]
            if not self.pair_pool:
                raise ValueError("no folder holds two training volumes, so no same-region pair can be drawn; "
                                 "put two volumes of one body region in one folder, or draw pairs from any two")

    def crop(self, array: np.ndarray, position: Sequence[float]) -> np.ndarray:
        """The patch at relative ``position`` (0..1 per axis) of ``array``."""
        out = np.zeros(self.patch, dtype=np.float32)
        src, dst = [], []
        for size, p, u in zip(array.shape, self.patch, position):
            if size >= p:
                s = int(round(u * (size - p)))
                src.append(slice(s, s + p))
                dst.append(slice(0, p))
            else:  # smaller than the patch: centre it, pad with background (0)
                o = (p - size) // 2
                src.append(slice(0, size))
                dst.append(slice(o, o + size))
        out[tuple(dst)] = array[tuple(src)]
        return out

    def sample(self, batch: int) -> Tuple[np.ndarray, np.ndarray]:
        """Two float32 arrays (batch, 1, *patch)."""
        a, b = [], []
        for _ in range(batch):
            if self.pair_pool is None:
                i, j = self.rng.choice(len(self.arrays), size=2, replace=False)
            else:
                pool = self.pair_pool[int(self.rng.integers(len(self.pair_pool)))]
                i, j = self.rng.choice(pool, size=2, replace=False)
            position = self.rng.random(3)
            a.append(self.crop(self.arrays[i], position))
            b.append(self.crop(self.arrays[j], position))
        return np.stack(a)[:, None], np.stack(b)[:, None]

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict):
        self.rng.bit_generator.state = state
