"""MRML <-> SimpleITK adapters. Imports only ``slicer`` (MRML), ``vtk``, numpy and
``gvsl``; no Qt, so pytest drives it on slicer-core.

Slicer stores geometry in RAS, ITK files and ``gvsl`` in LPS; the one conversion is
``gvsl.conventions.LPS_TO_RAS``. Transforms keep ITK's resampling direction, which
Slicer calls "transform from parent": a moving volume placed under them is aligned to
the fixed one.

No torch: ``gvsl.conventions`` imports torch, so the one LPS <-> RAS flip it defines is
repeated here (``Testing/test_slicer_panel.py`` checks that both agree). The panel builds
this library before it has offered to install torch, and importing a match result on the
main thread must not pay for importing torch.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # = gvsl.conventions.LPS_TO_RAS (its own inverse)
LPS_TO_RAS_4X4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def _np_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(volume_node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return _np_matrix(m)


def volume_to_image(volume_node, apply_parent: bool = True) -> sitk.Image:
    """A scalar volume node as a SimpleITK image with the same physical geometry (LPS).
    A linear parent transform is applied to the geometry (unless ``apply_parent`` is
    False: the volume in its own coordinates); a non-linear one is refused."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError(f"{volume_node.GetName() if volume_node is not None else 'the volume'}: "
                         f"the volume node holds no image data")
    matrix = ijk_to_ras(volume_node)
    parent = volume_node.GetParentTransformNode() if apply_parent else None
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(f"{volume_node.GetName()} is under the non-linear transform \"{parent.GetName()}\": "
                             f"harden it (Data module: right-click the volume, Harden transform) or move the "
                             f"volume out of that transform, then try again")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        matrix = _np_matrix(to_world) @ matrix
    lps = LPS_TO_RAS_4X4 @ matrix  # the flip is its own inverse
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    array = slicer.util.arrayFromVolume(volume_node)  # (K, J, I)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def _direction(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def set_geometry(volume_node, image: sitk.Image):
    """The volume node's IJK-to-RAS matrix from a SimpleITK image's (LPS) geometry."""
    lps = np.eye(4)
    lps[:3, :3] = _direction(image) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    volume_node.SetIJKToRASMatrix(_vtk_matrix(LPS_TO_RAS_4X4 @ lps))


def update_volume_from_image(volume_node, image: sitk.Image):
    """Copy voxels and geometry of a SimpleITK image into an existing volume node."""
    slicer.util.updateVolumeFromArray(volume_node, sitk.GetArrayViewFromImage(image))
    set_geometry(volume_node, image)
    return volume_node


def get_or_create(scene, class_name: str, name: str, key: str, tag: str):
    """The node of ``class_name`` tagged ``GVSL.<tag> = key``, created if absent: running
    again on the same pair updates nodes instead of adding new ones."""
    node = find_tagged(scene, class_name, key, tag)
    if node is not None:
        node.SetName(name)
        return node
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAttribute(f"GVSL.{tag}", key)
    return node


def find_tagged(scene, class_name: str, key: str, tag: str):
    """The node of ``class_name`` tagged ``GVSL.<tag> = key`` (see :func:`get_or_create`), or None."""
    return next((n for n in nodes_of_class(scene, class_name) if n.GetAttribute(f"GVSL.{tag}") == key), None)


def nodes_of_class(scene, class_name: str) -> List:
    """The scene's nodes of ``class_name`` (and its subclasses)."""
    collection = scene.GetNodesByClass(class_name)
    # GetNodesByClass hands over a new reference (Slicer's own util.getNodesByClass releases it too).
    collection.UnRegister(None)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


SLICER_COLD_TO_HOT_ID = "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"  # Slicer's ColorFiles/ColdToHotRainbow.txt


def cold_to_hot_colors(scene):
    """A colour table from dark blue (low) through cyan, yellow and red to dark red (high):
    Slicer's ColdToHotRainbow where the scene has it (Slicer's colour logic loads it), else
    the same ramp (the "jet" formula that table follows) as a user table of this scene,
    created once. A bare MRML scene (slicer-core, the browser front end) has no file-based
    tables, and its built-in Rainbow runs from red (low) to purple (high): the best match
    showed purple, the rest red."""
    slicer_table = scene.GetNodeByID(SLICER_COLD_TO_HOT_ID)
    if slicer_table is not None:
        return slicer_table
    table = get_or_create(scene, "vtkMRMLColorTableNode", "GVSL cold to hot", "coldToHot", "colors")
    if table.GetNumberOfColors() != 256:
        was_modifying = table.StartModify()  # one Modified event, not 256
        table.SetTypeToUser()
        table.SetNumberOfColors(256)
        for entry in range(256):
            x = entry / 255.0
            r, g, b = (float(np.clip(1.5 - abs(4.0 * x - centre), 0.0, 1.0)) for centre in (3.0, 2.0, 1.0))
            table.SetColor(entry, r, g, b, 1.0)
        table.EndModify(was_modifying)
    return table


