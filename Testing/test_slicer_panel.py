"""The panel's defects of issue 10 that run without Qt: on Slicer's MRML libraries
(slicer-core) and in plain Python."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
from gvsl.samples import synthetic_volume  # noqa: E402
from GVSLModuleLib import dependencies, mrml_io  # noqa: E402
from GVSLModuleLib.logic import (GVSLLogic, HEATMAP_QUERY_VIEW, heatmap_view_layers, match_arguments,  # noqa: E402
                                 match_summary, read_class_names, segment_arguments)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def add_volume(scene, image, name, class_name="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(class_name, name)
    return mrml_io.update_volume_from_image(node, image)


def small_image(seed=0):
    image, labels = synthetic_volume(size=(12, 14, 10), spacing=(2.0, 2.0, 2.0), seed=seed)
    return image, labels


def heavy_modules_after(snippet: str) -> str:
    """Run ``snippet`` in a fresh interpreter with the engine and the panel library on the
    path; which of torch and monai it left imported, as printed (e.g. "[]")."""
    code = ("import sys\n"
            f"sys.path[:0] = [{str(REPO / 'GVSLExtension')!r}, {str(REPO / 'GVSLModule')!r}]\n"
            + snippet + "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


# ------------------------------------------------------------ defect 2: lazy imports
def test_engine_and_panel_library_import_neither_torch_nor_monai():
    assert heavy_modules_after(
        "import gvsl, gvsl.stopfile, GVSLModuleLib\n"
        "from GVSLModuleLib import dependencies, jobs, logic, mrml_io\n"
        "import slicer\n"
        "core = logic.GVSLLogic(slicer.vtkMRMLScene())\n"
        "job = jobs.GVSLJob(['match', 'a', 'b', '--out', 'c'])\n"
        "assert callable(gvsl.__getattr__) and 'load_model' in dir(gvsl)\n") == "[]"


def test_lazy_engine_names_still_resolve():
    import gvsl
    from gvsl.checkpoint import load_model
    assert gvsl.load_model is load_model
    with pytest.raises(AttributeError):
        gvsl.not_a_name  # noqa: B018


# ------------------------------------------------------------ defect 3: grid display
def test_show_deformation_grid_turns_on_both_visibilities(scene):
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "GVSL deformable")
    grid.SetAttribute("GVSL.deformable", "a|b")
    other = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "someone else's")
    logic = GVSLLogic(scene)
    assert logic.showDeformationGrid(True) == [grid]
    display = grid.GetDisplayNode()
    # vtkMRMLTransformsDisplayableManager2D draws only when both are on
    assert display.GetVisibility() and display.GetVisibility2D()
    assert display.GetVisualizationMode() == display.VIS_MODE_GRID
    assert other.GetDisplayNode() is None
    logic.showDeformationGrid(False)
    assert not display.GetVisibility() and not display.GetVisibility2D()


# ----------------------------------------------------- defect 6: scene volume filter
def test_pretraining_uses_plain_scene_volumes_only(scene):
    image, labels = small_image()
    plain = add_volume(scene, image, "CT")
    plain2 = add_volume(scene, small_image(1)[0], "CT 2")
    add_volume(scene, sitk.Cast(labels, sitk.sitkUInt8), "labels", "vtkMRMLLabelMapVolumeNode")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")
    for tag in ("warped", "jacobian", "heatmap"):
        node = add_volume(scene, image, f"GVSL {tag}")
        node.SetAttribute(f"GVSL.{tag}", "a|b")
    logic = GVSLLogic(scene)
    assert logic.trainingVolumeNodes() == [plain, plain2]
    assert empty not in logic.trainingVolumeNodes()


# --------------------------------------------------- defect 7: per-view heatmap layers
def test_heatmap_view_layers_keep_the_query_volume_in_its_own_view():
    layers = heatmap_view_layers(["Green", "Red", "Yellow"], "query", "target", "heat")
    assert HEATMAP_QUERY_VIEW == "Red"
    assert layers == {"Red": ("query", None), "Yellow": ("target", "heat"), "Green": ("target", "heat")}


def slice_views_and_heatmap(scene, slice_nodes=False):
    """Red, Yellow and Green slice composite nodes (and slice nodes), a query, a target and a
    heatmap volume: what showHeatmapInViews works on."""
    composites, slices = {}, {}
    for name in ("Red", "Yellow", "Green"):
        composites[name] = slicer.vtkMRMLSliceCompositeNode()
        composites[name].SetLayoutName(name)
        scene.AddNode(composites[name])
        if slice_nodes:
            slices[name] = scene.AddNewNodeByClass("vtkMRMLSliceNode")
            slices[name].SetLayoutName(name)
    query = add_volume(scene, small_image(0)[0], "query")
    target = add_volume(scene, small_image(1)[0], "target")
    heatmap = add_volume(scene, small_image(2)[0], "heatmap")
    heatmap.SetAttribute("GVSL.heatmap", "heatmap")
    heatmap.SetAttribute("GVSL.targetVolumeID", target.GetID())
    return composites, slices, query, target, heatmap


def test_heatmap_layers_are_set_per_slice_composite_node(scene):
    composites, _, query, target, heatmap = slice_views_and_heatmap(scene)
    logic = GVSLLogic(scene)
    logic.showHeatmapInViews(query, heatmap, opacity=0.3)
    assert composites["Red"].GetBackgroundVolumeID() == query.GetID()
    assert composites["Red"].GetForegroundVolumeID() is None
    for name in ("Yellow", "Green"):
        assert composites[name].GetBackgroundVolumeID() == target.GetID()
        assert composites[name].GetForegroundVolumeID() == heatmap.GetID()
        assert composites[name].GetForegroundOpacity() == pytest.approx(0.3)
    # a second query (what every drag does) leaves the query view alone
    logic.showHeatmapInViews(query, heatmap, opacity=0.3)
    assert composites["Red"].GetBackgroundVolumeID() == query.GetID()
    composites["Red"].SetForegroundOpacity(0.9)
    logic.setHeatmapOpacity(0.7)
    assert composites["Yellow"].GetForegroundOpacity() == pytest.approx(0.7)
    assert composites["Red"].GetForegroundOpacity() == pytest.approx(0.9)


def test_query_and_best_match_points_show_in_their_own_views(scene):
    """Query point: the query volume's view (Red) and 3D; best match: the other slice views and 3D."""
    _, slices, query, target, heatmap = slice_views_and_heatmap(scene, slice_nodes=True)
    view_3d = scene.AddNewNodeByClass("vtkMRMLViewNode")
    logic = GVSLLogic(scene)
    logic.showHeatmapInViews(query, heatmap)  # before any point: nothing to restrict, nothing created
    assert not mrml_io.nodes_of_class(scene, "vtkMRMLMarkupsFiducialNode")
    logic.queryPointNode().AddControlPoint(1.0, 2.0, 3.0)
    best = logic.updateBestMatchMarkup([4.0, 5.0, 6.0])
    logic.showHeatmapInViews(query, heatmap)
    query_display = logic.queryPointNode().GetDisplayNode()
    best_display = best.GetDisplayNode()
    assert query_display.IsDisplayableInView(slices["Red"].GetID())
    assert not query_display.IsDisplayableInView(slices["Yellow"].GetID())
    assert not best_display.IsDisplayableInView(slices["Red"].GetID())
    assert best_display.IsDisplayableInView(slices["Yellow"].GetID()) and best_display.IsDisplayableInView(slices["Green"].GetID())
    assert query_display.IsDisplayableInView(view_3d.GetID()) and best_display.IsDisplayableInView(view_3d.GetID())


