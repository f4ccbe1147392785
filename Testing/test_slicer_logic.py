"""GVSLModuleLib on Slicer's real MRML libraries (slicer-core from PyPI)."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer")
pytest.importorskip("slicer.util")
from scipy.ndimage import map_coordinates  # noqa: E402

import gvsl  # noqa: E402
from gvsl.conventions import Grid, lps_to_ras  # noqa: E402
from gvsl.samples import chest_ct, synthetic_volume  # noqa: E402
from GVSLModuleLib import mrml_io  # noqa: E402
from GVSLModuleLib.logic import GVSLLogic  # noqa: E402

CT_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def add_volume(scene, image, name):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    return mrml_io.update_volume_from_image(node, image)


def test_volume_node_round_trip_keeps_ctchest4_geometry(scene):
    ct, _, _ = chest_ct()
    assert not np.allclose(ct.GetDirection(), np.eye(3).ravel())
    node = add_volume(scene, ct, "CTChest4")
    back = mrml_io.volume_to_image(node)
    np.testing.assert_allclose(back.GetOrigin(), ct.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), ct.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), ct.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ct))
    # Slicer's own IJK-to-RAS puts voxel (i, j, k) where ITK puts it, in RAS.
    ijk = np.array([10, 20, 5, 1.0])
    ras = mrml_io.ijk_to_ras(node) @ ijk
    lps = ct.TransformContinuousIndexToPhysicalPoint(ijk[:3].tolist())
    np.testing.assert_allclose(ras[:3], lps_to_ras(lps), atol=1e-6)


@pytest.fixture(scope="module")
def rigged_model():
    torch.manual_seed(3)
    model = gvsl.GVSL(width=0.25).eval()
    with torch.no_grad():
        model.fc_rot.bias.copy_(torch.tensor([0.3, -0.2, 0.25]))
        model.fc_trans.bias.copy_(torch.tensor([0.04, -0.05, 0.03]))
        model.out_flow.weight.normal_(0, 0.05)
        model.out_flow.bias.copy_(torch.tensor([0.7, -0.6, 0.4]))
    return model


@pytest.fixture
def matched(scene, rigged_model):
    fixed_image, _ = synthetic_volume(size=(40, 44, 18), spacing=(1.6, 1.5, 3.2), direction=CT_DIRECTION,
                                      origin=(30.0, 40.0, -60.0), seed=4)
    truth = sitk.Euler3DTransform()
    truth.SetCenter(Grid.of(fixed_image).physical_bounds_center().tolist())
    truth.SetRotation(0.1, -0.05, 0.12)
    truth.SetTranslation((4.0, -3.0, 5.0))
    moving_image = sitk.Resample(fixed_image, fixed_image, truth, sitk.sitkLinear, -1000.0)
    fixed = add_volume(scene, fixed_image, "fixed")
    moving = add_volume(scene, moving_image, "moving")
    logic = GVSLLogic(scene)
    result = logic.matchPair(fixed, moving, checkpoint=rigged_model, device="cpu", preset="ct")
    return scene, logic, fixed, moving, result


def fixed_voxel_points_ras(node, count=60, seed=0, margin=3):
    dims = node.GetImageData().GetDimensions()
    rng = np.random.default_rng(seed)
    ijk = np.stack([rng.integers(margin, d - margin, count) for d in dims], -1).astype(float)
    ras = (mrml_io.ijk_to_ras(node) @ np.c_[ijk, np.ones(count)].T).T[:, :3]
    return ijk.astype(int), ras


def test_transform_nodes_map_fixed_points_where_the_engine_says(matched):
    scene, logic, fixed, moving, result = matched
    assert result.deformableTransformNode.GetParentTransformNode() is result.affineTransformNode
    _, ras = fixed_voxel_points_ras(fixed)
    through_nodes = mrml_io.transform_points_from_world(result.deformableTransformNode, ras)
    engine = logic.mapFixedPointsToMoving(ras)
    voxel = min(Grid.of(result.engineResult.moving).spacing)
    assert np.max(np.linalg.norm(through_nodes - engine, axis=1)) < 0.5 * voxel
    affine_only = mrml_io.transform_points_from_world(result.affineTransformNode, ras)
    engine_affine = lps_to_ras(result.engineResult.map_points(lps_to_ras(ras), affine_only=True))
    np.testing.assert_allclose(affine_only, engine_affine, atol=1e-4)
    # and the motion is real, not the identity
    assert np.mean(np.linalg.norm(engine - ras, axis=1)) > 2.0


def test_resampling_moving_through_nodes_reproduces_warped_volume(matched):
    scene, logic, fixed, moving, result = matched
    ijk, ras = fixed_voxel_points_ras(fixed, count=400, seed=1)
    moving_ras = mrml_io.transform_points_from_world(result.deformableTransformNode, ras)
    ras_to_ijk = np.linalg.inv(mrml_io.ijk_to_ras(moving))
    moving_ijk = (ras_to_ijk @ np.c_[moving_ras, np.ones(len(ras))].T).T[:, :3]
    moving_array = slicer.util.arrayFromVolume(moving)  # (K, J, I)
    sampled = map_coordinates(moving_array.astype(np.float64), moving_ijk[:, ::-1].T, order=1, cval=np.nan)
    warped = slicer.util.arrayFromVolume(result.warpedVolumeNode)[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    inside = np.isfinite(sampled)
    assert inside.mean() > 0.5
    a, b = sampled[inside] - sampled[inside].mean(), warped[inside] - warped[inside].mean()
    assert float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())) > 0.99


def test_running_again_replaces_results(matched, rigged_model):
    scene, logic, fixed, moving, result = matched
    again = logic.matchPair(fixed, moving, checkpoint=rigged_model, device="cpu", preset="ct")
    assert again.affineTransformNode.GetID() == result.affineTransformNode.GetID()
    assert again.deformableTransformNode.GetID() == result.deformableTransformNode.GetID()
    assert again.warpedVolumeNode.GetID() == result.warpedVolumeNode.GetID()
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 4  # fixed, moving, warped, Jacobian


def test_heatmap_node_has_other_volume_geometry_and_best_match(matched):
    scene, logic, fixed, moving, result = matched
    _, ras = fixed_voxel_points_ras(fixed, count=1, seed=3, margin=8)
    heatmap, best = logic.similarityHeatmap(ras[0], fixed)
    np.testing.assert_allclose(mrml_io.ijk_to_ras(heatmap), mrml_io.ijk_to_ras(moving), atol=1e-6)
    assert heatmap.GetImageData().GetDimensions() == moving.GetImageData().GetDimensions()
    _, engine_best_lps, engine_score = result.engineResult.heatmap(lps_to_ras(ras[0]), "fixed")
    np.testing.assert_allclose(best, lps_to_ras(engine_best_lps), atol=1e-6)
    # Shown like report.png: the colours span the 0.05 below the best match, the rest is transparent.
    display = heatmap.GetDisplayNode()
    assert display.GetWindow() == pytest.approx(0.05, abs=1e-6)
    assert display.GetLevel() + display.GetWindow() / 2 == pytest.approx(engine_score, abs=1e-6)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(engine_score - 0.05, abs=1e-6)
    # Cold to hot: the best match is red, the band's low end blue (a bare scene has no ColdToHotRainbow file
    # table, and its built-in Rainbow showed the best match purple).
    colors = display.GetColorNode()
    low, high = [0.0] * 4, [0.0] * 4
    assert colors.GetColor(0, low) and colors.GetColor(colors.GetNumberOfColors() - 1, high)
    assert low[2] > 0.45 > low[0] and high[0] > 0.4 > high[2]  # Slicer's file: (0, 0, 143) and (116, 0, 0)
    logic.similarityHeatmap(ras[0], fixed)
    assert len(mrml_io.nodes_of_class(scene, "vtkMRMLColorTableNode")) == 1  # made once per scene
    markup = logic.updateBestMatchMarkup(best)
    position = [0.0, 0.0, 0.0]
    markup.GetNthControlPointPosition(0, position)
    np.testing.assert_allclose(position, best, atol=1e-6)
    with pytest.raises(ValueError, match="not part of the last matched pair"):
        other = add_volume(scene, result.engineResult.fixed, "unrelated")
        logic.similarityHeatmap(ras[0], other)


@pytest.mark.parametrize("written_by", ["gvsl match", "an older engine"])
def test_import_from_child_process_folder_equals_in_process(matched, tmp_path, written_by):
    from gvsl.match import RESIDUAL_FILE, RESIDUAL_MAX_VOXELS
    from GVSLModuleLib import logic as panel_logic
    assert (panel_logic.RESIDUAL_FILE, panel_logic.MAX_RESIDUAL_FIELD_VOXELS) == (RESIDUAL_FILE, RESIDUAL_MAX_VOXELS)
    scene, logic, fixed, moving, result = matched
    engine = result.engineResult
    engine.save(tmp_path, report=False)
    engine.save_state(tmp_path / "state.npz")
    if written_by == "gvsl match":  # what match_cli writes beside state.npz (issue 16 item 5)
        sitk.WriteImage(engine.residual_displacement(), str(tmp_path / RESIDUAL_FILE))
    _, ras = fixed_voxel_points_ras(fixed, count=20, seed=5)
    in_process = mrml_io.transform_points_from_world(result.deformableTransformNode, ras)
    imported = logic.importMatchFolder(tmp_path, fixed, moving)
    assert logic.lastMatch.loaded is (written_by == "an older engine")  # the features wait for a heatmap query
    assert imported.affineTransformNode.GetID() == result.affineTransformNode.GetID()  # the same pair's nodes
    through_nodes = mrml_io.transform_points_from_world(imported.deformableTransformNode, ras)
    np.testing.assert_allclose(through_nodes, in_process, atol=1e-3)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(imported.warpedVolumeNode),
                                  sitk.GetArrayFromImage(engine.warped))
    assert imported.metrics["local_ncc_after"] == pytest.approx(engine.metrics["local_ncc_after"])
    heat_a, best_a = logic.similarityHeatmap(ras[0], fixed)
    assert logic.lastMatch.loaded
    _, engine_best, _ = engine.heatmap(lps_to_ras(ras[0]), "fixed")
    # The state file keeps features in float16: the sub-voxel peak moves by a few hundredths of a voxel.
    np.testing.assert_allclose(best_a, lps_to_ras(engine_best), atol=0.05 * min(engine.moving_grid.spacing))


def test_segmentation_round_trip_keeps_names_and_voxels(scene, tmp_path):
    image, labels = synthetic_volume(size=(24, 26, 12), spacing=(1.5, 1.2, 2.5), direction=CT_DIRECTION, seed=2)
    volume = add_volume(scene, image, "image")
    logic = GVSLLogic(scene)
    names = ["liver", "spleen", "kidney"]
    seg = logic.labelmapToSegmentation(labels, names, "truth")
    segmentation = seg.GetSegmentation()
    present = sorted(int(v) for v in np.unique(sitk.GetArrayFromImage(labels)) if v > 0)
    assert [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
            for i in range(segmentation.GetNumberOfSegments())] == [names[v - 1] for v in present]
    back, back_names = logic.segmentationToLabelmap(seg, volume)
    assert back_names == [names[v - 1] for v in present]
    remap = {k + 1: names.index(n) + 1 for k, n in enumerate(back_names)}
    remapped = np.vectorize(lambda v: remap.get(int(v), 0))(sitk.GetArrayFromImage(back))
    np.testing.assert_array_equal(remapped, sitk.GetArrayFromImage(labels))
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)

    images, label_dir, classes = logic.exportTrainingSet([(volume, seg)], tmp_path)
    assert classes == back_names
    written = sitk.ReadImage(str(tmp_path / "labels" / "case000.nrrd"))
    assert written.GetSize() == image.GetSize()
