"""GVSL logic on a MRML scene: Match pair, similarity heatmaps, training jobs and
segmentation import/export. No Qt: ``GVSLLogic(scene)`` runs under pytest on slicer-core
and inside Slicer alike.

Transforms created by Match pair (see ``gvsl.conventions`` for directions):

* ``affineTransformNode`` (linear): the global part of the mapping.
* ``deformableTransformNode`` (grid), a child of the affine node, holding the local rest:
  a moving volume placed under it (so under both) is aligned to the fixed volume.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import vtk

from gvsl.stopfile import STOP_FILE_NAME  # torch-free

from . import mrml_io
from .jobs import GVSLJob

# The engine (torch, MONAI) is imported inside the methods that run it: the panel builds
# this logic before it has offered to install those packages.

MAX_RESIDUAL_FIELD_VOXELS = 1 << 22  # 4 M voxels: the grid transform stays light (= gvsl.match.RESIDUAL_MAX_VOXELS)
RESIDUAL_FILE = "residual_displacement.nrrd"  # = gvsl.match.RESIDUAL_FILE (gvsl.match imports torch)
PANEL_IMAGE_FILES = {"warped": "warped.nrrd", "jacobian": "jacobian.nrrd"}  # = gvsl.match.PANEL_IMAGE_FILES
# Above this many voxels the heatmap stays on the (physical, coarser) working grid, so
# that dragging the query point stays interactive on full-resolution CTs.
MAX_HEATMAP_IMAGE_VOXELS = 1 << 24
SAMPLE_DEFORMATION_SEED = 7  # the twin gvsl demo matches


def absolute_path(path) -> str:
    """A path the user typed, made absolute (``~`` expanded): the child runs in Slicer's working
    directory, which is ``/`` or the launcher's folder, not one the user chose."""
    return os.path.abspath(os.path.expanduser(str(path)))


@dataclass
class MatchPairResult:
    affineTransformNode: object
    deformableTransformNode: object
    warpedVolumeNode: object
    jacobianVolumeNode: object
    metrics: dict
    engineResult: "MatchResult" = None