# ------------------------------------------------ defect 8: sample data from a script
def test_sample_pair_loads_from_a_script_without_download(scene, tmp_path):
    logic = GVSLLogic(scene)
    ct, twin = logic.loadSamplePair(tmp_path)
    assert (ct.GetName(), twin.GetName()) == ("GVSLChestCT", "GVSLChestCTDeformed")
    assert ct.GetImageData().GetDimensions() == (128, 128, 34)
    assert twin.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
    a, b = slicer.util.arrayFromVolume(ct), slicer.util.arrayFromVolume(twin)
    assert not np.array_equal(a, b)  # the twin is deformed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["GVSLChestCT.nrrd", "GVSLChestCTDeformed.nrrd"]


# --------------------------------------------------- defect 11: collection reference
class CountingScene:
    """A scene that keeps the collections GetNodesByClass handed out."""

    def __init__(self, scene):
        self.scene, self.handed_out = scene, []

    def GetNodesByClass(self, class_name):
        collection = self.scene.GetNodesByClass(class_name)
        self.handed_out.append(collection)
        return collection


def test_nodes_of_class_releases_the_collection(scene):
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "a")
    leaked = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    assert leaked.GetReferenceCount() == 2  # Python's reference and the one GetNodesByClass hands over
    counting = CountingScene(scene)
    nodes = mrml_io.nodes_of_class(counting, "vtkMRMLScalarVolumeNode")
    assert [n.GetName() for n in nodes] == ["a"]
    assert counting.handed_out[0].GetReferenceCount() == 1  # only ours: freed with the Python object


