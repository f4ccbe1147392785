"""Render the README / Extension Manager screenshots with Slicer's own slice logic
(slicer-core, offscreen): Match pair on the sample CT pair, the warped overlay, the
deformable transform's grid (Slicer's 2D transform visualisation) and a heatmap.

    python Resources/Screenshots/render_screenshots.py [--checkpoint CKPT]
"""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "GVSLModule"))

from gvsl.conventions import lps_to_ras  # noqa: E402
from GVSLModuleLib import mrml_io  # noqa: E402
from GVSLModuleLib.logic import GVSLLogic  # noqa: E402


class SliceView:
    """One offscreen slice view: Slicer's slice logic blends the layers into RGBA."""

    def __init__(self, scene, app_logic, name, orientation, size=400):
        self.node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        self.node.SetLayoutName(name)
        self.node.SetOrientation(orientation)
        self.node.SetDimensions(size, size, 1)
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        self.logic.SetMRMLScene(scene)
        self.logic.SetSliceNode(self.node)
        self.composite = self.logic.GetSliceCompositeNode()

    def show(self, background, foreground=None, opacity=0.5, center_ras=None):
        self.composite.SetBackgroundVolumeID(background.GetID())
        self.composite.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        self.composite.SetForegroundOpacity(opacity if foreground else 0.0)
        self.logic.FitSliceToAll()
        if center_ras is not None:
            self.node.JumpSliceByCentering(*center_ras)
        self.logic.UpdatePipeline()
        producer = self.logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        w, h, _ = image.GetDimensions()
        rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
        return rgba[::-1, :, :3]  # VTK rows start at the bottom

    def ras_to_pixel(self, points_ras):
        xy_to_ras = vtk.vtkMatrix4x4()
        xy_to_ras.DeepCopy(self.node.GetXYToRAS())
        xy_to_ras.Invert()
        m = mrml_io._np_matrix(xy_to_ras)
        xy = (m @ np.c_[np.atleast_2d(points_ras), np.ones(len(np.atleast_2d(points_ras)))].T).T
        h = self.node.GetDimensions()[1]
        return xy[:, 0], h - 1 - xy[:, 1]

    def transform_grid(self, transform_node):
        display = mrml_io.ensure_display(transform_node)
        display.SetVisualizationMode(display.VIS_MODE_GRID)
        display.SetGridSpacingMm(12.0)
        polydata = vtk.vtkPolyData()
        slicer.vtkSlicerTransformLogic.GetVisualization2d(polydata, display, self.node)
        points = numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()) if polydata.GetPoints() else np.zeros((0, 3))
        lines = []
        cells = polydata.GetLines()
        cells.InitTraversal()
        ids = vtk.vtkIdList()
        while cells.GetNextCell(ids):
            lines.append([ids.GetId(i) for i in range(ids.GetNumberOfIds())])
        return points, lines


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)
    from gvsl.samples import chest_ct, deformed_copy, random_deformation

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkMRMLApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkMRMLColorLogic()  # must stay alive: it owns the colour tables
    color_logic.SetMRMLScene(scene)
    ct, labels, names = chest_ct()
    twin, twin_labels = deformed_copy(ct, labels, random_deformation(ct, seed=7))
    fixed = mrml_io.update_volume_from_image(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT deformed"), twin)
    moving = mrml_io.update_volume_from_image(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT"), ct)
    for node in (fixed, moving):
        display = mrml_io.ensure_display(node)
        display.AutoWindowLevelOff()
        display.SetWindowLevel(1400, -300)
    logic = GVSLLogic(scene)
    result = logic.matchPair(fixed, moving, checkpoint=args.checkpoint, device="cpu", preset="ct")
    warped_display = mrml_io.ensure_display(result.warpedVolumeNode)
    warped_display.AutoWindowLevelOff()
    warped_display.SetWindowLevel(1400, -300)

    import SimpleITK as sitk
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(twin_labels)
    query_lps = np.asarray(stats.GetCentroid(3))  # thoracic vertebral column
    query_ras = lps_to_ras(query_lps)

    views = {o: SliceView(scene, app_logic, n, o) for n, o in (("Red", "Axial"), ("Green", "Coronal"))}
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4))
    for row, (orientation, view) in enumerate(views.items()):
        axes[row, 0].imshow(view.show(fixed, center_ras=query_ras))
        axes[row, 0].set_title(f"fixed: CT deformed ({orientation.lower()})")
        axes[row, 1].imshow(view.show(fixed, result.warpedVolumeNode, 0.5, center_ras=query_ras))
        axes[row, 1].set_title("fixed + warped moving (50 %)")
        axes[row, 2].imshow(view.show(result.warpedVolumeNode, center_ras=query_ras))
        points, lines = view.transform_grid(result.deformableTransformNode)
        if len(points):
            u, v = view.ras_to_pixel(points)
            for line in lines:
                axes[row, 2].plot(u[line], v[line], color="yellow", lw=0.6)
        axes[row, 2].set_title("warped + deformable grid")
    m = result.metrics
    fig.suptitle(f"GVSL Match pair in 3D Slicer's slice views — local NCC {m['local_ncc_before']:.3f} → "
                 f"{m['local_ncc_after']:.3f}, folding {100 * m['folding_fraction']:.2f} %")
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(Path(args.out) / "match_pair.png", dpi=72)
    plt.close(fig)

    heatmap, best = logic.similarityHeatmap(query_ras, fixed)
    fig, axes = plt.subplots(2, 2, figsize=(8.4, 8.4))
    for row, (orientation, view) in enumerate(views.items()):
        axes[row, 0].imshow(view.show(fixed, center_ras=query_ras))
        axes[row, 0].plot(*view.ras_to_pixel(query_ras), "c+", ms=16, mew=2)
        axes[row, 0].set_title(f"query point on fixed ({orientation.lower()})")
        axes[row, 1].imshow(view.show(moving, heatmap, 0.5, center_ras=best))
        axes[row, 1].plot(*view.ras_to_pixel(best), "w+", ms=16, mew=2)
        axes[row, 1].set_title(f"similarity heatmap on moving, best {heatmap.GetAttribute('GVSL.bestSimilarity')}")
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(Path(args.out) / "heatmap.png", dpi=72)
    plt.close(fig)
    print("wrote", Path(args.out) / "match_pair.png", Path(args.out) / "heatmap.png")


if __name__ == "__main__":
    main()
