"""GVSL logic on a MRML scene: Match pair, similarity heatmaps, training jobs and
segmentation import/export. No Qt: ``GVSLLogic(scene)`` runs under pytest on slicer-core
and inside Slicer alike.

Transforms created by Match pair (see ``gvsl.conventions`` for directions):

* ``affineTransformNode`` (linear): the global part of the mapping.
* ``deformableTransformNode`` (grid), a child of the affine node, holding the local rest:
  a moving volume placed under it (so under both) is aligned to the fixed volume.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from gvsl.conventions import Grid, lps_to_ras, ras_to_lps
from gvsl.match import MatchResult, match_pair

from . import mrml_io
from .jobs import GVSLJob

# Slicer's ColdToHotRainbow table; a bare MRML scene (slicer-core) only has the built-in Rainbow.
HEATMAP_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileColdToHotRainbow.txt", "vtkMRMLColorTableNodeRainbow")
MAX_RESIDUAL_FIELD_VOXELS = 1 << 22  # 4 M voxels: the grid transform stays light in Slicer
# Above this many voxels the heatmap stays on the (physical, coarser) working grid, so
# that dragging the query point stays interactive on full-resolution CTs.
MAX_HEATMAP_IMAGE_VOXELS = 1 << 24


@dataclass
class MatchPairResult:
    affineTransformNode: object
    deformableTransformNode: object
    warpedVolumeNode: object
    jacobianVolumeNode: object
    metrics: dict
    engineResult: MatchResult = None


@dataclass
class _LastMatch:
    result: MatchResult
    fixedNodeID: str
    movingNodeID: str


def residual_displacement(result: MatchResult, max_voxels: int = MAX_RESIDUAL_FIELD_VOXELS) -> sitk.Image:
    """The local part of the mapping on the moving image's grid (LPS mm):
    ``r(y) = T(P^-1 y) - y`` so that ``T = (id + r) o P`` with P the affine part."""
    grid = Grid.of(result.moving).coarsened(max_voxels)
    affine = result.physical_affine_matrix()
    inverse = np.linalg.inv(affine)
    y = grid.physical_points()
    x = y @ inverse[:3, :3].T + inverse[:3, 3]
    residual = result.map_points(x) - y
    image = sitk.GetImageFromArray(residual.reshape(*grid.shape, 3), isVector=True)
    return grid.apply_to(image)


class GVSLLogic:
    """All GVSL actions on ``scene`` (a ``vtkMRMLScene``)."""

    def __init__(self, scene):
        self.scene = scene
        self.lastMatch: Optional[_LastMatch] = None

    # -------------------------------------------------------------- match pair
    def matchPair(self, fixedVolumeNode, movingVolumeNode, checkpoint=None, device="auto", preset="auto",
                  progress=None) -> MatchPairResult:
        """Run the network in this process and put its answer in the scene."""
        fixed = mrml_io.volume_to_image(fixedVolumeNode)
        moving = mrml_io.volume_to_image(movingVolumeNode)
        result = match_pair(fixed, moving, checkpoint, device=device, preset=preset, progress=progress)
        return self.importMatchResult(result, fixedVolumeNode, movingVolumeNode)

    def writeMatchInputs(self, fixedVolumeNode, movingVolumeNode, folder) -> Tuple[str, str]:
        """The pair as files for a background ``gvsl match`` child process."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = str(folder / "fixed.nrrd"), str(folder / "moving.nrrd")
        sitk.WriteImage(mrml_io.volume_to_image(fixedVolumeNode), paths[0])
        sitk.WriteImage(mrml_io.volume_to_image(movingVolumeNode), paths[1])
        return paths

    def matchJob(self, fixedVolumeNode, movingVolumeNode, checkpoint=None, device="auto", preset="auto",
                 workFolder=None) -> Tuple[GVSLJob, str]:
        """A not yet started child process that matches the pair into ``workFolder``."""
        folder = Path(workFolder or tempfile.mkdtemp(prefix="gvsl-match-"))
        fixed_path, moving_path = self.writeMatchInputs(fixedVolumeNode, movingVolumeNode, folder / "inputs")
        args = ["match", fixed_path, moving_path, "--out", folder / "result", "--device", device, "--preset", preset,
                "--save-state", "--no-report"]
        if checkpoint:
            args += ["--checkpoint", checkpoint]
        return GVSLJob(args), str(folder / "result")

    def importMatchFolder(self, folder, fixedVolumeNode, movingVolumeNode) -> MatchPairResult:
        result = MatchResult.load_state(folder, mrml_io.volume_to_image(fixedVolumeNode),
                                        mrml_io.volume_to_image(movingVolumeNode))
        return self.importMatchResult(result, fixedVolumeNode, movingVolumeNode)

    def importMatchResult(self, result: MatchResult, fixedVolumeNode, movingVolumeNode) -> MatchPairResult:
        """Create (or update, for the same pair) the transform, warped and Jacobian nodes."""
        key = f"{fixedVolumeNode.GetID()}|{movingVolumeNode.GetID()}"
        moving_name, fixed_name = movingVolumeNode.GetName(), fixedVolumeNode.GetName()
        affine_node = mrml_io.get_or_create(self.scene, "vtkMRMLLinearTransformNode",
                                            f"GVSL affine {moving_name} to {fixed_name}", key, "affine")
        mrml_io.set_linear_from_parent(affine_node, result.physical_affine_matrix())
        grid_node = mrml_io.get_or_create(self.scene, "vtkMRMLGridTransformNode",
                                          f"GVSL deformable {moving_name} to {fixed_name}", key, "deformable")
        mrml_io.set_grid_from_parent(grid_node, residual_displacement(result))
        grid_node.SetAndObserveTransformNodeID(affine_node.GetID())

        warped_node = mrml_io.get_or_create(self.scene, "vtkMRMLScalarVolumeNode", f"{moving_name} warped", key,
                                            "warped")
        mrml_io.update_volume_from_image(warped_node, result.warped)
        jacobian_node = mrml_io.get_or_create(self.scene, "vtkMRMLScalarVolumeNode",
                                              f"GVSL Jacobian {moving_name} to {fixed_name}", key, "jacobian")
        mrml_io.update_volume_from_image(jacobian_node, result.jacobian)
        for node in (warped_node, jacobian_node):
            mrml_io.ensure_display(node)
        display = jacobian_node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 2.0)
        self.lastMatch = _LastMatch(result, fixedVolumeNode.GetID(), movingVolumeNode.GetID())
        return MatchPairResult(affine_node, grid_node, warped_node, jacobian_node, dict(result.metrics), result)

    def mapFixedPointsToMoving(self, pointsRAS) -> np.ndarray:
        """What the engine says: fixed RAS points -> moving RAS points."""
        self._require_match()
        return lps_to_ras(self.lastMatch.result.map_points(ras_to_lps(pointsRAS)))

    # ----------------------------------------------------------------- heatmap
    def _require_match(self):
        if self.lastMatch is None:
            raise RuntimeError("run Match pair first: the heatmap uses its cached features")

    def similarityHeatmap(self, pointRAS, queryVolumeNode, heatmapNode=None):
        """Cosine similarity of the feature at ``pointRAS`` of ``queryVolumeNode`` with every
        voxel of the other volume of the last matched pair. Returns
        ``(heatmapVolumeNode, bestMatchRAS)``; the node has the other volume's geometry
        (its working grid's for volumes above ``MAX_HEATMAP_IMAGE_VOXELS``)."""
        self._require_match()
        last = self.lastMatch
        if queryVolumeNode.GetID() == last.fixedNodeID:
            source, target_id = "fixed", last.movingNodeID
        elif queryVolumeNode.GetID() == last.movingNodeID:
            source, target_id = "moving", last.fixedNodeID
        else:
            raise ValueError(f"{queryVolumeNode.GetName()} is not part of the last matched pair")
        target_image = last.result.moving if source == "fixed" else last.result.fixed
        on_image_grid = int(np.prod(target_image.GetSize())) <= MAX_HEATMAP_IMAGE_VOXELS
        image, best_lps, score = last.result.heatmap(ras_to_lps(pointRAS), source, on_image_grid=on_image_grid)
        if heatmapNode is None:
            heatmapNode = mrml_io.get_or_create(self.scene, "vtkMRMLScalarVolumeNode", "GVSL similarity heatmap",
                                                "heatmap", "heatmap")
        mrml_io.update_volume_from_image(heatmapNode, image)
        display = mrml_io.ensure_display(heatmapNode)
        color_id = next((i for i in HEATMAP_COLOR_NODE_IDS if self.scene.GetNodeByID(i)), HEATMAP_COLOR_NODE_IDS[0])
        display.SetAndObserveColorNodeID(color_id)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        heatmapNode.SetAttribute("GVSL.targetVolumeID", target_id)
        heatmapNode.SetAttribute("GVSL.bestSimilarity", f"{score:.4f}")
        return heatmapNode, lps_to_ras(best_lps)

    def updateBestMatchMarkup(self, bestMatchRAS, markupsNode=None):
        if markupsNode is None:
            markupsNode = mrml_io.get_or_create(self.scene, "vtkMRMLMarkupsFiducialNode", "GVSL best match",
                                                "bestmatch", "bestmatch")
        if markupsNode.GetNumberOfControlPoints() == 0:
            markupsNode.AddControlPoint(*map(float, bestMatchRAS))
        else:
            markupsNode.SetNthControlPointPosition(0, *map(float, bestMatchRAS))
        markupsNode.SetNthControlPointLabel(0, "best match")
        return markupsNode

    # ------------------------------------------------------------- training jobs
    @staticmethod
    def pretrainJob(dataFolder, outputFolder, patch=128, iterations=10000, batch=1, width=1.0, learningRate=1e-4,
                    device="auto", resume=False, extra: Sequence[str] = ()) -> GVSLJob:
        args = ["pretrain", "--data", dataFolder, "--out", outputFolder, "--patch", patch, "--iters", iterations,
                "--batch", batch, "--width", width, "--lr", learningRate, "--device", device, *extra]
        if resume:
            args.append("--resume")
        return GVSLJob(args)

    @staticmethod
    def finetuneJob(imagesFolder, labelsFolder, outputFolder, classNames: Sequence[str], init="scratch",
                    mode="full", patch=128, iterations=2000, batch=1, learningRate=1e-4, device="auto",
                    resume=False, extra: Sequence[str] = ()) -> GVSLJob:
        args = ["finetune", "--images", imagesFolder, "--labels", labelsFolder, "--out", outputFolder,
                "--init", init, "--mode", mode, "--classes", ",".join(classNames), "--patch", patch,
                "--iters", iterations, "--batch", batch, "--lr", learningRate, "--device", device, *extra]
        if resume:
            args.append("--resume")
        return GVSLJob(args)

    def exportVolumes(self, volumeNodes, folder) -> str:
        """Scene volumes as NRRD files, for a pre-training child process."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for k, node in enumerate(volumeNodes):
            sitk.WriteImage(mrml_io.volume_to_image(node), str(folder / f"{k:03d}_{_safe(node.GetName())}.nrrd"))
        return str(folder)

    # ------------------------------------------------------------ segmentations
    def segmentationToLabelmap(self, segmentationNode, referenceVolumeNode) -> Tuple[sitk.Image, List[str]]:
        """A segmentation node as a label map (1..K in segment order) on the reference
        volume's grid, with the segment names."""
        return mrml_io.segmentation_to_labelmap(self.scene, segmentationNode, referenceVolumeNode)

    def exportTrainingSet(self, pairs: Sequence[Tuple[object, object]], folder) -> Tuple[str, str, List[str]]:
        """(volume node, segmentation node) pairs as images/ and labels/ with one class list.
        Segments are matched across cases by name."""
        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        classes: List[str] = []
        for k, (volume_node, segmentation_node) in enumerate(pairs):
            labels, names = self.segmentationToLabelmap(segmentationNode=segmentation_node,
                                                        referenceVolumeNode=volume_node)
            for name in names:
                if name not in classes:
                    classes.append(name)
            lut = np.zeros(len(names) + 1, dtype=np.uint8)
            for i, name in enumerate(names, start=1):
                lut[i] = classes.index(name) + 1
            remapped = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(labels)])
            remapped.CopyInformation(labels)
            stem = f"case{k:03d}"
            sitk.WriteImage(mrml_io.volume_to_image(volume_node), str(folder / "images" / f"{stem}.nrrd"))
            sitk.WriteImage(remapped, str(folder / "labels" / f"{stem}.nrrd"))
        return str(folder / "images"), str(folder / "labels"), classes

    def labelmapToSegmentation(self, labelImage: sitk.Image, classNames: Sequence[str], name="GVSL segmentation",
                               segmentationNode=None):
        if segmentationNode is None:
            segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        mrml_io.labelmap_to_segmentation(self.scene, labelImage, classNames, segmentationNode)
        return segmentationNode

    def segmentVolume(self, volumeNode, checkpoint, device="auto", segmentationNode=None):
        """Segment in this process and return a segmentation node with named segments."""
        from gvsl.segment import Segmenter
        segmenter = Segmenter.load(checkpoint, device)
        labels = segmenter(mrml_io.volume_to_image(volumeNode))
        return self.labelmapToSegmentation(labels, segmenter.classes, f"{volumeNode.GetName()} GVSL segmentation",
                                           segmentationNode)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60]