# ----------------------------------------------------- engine options and metrics
def test_match_arguments_pass_only_what_the_user_changed():
    base = match_arguments("f.nrrd", "m.nrrd", "out")
    assert base == ["match", "f.nrrd", "m.nrrd", "--out", "out", "--device", "auto", "--preset", "auto",
                    "--save-state", "--no-report"]
    args = match_arguments("f.nrrd", "m.nrrd", "out", "model.pt", "cuda", "ct", refineIterations=0,
                           similarity="mind", timeBudgetSeconds=30, precision="bf16")
    assert args[len(base):] == ["--checkpoint", "model.pt", "--refine-iters", "0", "--similarity", "mind",
                                "--time-budget", "30.0", "--precision", "bf16"]
    assert "--refine-iters" not in match_arguments("f", "m", "o", refineIterations=None)
    assert match_arguments("f", "m", "o", refineIterations=200)[-2:] == ["--refine-iters", "200"]
    assert "--refine-detail" not in match_arguments("f", "m", "o", refineDetail="full")
    fast = match_arguments("f", "m", "o", refineDetail="fast")
    assert fast[-2:] == ["--refine-detail", "fast"]
    from gvsl.cli import build_parser
    assert build_parser().parse_args(fast).refine_detail == "fast"
    assert build_parser().parse_args(base).refine_detail == "full"


def metrics(**extra):
    base = {"local_ncc_before": 0.405, "local_ncc_affine": 0.331, "local_ncc_after": 0.456,
            "folding_fraction": 0.0004, "jacobian_min": -0.24, "jacobian_max": 2.47,
            "working_grid": {"shape_dhw": [64, 64, 64], "spacing_mm": 6.09}, "device": "cpu"}
    return {**base, **extra}