def ensure_display(node):
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node.GetDisplayNode()


# ----------------------------------------------------------------- transforms


def set_linear_from_parent(transform_node, matrix_lps: np.ndarray):
    """Store an ITK-convention (fixed -> moving, LPS) affine as the node's transform from parent."""
    transform_node.SetMatrixTransformFromParent(_vtk_matrix(LPS_TO_RAS_4X4 @ matrix_lps @ LPS_TO_RAS_4X4))


def set_grid_from_parent(transform_node, displacement_lps: sitk.Image):
    """Store an ITK displacement field (LPS vectors, resampling direction) as the grid
    transform node's transform from parent."""
    vectors = sitk.GetArrayViewFromImage(displacement_lps).astype(np.float64)  # a copy
    vectors[..., :2] *= -1.0  # @ LPS_TO_RAS.T, without a matrix product over millions of vectors
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*displacement_lps.GetSize())
    image_data.SetSpacing(*displacement_lps.GetSpacing())
    image_data.SetOrigin(*(LPS_TO_RAS @ np.asarray(displacement_lps.GetOrigin())))
    from vtk.util import numpy_support
    flat = np.ascontiguousarray(vectors.reshape(-1, 3))
    array = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_DOUBLE)
    array.SetNumberOfComponents(3)
    image_data.GetPointData().SetScalars(array)
    direction = vtk.vtkMatrix4x4()
    ras_direction = LPS_TO_RAS @ _direction(displacement_lps)
    for r in range(3):
        for c in range(3):
            direction.SetElement(r, c, float(ras_direction[r, c]))
    grid_transform = slicer.vtkOrientedGridTransform()
    grid_transform.SetDisplacementGridData(image_data)
    grid_transform.SetGridDirectionMatrix(direction)
    grid_transform.SetInterpolationModeToLinear()
    transform_node.SetAndObserveTransformFromParent(grid_transform)


def transform_points_from_world(transform_node, points_ras: np.ndarray) -> np.ndarray:
    """Map world (fixed, RAS) points into the node's local (moving) coordinates."""
    general = vtk.vtkGeneralTransform()
    transform_node.GetTransformFromWorld(general)
    return np.array([general.TransformPoint(*map(float, p)) for p in np.atleast_2d(points_ras)])


# ---------------------------------------------------------------- segmentations


def segmentation_to_labelmap(scene, segmentation_node, reference_volume_node) -> tuple:
    """(label map as sitk image on the reference volume's grid, segment names in label order)."""
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    names = [segmentation.GetSegment(i).GetName() for i in ids]
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gvsl_temp__")
    # The export adds a "<segmentation>_ColorTable" node for the label map: removed with it.
    colors_before = {n.GetID() for n in nodes_of_class(scene, "vtkMRMLColorNode")}
    try:
        id_array = vtk.vtkStringArray()
        for i in ids:
            id_array.InsertNextValue(i)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, id_array, labelmap, reference_volume_node)
        if not ok:
            raise ValueError(f"{segmentation_node.GetName()}: could not export segments to a label map")
        image = volume_to_image(labelmap)
    finally:
        scene.RemoveNode(labelmap)
        for node in nodes_of_class(scene, "vtkMRMLColorNode"):
            if node.GetID() not in colors_before:
                scene.RemoveNode(node)
    return sitk.Cast(image, sitk.sitkUInt8), names


def labelmap_to_segmentation(scene, label_image: sitk.Image, names: Sequence[str], segmentation_node):
    """Replace the segments of ``segmentation_node`` by the labels 1..K of ``label_image``,
    named ``names[k-1]``."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__gvsl_temp__")
    try:
        update_volume_from_image(labelmap, sitk.Cast(label_image, sitk.sitkUInt8))
        segmentation_node.GetSegmentation().RemoveAllSegments()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node)
        segmentation = segmentation_node.GetSegmentation()
        present = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label_image)) if v > 0]
        for index, label in enumerate(present):
            segment = segmentation.GetSegment(segmentation.GetNthSegmentID(index))
            segment.SetName(names[label - 1] if label - 1 < len(names) else f"label {label}")
    finally:
        scene.RemoveNode(labelmap)
    return segmentation_node