class _LastMatch:
    """The engine's result of the last matched pair, for heatmaps and point mapping. A result
    imported from a ``gvsl match`` folder is loaded (torch, features) on first use only:
    importing the result on the main thread then shows the nodes without that cost."""

    def __init__(self, fixedNodeID: str, movingNodeID: str, result: "MatchResult" = None,
                 load: Optional[Callable[[], "MatchResult"]] = None):
        self.fixedNodeID, self.movingNodeID = fixedNodeID, movingNodeID
        self._result, self._load = result, load

    @property
    def loaded(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> "MatchResult":
        if self._result is None:
            self._result = self._load()
        return self._result


def residual_displacement(result: "MatchResult", max_voxels: int = MAX_RESIDUAL_FIELD_VOXELS) -> sitk.Image:
    """The local part of the mapping on the moving image's grid (see
    ``gvsl.match.MatchResult.residual_displacement``, which ``gvsl match`` writes)."""
    return result.residual_displacement(max_voxels)


GVSL_TRANSFORM_TAGS = ("GVSL.affine", "GVSL.deformable")


def gvsl_result_transform(volumeNode):
    """The first transform above ``volumeNode`` that Match pair made, or None."""
    node = volumeNode.GetParentTransformNode() if volumeNode is not None else None
    while node is not None:
        if any(node.GetAttribute(tag) for tag in GVSL_TRANSFORM_TAGS):
            return node
        node = node.GetParentTransformNode()
    return None


def match_input_image(volumeNode) -> Tuple[sitk.Image, Optional[str]]:
    """The volume as Match pair reads it, and a note for the user or None.

    A volume under a transform that Match pair made (the README's way to see the result:
    the moving volume under the deformable transform) is matched as it is, without its
    parent transforms: matching it again then matches the original volume, not one already
    moved by the previous answer. Any other linear parent transform is applied; any other
    non-linear one is refused with what to do (``mrml_io.volume_to_image``)."""
    own = gvsl_result_transform(volumeNode)
    if own is None:
        return mrml_io.volume_to_image(volumeNode), None
    return (mrml_io.volume_to_image(volumeNode, apply_parent=False),
            f"{volumeNode.GetName()} was matched without its parent transform \"{own.GetName()}\" "
            f"(a GVSL result)")


def match_options(refineIterations=None, similarity="lncc", timeBudgetSeconds=None, precision="auto",
                  refineDetail="full") -> Dict:
    """``match_pair`` keyword arguments for the refinement options the user changed from
    the engine's defaults (``refineIterations`` None: the default schedule, 0: network only;
    ``timeBudgetSeconds`` None or 0: no budget; ``refineDetail`` "full" or "fast", see
    ``gvsl.refine.DETAIL_MAX_VOXELS``)."""
    options = {}
    if refineIterations is not None and int(refineIterations) >= 0:
        options["refine_iters"] = int(refineIterations)
    if similarity and similarity != "lncc":
        options["similarity"] = similarity
    if timeBudgetSeconds:
        options["time_budget_s"] = float(timeBudgetSeconds)
    if precision and precision != "auto":
        options["precision"] = precision
    if refineDetail and refineDetail != "full":
        options["refine_detail"] = refineDetail
    return options


def match_arguments(fixedPath, movingPath, outputFolder, checkpoint=None, device="auto", preset="auto",
                    refineIterations=None, similarity="lncc", timeBudgetSeconds=None, precision="auto",
                    refineDetail="full") -> List[str]:
    """``gvsl match`` arguments for the panel's choices. Options left at the engine's default
    are not passed, so the command line stays the engine's own default."""
    args = ["match", str(fixedPath), str(movingPath), "--out", str(outputFolder), "--device", device,
            "--preset", preset, "--save-state", "--no-report"]
    if checkpoint:
        args += ["--checkpoint", str(checkpoint)]
    flags = {"refine_iters": "--refine-iters", "similarity": "--similarity", "time_budget_s": "--time-budget",
             "precision": "--precision", "refine_detail": "--refine-detail"}
    for key, value in match_options(refineIterations, similarity, timeBudgetSeconds, precision, refineDetail).items():
        args += [flags[key], str(value)]
    return args


def match_summary(metrics: Dict) -> str:
    """The panel's metrics text: local NCC before / affine / network / refined, refinement,
    folding and Jacobian, working grid. Works with and without refinement metrics."""
    ncc = [f"before {metrics['local_ncc_before']:.3f}", f"affine {metrics['local_ncc_affine']:.3f}"]
    refinement = metrics.get("refinement") or {}
    if "local_ncc_network" in metrics:
        ncc.append(f"network {metrics['local_ncc_network']:.3f}")
        if refinement.get("iterations"):
            ncc.append(f"refined {metrics['local_ncc_after']:.3f}")
    else:
        ncc.append(f"after {metrics['local_ncc_after']:.3f}")
    lines = ["local NCC  " + ",  ".join(ncc)]
    if refinement.get("iterations"):
        line = (f"refinement: {refinement['iterations']} iterations of {refinement.get('similarity', '?')} "
                f"in {refinement.get('seconds', 0.0):.1f} s")
        finest = [level["spacing_mm"] for level in refinement.get("levels", [])
                  if level.get("stage") == "deformable" and level.get("spacing_mm")]
        if finest:
            spacing = finest[-1]
            size = f"{spacing[0]:.2f}" if max(spacing) - min(spacing) < 0.005 else " x ".join(f"{v:.2f}" for v in spacing)
            stopped = refinement.get("stopped_by_time_budget") or refinement.get("stopped_by_request")
            line += f", {'last level reached' if stopped else 'finest level'} {size} mm"
            if refinement.get("detail"):
                detail = refinement["detail"]
                line += f" ({detail} detail)" if detail in ("full", "fast") else f" ({detail})"
        if refinement.get("improved") is False:
            line += " (did not improve: the network's field is kept)"
        lines.append(line)
    if refinement.get("stopped_by_request"):
        lines.append("stopped on request: this is the answer refinement had reached")
    if refinement.get("warning"):
        lines.append("warning: " + str(refinement["warning"]))
    lines.append(f"folding {100 * metrics['folding_fraction']:.3f} % of voxels, Jacobian "
                 f"[{metrics['jacobian_min']:.2f}, {metrics['jacobian_max']:.2f}]")
    grid = metrics.get("working_grid") or {}
    if grid:
        lines.append(f"working grid {grid.get('shape_dhw')} at {grid.get('spacing_mm', 0.0):.2f} mm on "
                     f"{metrics.get('device', '?')}")
    return "\n".join(lines)


def segment_arguments(imagePath, checkpoint, outputPath, device="auto") -> List[str]:
    return ["segment", str(imagePath), "--checkpoint", str(checkpoint), "--out", str(outputPath), "--device", device]


def read_class_names(classesPath) -> List[str]:
    """``gvsl segment``'s ``<out>_classes.txt``: one ``label name`` line per class, labels 1..K."""
    names = []
    for line in Path(classesPath).read_text(encoding="utf-8").splitlines():
        if line.strip():
            names.append(line.split(" ", 1)[1] if " " in line.strip() else "")
    return names


# Slice views of the heatmap: the query volume (where the user places the point) in Red,
# the other volume with the heatmap over it in every other slice view.
HEATMAP_QUERY_VIEW = "Red"


def heatmap_view_layers(viewNames: Sequence[str], queryVolumeID: str, targetVolumeID: str,
                        heatmapVolumeID: str) -> Dict[str, Tuple[str, Optional[str]]]:
    """``{view name: (background volume ID, foreground volume ID or None)}``."""
    return {name: (queryVolumeID, None) if name == HEATMAP_QUERY_VIEW else (targetVolumeID, heatmapVolumeID)
            for name in viewNames}


SAMPLE_NAMES = ("GVSLChestCT", "GVSLChestCTDeformed")
SAMPLE_FILE_NAMES = {name: f"{name}.nrrd" for name in SAMPLE_NAMES}  # the SampleData entries' fileNames


def missing_sample_files(folder) -> List[str]:
    """The sample names whose file is not in ``folder`` (Slicer's remote cache directory)."""
    return [name for name in SAMPLE_NAMES if not (Path(folder) / SAMPLE_FILE_NAMES[name]).is_file()
            or (Path(folder) / SAMPLE_FILE_NAMES[name]).stat().st_size == 0]


def write_sample_files(folder) -> List[str]:
    """Generate both samples into ``folder`` under their SampleData file names. Written into
    Slicer's remote cache directory, ``SampleData.downloadSample(name)`` finds the file there
    and loads it instead of fetching the placeholder uri (SampleDataLogic.downloadFile skips
    the download of a non-empty cached file when no checksum is given, Slicer 5.6 to 5.10).
    Each file is written under a temporary name and renamed, so a reader never sees half."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in sample_images().items():
        path = folder / SAMPLE_FILE_NAMES[name]
        partial = folder / f".{path.name}.partial.nrrd"
        sitk.WriteImage(image, str(partial))
        partial.replace(path)
        paths.append(str(path))
    return paths


def sample_images() -> Dict[str, sitk.Image]:
    """slicerio's chest CT and the twin ``gvsl demo`` matches, by sample name."""
    from gvsl.samples import chest_ct, deformed_copy, random_deformation
    ct, labels, _names = chest_ct()
    twin, _ = deformed_copy(ct, labels, random_deformation(ct, seed=SAMPLE_DEFORMATION_SEED))
    return dict(zip(SAMPLE_NAMES, (ct, twin)))


def is_training_volume(node) -> bool:
    """A plain scalar volume with voxels that GVSL did not make: no label maps or other
    subclasses (vector, tensor), no warped / Jacobian / heatmap volume of ours."""
    if node is None or node.GetClassName() != "vtkMRMLScalarVolumeNode" or node.GetImageData() is None:
        return False
    return not any(name.startswith("GVSL.") for name in node.GetAttributeNames() or ())


class GVSLLogic:
    """All GVSL actions on ``scene`` (a ``vtkMRMLScene``)."""

    def __init__(self, scene):
        self.scene = scene
        self.lastMatch: Optional[_LastMatch] = None
        self.lastMatchFolder: Optional[Path] = None  # what the last match's heatmaps read (state.npz)
        # Folders this logic made under the system's temporary directory, per job kind: each
        # holds a job's inputs and outputs (hundreds of MB for a CT pair) and goes once it is
        # no longer read (see removeTemporaryFolders).
        self.temporaryFolders: Dict[str, List[Path]] = {}

    def _temporaryFolder(self, kind: str) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=f"gvsl-{kind}-"))
        self.temporaryFolders.setdefault(kind, []).append(folder)
        return folder

    def removeTemporaryFolders(self, kind: Optional[str] = None, keepLastMatch: bool = True) -> List[str]:
        """Delete the temporary folders this logic made (of one job ``kind``, or all), except
        the one the last match's heatmaps still read from (unless ``keepLastMatch`` is False).
        Never call it for a kind whose job is running: its child writes there. Returns the
        folders removed; folders given by the caller (``workFolder``) are never touched."""
        removed = []
        for name in ([kind] if kind else list(self.temporaryFolders)):
            kept = []
            for folder in self.temporaryFolders.get(name, []):
                last = self.lastMatchFolder
                if keepLastMatch and last is not None and (last == folder or folder in last.parents):
                    kept.append(folder)
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(str(folder))
            self.temporaryFolders[name] = kept
        if not keepLastMatch and self.lastMatchFolder is not None and str(self.lastMatchFolder.parent) in removed:
            self.lastMatch, self.lastMatchFolder = None, None
        return removed

    # -------------------------------------------------------------- match pair
    def matchPair(self, fixedVolumeNode, movingVolumeNode, checkpoint=None, device="auto", preset="auto",
                  progress=None, refineIterations=None, similarity="lncc", timeBudgetSeconds=None,
                  precision="auto", refineDetail="full") -> MatchPairResult:
        """Run the network (and its refinement) in this process and put its answer in the scene."""
        from gvsl.match import match_pair
        fixed, _ = match_input_image(fixedVolumeNode)
        moving, _ = match_input_image(movingVolumeNode)
        options = match_options(refineIterations, similarity, timeBudgetSeconds, precision, refineDetail)
        result = match_pair(fixed, moving, checkpoint, device=device, preset=preset, progress=progress, **options)
        return self.importMatchResult(result, fixedVolumeNode, movingVolumeNode)

    def writeMatchInputs(self, fixedVolumeNode, movingVolumeNode, folder) -> Tuple[str, str]:
        """The pair as files for a background ``gvsl match`` child process."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = str(folder / "fixed.nrrd"), str(folder / "moving.nrrd")
        sitk.WriteImage(match_input_image(fixedVolumeNode)[0], paths[0])
        sitk.WriteImage(match_input_image(movingVolumeNode)[0], paths[1])
        return paths

    @staticmethod
    def matchInputNotes(fixedVolumeNode, movingVolumeNode) -> List[str]:
        """What the panel tells the user about how the pair is read (see :func:`match_input_image`)."""
        notes = []
        for node in (fixedVolumeNode, movingVolumeNode):
            own = gvsl_result_transform(node)
            if own is not None:
                notes.append(f"{node.GetName()} is matched without its parent transform \"{own.GetName()}\" "
                             f"(a GVSL result)")
        return notes

    def matchJob(self, fixedVolumeNode, movingVolumeNode, checkpoint=None, device="auto", preset="auto",
                 workFolder=None, refineIterations=None, similarity="lncc", timeBudgetSeconds=None,
                 precision="auto", refineDetail="full") -> Tuple[GVSLJob, str]:
        """A not yet started child process that matches the pair into ``workFolder``/result.
        Without ``workFolder`` a temporary folder; the earlier matches' temporary folders go,
        except the one the last match's heatmaps read (a panel runs one match at a time)."""
        if workFolder is None:
            self.removeTemporaryFolders("match")
        folder = Path(workFolder) if workFolder else self._temporaryFolder("match")
        fixed_path, moving_path = self.writeMatchInputs(fixedVolumeNode, movingVolumeNode, folder / "inputs")
        checkpoint = absolute_path(checkpoint) if checkpoint else checkpoint
        args = match_arguments(fixed_path, moving_path, folder / "result", checkpoint, device, preset,
                               refineIterations, similarity, timeBudgetSeconds, precision, refineDetail)
        return GVSLJob(args, stop_file=folder / "STOP"), str(folder / "result")

    def importMatchFolder(self, folder, fixedVolumeNode, movingVolumeNode) -> MatchPairResult:
        """The result a ``gvsl match --save-state`` child wrote, in the scene. On the main
        thread, so it only reads what the nodes show: metrics.json (affine), the residual
        field the child computed (``RESIDUAL_FILE``), warped and Jacobian volumes (their
        uncompressed copies, ``PANEL_IMAGE_FILES``, when the folder has them); neither
        torch nor the features (``state.npz``) are loaded until the first heatmap query."""
        folder = Path(folder)
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        residual_path = folder / RESIDUAL_FILE

        def load(read_fields=False):
            from gvsl.match import MatchResult
            return MatchResult.load_state(folder, match_input_image(fixedVolumeNode)[0],
                                          match_input_image(movingVolumeNode)[0], read_fields=read_fields)

        if not residual_path.is_file() or "affine_matrix_lps" not in metrics:  # a folder from an older engine
            result = load(read_fields=True)
            imported = self.importMatchResult(result, fixedVolumeNode, movingVolumeNode)
            imported.metrics.update(metrics)
            return imported

        def read(key):  # the uncompressed copy gvsl match writes for the panel, else its .nii.gz
            path = folder / PANEL_IMAGE_FILES[key]
            return sitk.ReadImage(str(path if path.is_file() else folder / f"{key}.nii.gz"))

        imported = self._importNodes(fixedVolumeNode, movingVolumeNode, np.asarray(metrics["affine_matrix_lps"]),
                                     sitk.ReadImage(str(residual_path)), read("warped"), read("jacobian"), metrics)
        self.lastMatch = _LastMatch(fixedVolumeNode.GetID(), movingVolumeNode.GetID(), load=load)
        self.lastMatchFolder = folder
        return imported

    def importMatchResult(self, result: "MatchResult", fixedVolumeNode, movingVolumeNode) -> MatchPairResult:
        """Create (or update, for the same pair) the transform, warped and Jacobian nodes."""
        imported = self._importNodes(fixedVolumeNode, movingVolumeNode, result.physical_affine_matrix(),
                                     residual_displacement(result), result.warped, result.jacobian,
                                     dict(result.metrics))
        imported.engineResult = result
        self.lastMatch = _LastMatch(fixedVolumeNode.GetID(), movingVolumeNode.GetID(), result=result)
        self.lastMatchFolder = None  # the features are in memory
        return imported

    def _importNodes(self, fixedVolumeNode, movingVolumeNode, affine_lps, residual_lps, warped, jacobian,
                     metrics) -> MatchPairResult:
        key = f"{fixedVolumeNode.GetID()}|{movingVolumeNode.GetID()}"
        moving_name, fixed_name = movingVolumeNode.GetName(), fixedVolumeNode.GetName()
        affine_node = mrml_io.get_or_create(self.scene, "vtkMRMLLinearTransformNode",
                                            f"GVSL affine {moving_name} to {fixed_name}", key, "affine")
        mrml_io.set_linear_from_parent(affine_node, affine_lps)
        grid_node = mrml_io.get_or_create(self.scene, "vtkMRMLGridTransformNode",
                                          f"GVSL deformable {moving_name} to {fixed_name}", key, "deformable")
        mrml_io.set_grid_from_parent(grid_node, residual_lps)
        grid_node.SetAndObserveTransformNodeID(affine_node.GetID())

        warped_node = mrml_io.get_or_create(self.scene, "vtkMRMLScalarVolumeNode", f"{moving_name} warped", key,
                                            "warped")
        mrml_io.update_volume_from_image(warped_node, warped)
        jacobian_node = mrml_io.get_or_create(self.scene, "vtkMRMLScalarVolumeNode",
                                              f"GVSL Jacobian {moving_name} to {fixed_name}", key, "jacobian")
        mrml_io.update_volume_from_image(jacobian_node, jacobian)
        for node in (warped_node, jacobian_node):
            mrml_io.ensure_display(node)
        display = jacobian_node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 2.0)
        return MatchPairResult(affine_node, grid_node, warped_node, jacobian_node, metrics)

    def mapFixedPointsToMoving(self, pointsRAS) -> np.ndarray:
        """What the engine says: fixed RAS points -> moving RAS points."""
        from gvsl.conventions import lps_to_ras, ras_to_lps
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
        from gvsl.conventions import lps_to_ras, ras_to_lps
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
        display.SetAndObserveColorNodeID(mrml_io.cold_to_hot_colors(self.scene).GetID())
        display.AutoWindowLevelOff()
        # The same band as report.png: colours span the PEAK_MARGIN below the best match, and
        # lower similarities are transparent, so a broad map cannot paint the whole body hot.
        from gvsl.heatmap_eval import PEAK_MARGIN
        display.SetWindowLevelMinMax(score - PEAK_MARGIN, score)
        display.SetApplyThreshold(1)
        display.SetLowerThreshold(score - PEAK_MARGIN)
        display.SetUpperThreshold(max(score, 1.0))
        if not heatmapNode.GetAttribute("GVSL.heatmap"):
            heatmapNode.SetAttribute("GVSL.heatmap", "heatmap")  # how the views and the opacity slider find it
        heatmapNode.SetAttribute("GVSL.targetVolumeID", target_id)
        heatmapNode.SetAttribute("GVSL.bestSimilarity", f"{score:.4f}")
        return heatmapNode, lps_to_ras(best_lps)

    def queryPointNode(self):
        """The heatmap's query point: a point list that holds one control point at most (the
        heatmap reads point #1). Slicer answers a placement on a full list by starting a new list,
        so front ends move this point (the panel: drag it; the web page: see GVSLWeb.app)."""
        node = mrml_io.get_or_create(self.scene, "vtkMRMLMarkupsFiducialNode", "GVSL query", "query", "query")
        node.SetMaximumNumberOfControlPoints(1)
        return node

    def outputVolumeIDs(self) -> List[str]:
        """IDs of the volumes GVSL made (warped, Jacobian, heatmap): the panel's volume
        selectors hide them."""
        return [n.GetID() for n in mrml_io.nodes_of_class(self.scene, "vtkMRMLScalarVolumeNode")
                if any(name.startswith("GVSL.") for name in n.GetAttributeNames() or ())]

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

    def showDeformationGrid(self, show: bool) -> List:
        """Show (or hide) the deformable transforms of Match pair as a grid in slice views.
        A transform display node starts with Visibility 0 and the 2D displayable manager
        draws only when both Visibility and Visibility2D are on. Never in 3D views."""
        shown = []
        for node in mrml_io.nodes_of_class(self.scene, "vtkMRMLGridTransformNode"):
            if not node.GetAttribute("GVSL.deformable"):
                continue
            display = mrml_io.ensure_display(node)
            display.SetVisualizationMode(display.VIS_MODE_GRID)
            display.SetVisibility(bool(show))
            display.SetVisibility2D(bool(show))
            display.SetVisibility3D(False)  # a grid over the whole volume hides the 3D view (on by default)
            shown.append(node)
        return shown

    def showHeatmapInViews(self, queryVolumeNode, heatmapNode, opacity: float = 0.5) -> Dict[str, Tuple]:
        """The query volume in the Red slice view, the other volume with the heatmap over it
        in the other slice views (each view's own composite node, not all at once)."""
        target_id = heatmapNode.GetAttribute("GVSL.targetVolumeID")
        composites = {n.GetLayoutName(): n for n in mrml_io.nodes_of_class(self.scene, "vtkMRMLSliceCompositeNode")}
        layers = heatmap_view_layers(sorted(composites), queryVolumeNode.GetID(), target_id, heatmapNode.GetID())
        for name, (background, foreground) in layers.items():
            composite = composites[name]
            composite.SetBackgroundVolumeID(background)
            composite.SetForegroundVolumeID(foreground)
            if foreground is not None:
                composite.SetForegroundOpacity(float(opacity))
        slice_ids = {n.GetLayoutName(): n.GetID() for n in mrml_io.nodes_of_class(self.scene, "vtkMRMLSliceNode")}
        self.showPointsInViews([slice_ids[n] for n, (_, fg) in layers.items() if fg is None and n in slice_ids],
                               [slice_ids[n] for n, (_, fg) in layers.items() if fg is not None and n in slice_ids])
        return layers

    def showPointsInViews(self, queryViewIDs: Sequence[str], targetViewIDs: Sequence[str]):
        """The query point only in the views of the query volume, the best match only in the
        views of the other volume (and both in every 3D view). The two points are positions in
        two different images: shown everywhere, as markups are by default, the query point sat
        on the other image too, where it means nothing, usually right beside the best match."""
        three_d = [n.GetID() for n in mrml_io.nodes_of_class(self.scene, "vtkMRMLViewNode")]
        for key, views in (("query", queryViewIDs), ("bestmatch", targetViewIDs)):
            node = mrml_io.find_tagged(self.scene, "vtkMRMLMarkupsFiducialNode", key, key)
            if node is None:
                continue
            display = mrml_io.ensure_display(node)
            display.RemoveAllViewNodeIDs()  # none listed = every view (no view of that role on screen)
            for view_id in [*views, *three_d] if views else []:
                display.AddViewNodeID(view_id)

    def setHeatmapOpacity(self, opacity: float):
        """The heatmap's opacity in the views that show it (other views keep theirs)."""
        for composite in mrml_io.nodes_of_class(self.scene, "vtkMRMLSliceCompositeNode"):
            foreground = self.scene.GetNodeByID(composite.GetForegroundVolumeID() or "")
            if foreground is not None and foreground.GetAttribute("GVSL.heatmap"):
                composite.SetForegroundOpacity(float(opacity))

    # ------------------------------------------------------------- training jobs
    @staticmethod
    def pretrainJob(dataFolder, outputFolder, patch=128, iterations=10000, batch=1, width=1.0, learningRate=1e-4,
                    device="auto", resume=False, extra: Sequence[str] = ()) -> GVSLJob:
        dataFolder, outputFolder = absolute_path(dataFolder), absolute_path(outputFolder)
        args = ["pretrain", "--data", dataFolder, "--out", outputFolder, "--patch", patch, "--iters", iterations,
                "--batch", batch, "--width", width, "--lr", learningRate, "--device", device, *extra]
        if resume:
            args.append("--resume")
        return GVSLJob(args, stop_file=Path(outputFolder) / STOP_FILE_NAME)

    @staticmethod
    def finetuneJob(imagesFolder, labelsFolder, outputFolder, classNames: Sequence[str], init="scratch",
                    mode="full", patch=128, iterations=2000, batch=1, learningRate=1e-4, device="auto",
                    resume=False, extra: Sequence[str] = ()) -> GVSLJob:
        imagesFolder, labelsFolder, outputFolder = (absolute_path(f) for f in (imagesFolder, labelsFolder, outputFolder))
        init = init if init == "scratch" else absolute_path(init)
        args = ["finetune", "--images", imagesFolder, "--labels", labelsFolder, "--out", outputFolder,
                "--init", init, "--mode", mode, "--classes", ",".join(classNames), "--patch", patch,
                "--iters", iterations, "--batch", batch, "--lr", learningRate, "--device", device, *extra]
        if resume:
            args.append("--resume")
        return GVSLJob(args, stop_file=Path(outputFolder) / STOP_FILE_NAME)

    LOSS_CURVE_ATTRIBUTE = "GVSL.lossCurveRun"

    def lossCurve(self, runFolder, title) -> Tuple[object, object]:
        """(table node, chart node) of the loss curve of the training run in ``runFolder``: the
        ones already in the scene for that run (a resumed run continues its curve, in its chart),
        else a new table (columns step, loss), scatter series and chart."""
        run = absolute_path(runFolder)
        table = chart = None
        for node in mrml_io.nodes_of_class(self.scene, "vtkMRMLTableNode"):
            if node.GetAttribute(self.LOSS_CURVE_ATTRIBUTE) == run:
                table = node
        for node in mrml_io.nodes_of_class(self.scene, "vtkMRMLPlotChartNode"):
            if node.GetAttribute(self.LOSS_CURVE_ATTRIBUTE) == run:
                chart = node
        if table is not None and chart is not None:
            return table, chart
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", title)
        table.SetAttribute(self.LOSS_CURVE_ATTRIBUTE, run)
        for name in ("step", "loss"):
            table.AddColumn(vtk.vtkDoubleArray()).SetName(name)
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", title)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName("loss")
        series.SetPlotType(series.PlotTypeScatter)
        chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", title)
        chart.SetAttribute(self.LOSS_CURVE_ATTRIBUTE, run)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetXAxisTitle("step")
        chart.SetYAxisTitle("loss")
        return table, chart

    @staticmethod
    def appendLoss(tableNode, step, losses: Dict[str, float]):
        """One point (step, total loss) on a loss curve. A resumed run repeats the steps logged
        after its last checkpoint: the curve's points from ``step`` on are replaced, not doubled."""
        if tableNode is None or not losses:
            return
        value = losses.get("total", next(iter(losses.values())))
        table = tableNode.GetTable()
        while table.GetNumberOfRows() and table.GetValue(table.GetNumberOfRows() - 1, 0).ToDouble() >= step:
            table.RemoveRow(table.GetNumberOfRows() - 1)
        row = table.InsertNextBlankRow()
        table.SetValue(row, 0, vtk.vtkVariant(float(step)))
        table.SetValue(row, 1, vtk.vtkVariant(float(value)))
        table.Modified()

    def trainingVolumeNodes(self) -> List:
        """The scene's volumes to pre-train on (see :func:`is_training_volume`)."""
        return [n for n in mrml_io.nodes_of_class(self.scene, "vtkMRMLScalarVolumeNode") if is_training_volume(n)]

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

    def segmentJob(self, volumeNode, checkpoint, device="auto", workFolder=None) -> Tuple[GVSLJob, str]:
        """A not yet started ``gvsl segment`` child process for ``volumeNode``; returns the job
        and the label map path it writes (see :meth:`importSegmentation`)."""
        if workFolder is None:
            self.removeTemporaryFolders("segment")  # earlier segmentations, imported or failed
        folder = Path(workFolder) if workFolder else self._temporaryFolder("segment")
        folder.mkdir(parents=True, exist_ok=True)
        image_path, labels_path = folder / "image.nrrd", folder / "labels.nrrd"
        sitk.WriteImage(mrml_io.volume_to_image(volumeNode), str(image_path))
        checkpoint = absolute_path(checkpoint) if checkpoint else checkpoint
        return GVSLJob(segment_arguments(image_path, checkpoint, labels_path, device),
                       stop_file=folder / STOP_FILE_NAME), str(labels_path)

    def importSegmentation(self, labelsPath, volumeNode, segmentationNode=None):
        """The label map a segment job wrote, as a segmentation node with named segments
        that references ``volumeNode``'s geometry."""
        labels_path = Path(labelsPath)
        classes = read_class_names(labels_path.parent / (labels_path.name.split(".")[0] + "_classes.txt"))
        node = self.labelmapToSegmentation(sitk.ReadImage(str(labels_path)), classes,
                                           f"{volumeNode.GetName()} GVSL segmentation", segmentationNode)
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        return node

    # ---------------------------------------------------------------- sample data
    def loadSamplePair(self, folder=None) -> Tuple[object, object]:
        """The sample chest CT (``GVSLChestCT``) and its twin deformed by a known transform
        (``GVSLChestCTDeformed``) as volume nodes; generated on this computer, nothing is
        downloaded. What scripts call: the SampleData entries of the same names work only
        from the Sample Data module's buttons (``SampleData.downloadSample`` would try to
        fetch their placeholder URIs). The files are also written to ``folder`` if given."""
        return tuple(self.loadSampleVolume(name, folder) for name in SAMPLE_NAMES)

    def loadSampleVolume(self, name: str, folder=None):
        """One of ``SAMPLE_NAMES`` as a new volume node (see :meth:`loadSamplePair`)."""
        image = sample_images()[name]
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(Path(folder) / SAMPLE_FILE_NAMES[name]))
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        mrml_io.update_volume_from_image(node, image)
        mrml_io.ensure_display(node)
        return node

    def segmentVolume(self, volumeNode, checkpoint, device="auto", segmentationNode=None):
        """Segment in this process and return a segmentation node with named segments."""
        from gvsl.segment import Segmenter
        segmenter = Segmenter.load(checkpoint, device)
        labels = segmenter(mrml_io.volume_to_image(volumeNode))
        return self.labelmapToSegmentation(labels, segmenter.classes, f"{volumeNode.GetName()} GVSL segmentation",
                                           segmentationNode)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60]