def test_match_summary_with_and_without_refinement():
    old = match_summary(metrics())
    assert "before 0.405" in old and "after 0.456" in old and "folding 0.040 %" in old
    refined = match_summary(metrics(local_ncc_network=0.430, refinement={
        "iterations": 150, "similarity": "lncc", "seconds": 3.2, "improved": True, "warning": None}))
    assert "network 0.430" in refined and "refined 0.456" in refined and "150 iterations of lncc" in refined
    levels = [{"stage": "affine", "spacing_mm": [4.0, 4.0, 4.0]},
              {"stage": "deformable", "spacing_mm": [1.92, 1.92, 3.0]},
              {"stage": "deformable", "spacing_mm": [0.96, 0.96, 1.5]}]
    detailed = match_summary(metrics(local_ncc_network=0.430, refinement={
        "iterations": 150, "similarity": "lncc", "seconds": 3.2, "improved": True, "warning": None,
        "detail": "full", "levels": levels}))
    assert "finest level 0.96 x 0.96 x 1.50 mm (full detail)" in detailed
    levels[-1]["spacing_mm"] = [2.0, 2.0, 2.0]
    assert "finest level 2.00 mm (fast detail)" in match_summary(metrics(local_ncc_network=0.430, refinement={
        "iterations": 150, "similarity": "lncc", "seconds": 3.2, "detail": "fast", "levels": levels}))
    network_only = match_summary(metrics(local_ncc_network=0.456, refinement={
        "iterations": 0, "similarity": "lncc", "seconds": 0.0, "improved": False, "warning": None}))
    assert "network 0.456" in network_only and "refined" not in network_only
    warned = match_summary(metrics(local_ncc_network=0.46, refinement={
        "iterations": 40, "similarity": "mind", "seconds": 9.9, "improved": False, "warning": "time budget"}))
    assert "did not improve" in warned and "warning: time budget" in warned
    stopped = match_summary(metrics(local_ncc_network=0.43, refinement={
        "iterations": 12, "similarity": "lncc", "seconds": 1.0, "improved": True, "warning": None,
        "stopped_by_request": True}))
    assert "stopped on request" in stopped and "12 iterations" in stopped


def test_segment_job_arguments_and_import(scene, tmp_path):
    image, labels = small_image(3)
    volume = add_volume(scene, image, "case")
    logic = GVSLLogic(scene)
    job, labels_path = logic.segmentJob(volume, tmp_path / "best.pt", "cpu", workFolder=tmp_path / "seg")
    assert job.args[:2] == ["segment", str(tmp_path / "seg" / "image.nrrd")]
    assert job.args[-2:] == ["--progress", "json"]
    assert segment_arguments("i.nrrd", "c.pt", "o.nrrd", "cpu") == [
        "segment", "i.nrrd", "--checkpoint", "c.pt", "--out", "o.nrrd", "--device", "cpu"]
    assert sitk.ReadImage(str(tmp_path / "seg" / "image.nrrd")).GetSize() == image.GetSize()
    # what gvsl segment writes: the label map and <stem>_classes.txt
    sitk.WriteImage(sitk.Cast(labels, sitk.sitkUInt8), labels_path)
    (tmp_path / "seg" / "labels_classes.txt").write_text("1 liver\n2 spleen\n3 left kidney\n", encoding="utf-8")
    assert read_class_names(tmp_path / "seg" / "labels_classes.txt") == ["liver", "spleen", "left kidney"]
    node = logic.importSegmentation(labels_path, volume)
    segmentation = node.GetSegmentation()
    present = sorted(int(v) for v in np.unique(sitk.GetArrayFromImage(labels)) if v > 0)
    names = ["liver", "spleen", "left kidney"]
    assert [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
            for i in range(segmentation.GetNumberOfSegments())] == [names[v - 1] for v in present]


def test_training_jobs_stop_through_the_run_folder(tmp_path):
    from gvsl.stopfile import STOP_FILE_ENV
    job = GVSLLogic.pretrainJob(tmp_path / "data", tmp_path / "run")
    assert job.stop_file == tmp_path / "run" / "STOP" and job.env[STOP_FILE_ENV] == str(job.stop_file)
    job = GVSLLogic.finetuneJob(tmp_path / "i", tmp_path / "l", tmp_path / "ft", ["liver"])
    assert job.stop_file == tmp_path / "ft" / "STOP"


# ------------------------------------------------- Also: a failed install is shown
def test_failed_pip_install_message_names_packages_and_output():
    error = subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", "monai>=1.3"],
                                          output="Collecting monai\nERROR: No matching distribution found for monai\n")
    message = dependencies.install_failure_message(error, ["monai>=1.3"])
    assert message.startswith("Installing monai>=1.3 failed: CalledProcessError (exit status 1)")
    assert "PythonSlicer -m pip install monai>=1.3" in message
    assert "No matching distribution found for monai" in message
    assert "Python console" in message
    assert "disk full" in dependencies.install_failure_message(OSError("disk full"), ["tqdm"])


def test_engine_ready_checks_without_importing():
    assert dependencies.engine_ready() in (True, False)
    assert json.dumps(dependencies.missing_packages())  # plain strings


# ------------------------------------------- issue 16 item 5: main-thread match import
def test_importing_a_match_folder_reads_only_what_the_nodes_show_and_not_torch(tmp_path):
    """benchmarks/panel_import.py on a small pair: the import (in a fresh interpreter) does
    not import torch nor load the features, and the LPS flip of mrml_io is the engine's."""
    from gvsl.conventions import LPS_TO_RAS, LPS_TO_RAS_4X4
    np.testing.assert_array_equal(mrml_io.LPS_TO_RAS, LPS_TO_RAS)
    np.testing.assert_array_equal(mrml_io.LPS_TO_RAS_4X4, LPS_TO_RAS_4X4)
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "panel_import.py"), "--size", "20x22x18",
                          "--folder", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch imported by the import: False; features loaded: False" in out.stdout
    assert "| importMatchFolder (main thread), total |" in out.stdout


# ------------------------------------------------------------------- issue 16 items
def test_failed_pip_install_shows_pips_lines_not_a_stream_object(capsys):
    """Item 6: Slicer 5.6-5.10's logProcessOutput prints pip's lines, then raises
    CalledProcessError(output=proc.stdout): an exhausted TextIOWrapper, not text."""
    import io

    def slicer_pip_install(requirements):  # what slicer.util.pip_install -> logProcessOutput does
        stream = io.TextIOWrapper(io.BytesIO(b""))
        for line in ("Collecting monai>=1.3", "ERROR: Could not find a version that satisfies monai>=1.3"):
            print(line)
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", requirements],
                                            output=stream, stderr=None)

    with pytest.raises(subprocess.CalledProcessError) as caught:
        dependencies.run_capturing_output(slicer_pip_install, "monai>=1.3")
    assert "Collecting monai>=1.3" in capsys.readouterr().out  # the console still gets every line
    message = dependencies.install_failure_message(caught.value, ["monai>=1.3"])
    assert "TextIOWrapper" not in message
    assert "ERROR: Could not find a version that satisfies monai>=1.3" in message
    assert message.count("Collecting monai>=1.3") == 1
    assert dependencies.run_capturing_output(lambda x: x * 2, 21) == 42


def test_constraints_pin_the_installed_torch_and_torchvision(monkeypatch):
    """Item 2: installing MONAI cannot replace the PyTorch extension's torch."""
    import importlib.metadata
    versions = {"SimpleITK": "2.4.0", "numpy": "1.26.4", "vtk": "9.3.1", "torch": "2.13.0+cpu",
                "torchvision": "0.28.0+cpu"}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    pins = dependencies.protected_constraints()
    assert "torch==2.13.0+cpu" in pins and "torchvision==0.28.0+cpu" in pins and "numpy==1.26.4" in pins
    arguments = dependencies.pip_install_arguments(["monai>=1.3"])
    path = arguments.split(" -c ")[1].strip('"')
    assert "torch==2.13.0+cpu" in Path(path).read_text(encoding="utf-8").splitlines()
    del versions["torchvision"]
    assert not any(p.startswith("torchvision") for p in dependencies.protected_constraints())
    assert dependencies.TORCH_REQUIREMENT == ">=2.8"


def test_supported_python_versions():
    """Item 15: Slicer 5.6/5.8 (Python 3.9) are declared unsupported; 5.10 (3.12) is."""
    assert dependencies.unsupported_python_message((3, 12, 10)) is None
    assert dependencies.unsupported_python_message((3, 11, 7)) is None
    message = dependencies.unsupported_python_message((3, 9, 10))
    assert "3.9" in message and "5.10" in message


def test_device_probe_runs_torch_in_a_child_process():
    """Item 3: the panel never imports torch itself; a working torch lists the CPU."""
    probe = dependencies.DeviceProbe(python=[sys.executable]).start()
    text, ok = probe.wait(timeout_s=180)
    assert ok and text.startswith("Detected: cpu"), text


def test_device_probe_reports_a_broken_torch(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise OSError('[WinError 126] fbgemm.dll could not be loaded')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    text, ok = dependencies.DeviceProbe(python=[sys.executable], env=env).start().wait(timeout_s=60)
    assert not ok
    assert "does not work" in text and "fbgemm.dll" in text and "Install" in text


def test_panel_library_modules_do_not_import_torch_at_setup():
    """Item 3: what GVSLModuleWidget.setup() imports (dependencies, logic, jobs) and the
    segmentation export (item 4) run without importing torch."""
    assert heavy_modules_after(
        "import tempfile\n"
        "import SimpleITK as sitk, slicer\n"
        "from GVSLModuleLib import dependencies, logic, mrml_io\n"
        "dependencies.DeviceProbe(python=[sys.executable])\n"
        "scene = slicer.vtkMRMLScene()\n"
        "image = sitk.Image(8, 9, 7, sitk.sitkInt16)\n"
        "labels = sitk.Image(8, 9, 7, sitk.sitkUInt8); labels[2, 3, 4] = 1\n"
        "volume = mrml_io.update_volume_from_image(scene.AddNewNodeByClass('vtkMRMLScalarVolumeNode', 'v'), image)\n"
        "core = logic.GVSLLogic(scene)\n"
        "seg = core.labelmapToSegmentation(labels, ['a'], 'seg')\n"
        "core.exportTrainingSet([(volume, seg)], tempfile.mkdtemp())\n") == "[]"


def test_query_point_node_holds_one_point(scene):
    """Item 7: placing a second query point cannot add point #2."""
    node = GVSLLogic(scene).queryPointNode()
    assert node.GetMaximumNumberOfControlPoints() == 1
    assert node.AddControlPoint(1.0, 2.0, 3.0) == 0
    assert node.AddControlPoint(4.0, 5.0, 6.0) == -1  # refused
    assert node.GetNumberOfControlPoints() == 1
    assert GVSLLogic(scene).queryPointNode() is node  # one node per scene


def test_deformation_grid_stays_out_of_3d_views(scene):
    """Item 8: a transform display node starts with Visibility3D on."""
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "GVSL deformable")
    grid.SetAttribute("GVSL.deformable", "a|b")
    GVSLLogic(scene).showDeformationGrid(True)
    display = grid.GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility2D() and not display.GetVisibility3D()


def test_segmentation_export_leaves_no_color_table(scene, tmp_path):
    """Item 9: ExportSegmentsToLabelmapNode adds a '<segmentation>_ColorTable' node."""
    image, labels = small_image(3)
    volume = add_volume(scene, image, "case")
    logic = GVSLLogic(scene)
    seg = logic.labelmapToSegmentation(sitk.Cast(labels, sitk.sitkUInt8), ["a", "b", "c"], "truth")
    before = sorted(n.GetID() for n in mrml_io.nodes_of_class(scene, "vtkMRMLColorNode"))
    for _ in range(3):
        logic.exportTrainingSet([(volume, seg)], tmp_path)
    assert sorted(n.GetID() for n in mrml_io.nodes_of_class(scene, "vtkMRMLColorNode")) == before
    assert not [n for n in mrml_io.nodes_of_class(scene, "vtkMRMLNode") if n.GetName().endswith("_ColorTable")]


def test_selectors_hide_gvsl_outputs(scene):
    """Item 14: the IDs the fixed/moving/segment selectors hide."""
    plain = add_volume(scene, small_image(0)[0], "CT")
    outputs = []
    for tag in ("warped", "jacobian", "heatmap"):
        node = add_volume(scene, small_image(1)[0], f"GVSL {tag}")
        node.SetAttribute(f"GVSL.{tag}", "a|b")
        outputs.append(node.GetID())
    assert GVSLLogic(scene).outputVolumeIDs() == outputs
    assert plain.GetID() not in GVSLLogic(scene).outputVolumeIDs()
    ui = (REPO / "Resources" / "UI" / "GVSLModule.ui").read_text(encoding="utf-8")
    import xml.etree.ElementTree as ET
    for widget in ET.fromstring(ui).iter("widget"):
        if widget.get("name") in ("fixedVolumeSelector", "movingVolumeSelector", "segmentVolumeSelector"):
            props = {p.get("name"): p for p in widget.findall("property")}
            assert props["showChildNodeTypes"].find("bool").text == "false"  # no label maps, vectors


def test_sample_files_are_written_under_their_sampledata_file_names(tmp_path):
    """Item 14: SampleData.downloadSample finds the generated file in the remote cache."""
    from GVSLModuleLib.logic import SAMPLE_FILE_NAMES, SAMPLE_NAMES, missing_sample_files, write_sample_files
    assert missing_sample_files(tmp_path) == list(SAMPLE_NAMES)
    paths = write_sample_files(tmp_path)
    assert sorted(Path(p).name for p in paths) == sorted(SAMPLE_FILE_NAMES.values())
    assert missing_sample_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SAMPLE_FILE_NAMES.values())  # no partial files
    module = (REPO / "GVSLModule" / "GVSLModule.py").read_text(encoding="utf-8")
    assert "fileNames=SAMPLE_FILE_NAMES[name]" in module  # the registered names are these


def grid_transform(scene, name, reference, tag=None):
    """A non-linear (grid) transform node of a small constant shift."""
    field = sitk.Compose(*[sitk.Image(reference.GetSize(), sitk.sitkFloat32) + v for v in (1.5, -1.0, 0.5)])
    field.CopyInformation(reference)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    mrml_io.set_grid_from_parent(node, field)
    if tag:
        node.SetAttribute(tag, "a|b")
    return node


def test_moving_volume_under_gvsl_transforms_is_matched_as_it_is(scene, tmp_path):
    """Item 4: the README's way to view the result (moving under the deformable transform)
    must not break the next Match; under someone else's non-linear transform, a clear error."""
    from GVSLModuleLib.logic import match_input_image
    image = small_image(0)[0]
    moving = add_volume(scene, image, "moving")
    affine = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "GVSL affine")
    affine.SetAttribute("GVSL.affine", "a|b")
    deformable = grid_transform(scene, "GVSL deformable", image, "GVSL.deformable")
    deformable.SetAndObserveTransformNodeID(affine.GetID())
    moving.SetAndObserveTransformNodeID(deformable.GetID())
    with pytest.raises(ValueError, match="non-linear transform"):
        mrml_io.volume_to_image(moving)
    read, note = match_input_image(moving)
    np.testing.assert_allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-9)  # its own geometry
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert "without its parent transform" in note and "GVSL deformable" in note
    assert GVSLLogic.matchInputNotes(add_volume(scene, image, "fixed"), moving) == [
        'moving is matched without its parent transform "GVSL deformable" (a GVSL result)']
    # under GVSL's affine only (linear): also its own geometry, not moved by the old answer
    moving.SetAndObserveTransformNodeID(affine.GetID())
    assert match_input_image(moving)[1] is not None
    # someone else's non-linear transform: refused, saying what to do
    other = grid_transform(scene, "my warp", image)
    moving.SetAndObserveTransformNodeID(other.GetID())
    with pytest.raises(ValueError, match='"my warp": harden it'):
        match_input_image(moving)
    moving.SetAndObserveTransformNodeID(deformable.GetID())  # what the child process is given
    job, _ = GVSLLogic(scene).matchJob(add_volume(scene, small_image(1)[0], "fixed 2"), moving, workFolder=tmp_path)
    written = sitk.ReadImage(job.args[2])
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-9)


def test_job_paths_typed_relative_are_made_absolute(tmp_path, monkeypatch):
    """The child runs in Slicer's working directory (/ or the launcher's folder): a typed
    relative path or ~ must not land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    job = GVSLLogic.pretrainJob("data", "~/run")
    args = job.args
    assert args[args.index("--data") + 1] == str(tmp_path / "data")
    assert args[args.index("--out") + 1] == str(tmp_path / "home" / "run")
    assert job.stop_file == tmp_path / "home" / "run" / "STOP"
    job = GVSLLogic.finetuneJob("i", "l", "ft", ["liver"], init="model.pt")
    assert [job.args[job.args.index(flag) + 1] for flag in ("--images", "--labels", "--out", "--init")] == [
        str(tmp_path / name) for name in ("i", "l", "ft", "model.pt")]
    assert GVSLLogic.finetuneJob("i", "l", "ft", ["liver"]).args[job.args.index("--init") + 1] == "scratch"


def test_temporary_job_folders_go_once_nothing_reads_them(scene, tmp_path, monkeypatch):
    """Each Match pair and Segment without a work folder writes its inputs and results to a new
    temporary folder: the earlier ones go at the next job of the kind, except the folder the
    last match's heatmaps still read; all go when the module is cleaned up; a caller's work
    folder is never touched."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    logic = GVSLLogic(scene)
    fixed, moving = add_volume(scene, small_image(1)[0], "fixed"), add_volume(scene, small_image(2)[0], "moving")
    _, first = logic.matchJob(fixed, moving)
    first_root = Path(first).parent
    assert first_root.parent == tmp_path and (first_root / "inputs").is_dir()
    _, second = logic.matchJob(fixed, moving)  # the first match was never imported: its folder goes
    assert not first_root.exists() and Path(second).parent.exists()
    logic.lastMatchFolder = Path(second)  # what importMatchFolder records: heatmaps read state.npz there
    _, third = logic.matchJob(fixed, moving)
    assert Path(second).parent.exists() and Path(third).parent.exists()
    _, seg_first = logic.segmentJob(fixed, tmp_path / "best.pt", "cpu")
    _, seg_second = logic.segmentJob(fixed, tmp_path / "best.pt", "cpu")
    assert not Path(seg_first).parent.exists() and Path(seg_second).parent.exists()
    own = tmp_path / "mine"
    logic.matchJob(fixed, moving, workFolder=own)
    logic.removeTemporaryFolders(keepLastMatch=False)
    assert own.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert logic.lastMatch is None and logic.lastMatchFolder is None


def test_loss_curves_are_one_per_run_and_a_resumed_run_continues_its_own(scene, tmp_path):
    """Each training start used to add a new table, series and chart, and both jobs wrote into
    whichever curve was started last. Now a run folder has one curve; Resume continues it and
    replaces the steps the run repeats after its last checkpoint."""
    logic = GVSLLogic(scene)
    pretrain_table, pretrain_chart = logic.lossCurve(tmp_path / "pre", "GVSL pre-training loss")
    finetune_table, _ = logic.lossCurve(tmp_path / "ft", "GVSL fine-tuning loss")
    assert finetune_table is not pretrain_table
    for step, loss in ((10, 0.9), (20, 0.8), (30, 0.7)):
        logic.appendLoss(pretrain_table, step, {"ncc": loss + 1, "total": loss})
    logic.appendLoss(finetune_table, 5, {"dice": 0.4})  # no total: the first term
    again, chart = logic.lossCurve(str(tmp_path / "pre"), "GVSL pre-training loss")  # Resume
    assert (again, chart) == (pretrain_table, pretrain_chart)
    assert len(mrml_io.nodes_of_class(scene, "vtkMRMLPlotChartNode")) == 2
    assert len(mrml_io.nodes_of_class(scene, "vtkMRMLPlotSeriesNode")) == 2
    logic.appendLoss(again, 30, {"total": 0.65})  # resumed from the checkpoint at step 20
    logic.appendLoss(again, 40, {"total": 0.6})
    table = again.GetTable()
    points = [(table.GetValue(r, 0).ToDouble(), table.GetValue(r, 1).ToDouble()) for r in range(table.GetNumberOfRows())]
    assert points == [(10.0, 0.9), (20.0, 0.8), (30.0, 0.65), (40.0, 0.6)]
    assert finetune_table.GetTable().GetValue(0, 1).ToDouble() == pytest.approx(0.4)
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNodeID() == again.GetID() and series.GetXColumnName() == "step"
