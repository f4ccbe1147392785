"""The web front end's session logic (GVSLWeb.session) on slicer-core, without a browser:
what the page's buttons call, against what the engine says."""
import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
pytest.importorskip("slicer.util")

from gvsl.conventions import lps_to_ras, ras_to_lps  # noqa: E402
from conftest import write_shifted_pair  # noqa: E402
from GVSLWeb.session import (SessionError, WebSession, loss_curve_svg, resolve_folder_under_root,  # noqa: E402
                             resolve_under_root)


@pytest.fixture
def data_root(tmp_path):
    root = write_shifted_pair(tmp_path / "data", (28, 26, 24), 3, (2.0, -1.5, 1.0), moving_name="moving.nii.gz")
    (root / "notes.txt").write_text("not a volume")
    (root / "broken.nrrd").write_text("NRRD0004\nthis is not a header\n")
    (root / "sub").mkdir()
    write_shifted_pair(root / "train", (24, 22, 20), 5, (1.0, 0.0, -1.0))  # a clean folder to pre-train on
    (tmp_path / "secret.nrrd").write_bytes((root / "fixed.nrrd").read_bytes())
    return root


@pytest.fixture
def session(tmp_path, data_root, tiny_checkpoint):
    return WebSession(slicer.vtkMRMLScene(), tmp_path / "work", data_root=data_root, checkpoint=tiny_checkpoint,
                      device="cpu")


@pytest.mark.parametrize("typed, problem", [
    ("../secret.nrrd", "outside the data folder"),
    ("/etc/passwd", "outside the data folder"),
    ("missing.nrrd", "no such file"),
    ("sub", "is a folder"),
    ("notes.txt", "not a volume file"),
    ("", "no file given"),
])
def test_typed_paths_are_refused_with_the_name_and_the_problem(data_root, typed, problem):
    with pytest.raises(SessionError, match=problem) as error:
        resolve_under_root(data_root, typed)
    assert typed in str(error.value)


def test_unreadable_file_and_upload_name_the_file(session):
    with pytest.raises(SessionError, match=r"^broken\.nrrd: unreadable"):
        session.load_path("fixed", "broken.nrrd")
    with pytest.raises(SessionError, match=r"scan\.exe: not a volume file"):
        session.load_upload("fixed", "scan.exe", b"MZ")
    with pytest.raises(SessionError, match=r"^junk\.nii\.gz: "):
        session.load_upload("moving", "junk.nii.gz", b"\x00" * 100)
    assert session.volumes == {}  # nothing half-loaded


def test_match_needs_both_volumes(session):
    session.load_path("fixed", "fixed.nrrd")
    with pytest.raises(SessionError, match="open a moving volume first"):
        session.start_match()


def test_upload_reads_the_same_voxels_and_geometry_as_the_file(session, data_root):
    node = session.load_upload("moving", "moving.nii.gz", (data_root / "moving.nii.gz").read_bytes())
    expected = sitk.ReadImage(str(data_root / "moving.nii.gz"))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(expected))
    origin_ras = np.array(node.GetOrigin())
    np.testing.assert_allclose(origin_ras, lps_to_ras(np.array(expected.GetOrigin())), atol=1e-5)


def test_match_in_a_child_process_then_heatmap_and_download(session):
    from gvsl.match import MatchResult
    fixed_node = session.load_path("fixed", "fixed.nrrd")
    moving_node = session.load_path("moving", "moving.nii.gz")
    session.start_match(refine_iterations=0)
    with pytest.raises(SessionError, match="already running"):
        session.start_match(refine_iterations=0)
    status = session.wait(timeout_s=300)
    assert status.state == "done", status.message
    assert "local NCC" in status.summary and "folding" in status.summary
    assert session.result.warpedVolumeNode.GetImageData() is not None
    # The grid transform the page draws is the one the logic made, shown in 2D only.
    display = session.result.deformableTransformNode.GetDisplayNode()
    assert display.GetVisibility2D() and not display.GetVisibility3D()

    # The page's click: the heatmap's best match is what the engine computes from the saved state.
    from GVSLModuleLib import mrml_io
    point_ras = (mrml_io.ijk_to_ras(fixed_node) @ np.array([14, 13, 12, 1.0]))[:3]
    answer = session.heatmap_at(point_ras, "fixed")
    engine = MatchResult.load_state(status.result_folder, sitk.ReadImage(str(session.data_root / "fixed.nrrd")),
                                    sitk.ReadImage(str(session.data_root / "moving.nii.gz")))
    _, best_lps, score = engine.heatmap(ras_to_lps(point_ras), "fixed")
    np.testing.assert_allclose(answer["best_match_ras"], lps_to_ras(best_lps), atol=1e-3)
    assert answer["best_similarity"] == pytest.approx(score, abs=1e-4)
    assert answer["heatmap"].GetAttribute("GVSL.targetVolumeID") == moving_node.GetID()

    import io
    import zipfile
    names = zipfile.ZipFile(io.BytesIO(session.result_archive())).namelist()
    assert "metrics.json" in names and set(names) == set(session.result_files())


def test_match_detail_reaches_the_child_command_line(session):
    session.load_path("fixed", "fixed.nrrd")
    session.load_path("moving", "moving.nii.gz")
    session.start_match(refine_iterations=0, refine_detail="fast")
    assert session.job.args[session.job.args.index("--refine-detail") + 1] == "fast"
    assert session.wait(timeout_s=300).state == "done"
    session.start_match(refine_iterations=0)
    assert "--refine-detail" not in session.job.args  # full: the engine's default, not passed
    assert session.wait(timeout_s=300).state == "done"


def test_a_failing_child_reports_its_message(session, tmp_path):
    session.load_path("fixed", "fixed.nrrd")
    session.load_path("moving", "moving.nii.gz")
    session.checkpoint = tmp_path / "no_such_model.pt"
    session.start_match(refine_iterations=0)
    status = session.wait(timeout_s=300)
    assert status.state == "failed"
    assert "no_such_model.pt" in status.message
    with pytest.raises(SessionError, match="no result to download"):
        session.result_archive()


@pytest.mark.parametrize("kind, options, problem", [
    ("pretrain", {"data": "../"}, "outside the data folder"),
    ("pretrain", {"data": "nowhere"}, "no such folder"),
    ("pretrain", {"data": "fixed.nrrd"}, "is a file"),
    ("pretrain", {"data": "", }, "no data folder given"),
    ("pretrain", {"data": "train", "run_name": "../escape"}, "run name"),
    ("pretrain", {"data": "train", "resume": True}, "nothing to resume"),
    ("pretrain", {"data": "train", "iterations": "ten"}, "whole numbers"),
    ("pretrain", {"data": "train", "patch": 8}, "patch >= 16"),
    ("pretrain", {"data": "train", "spacing_mm": "fine"}, "spacing"),
    ("pretrain", {"data": "train", "spacing_mm": -1}, "spacing > 0"),
    ("finetune", {"data": "train", "labels": "train"}, "class names"),
    ("finetune", {"data": "train", "labels": "missing"}, "missing: no such folder"),
    ("pretrain", {"data": "train", "init": "nothing.pt"}, "nothing.pt: no such checkpoint"),
    ("segment", {"data": "train"}, "unknown training"),
])
def test_training_inputs_are_refused_before_a_child_starts(session, kind, options, problem):
    options = {"run_name": "r1", **options}
    with pytest.raises(SessionError, match=problem):
        session.start_training(kind, **options)
    assert session.training_job is None and session.training.state == "idle"


def test_folder_under_root_is_the_data_root_for_dot(data_root):
    assert resolve_folder_under_root(data_root, ".", "data folder") == data_root.resolve()


def test_loss_curve_svg_draws_every_point_in_its_box():
    assert loss_curve_svg([(1, 0.5)]) == ""  # one point is no curve
    svg = loss_curve_svg([(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.2)], width=200, height=100)
    points = svg.split('points="')[1].split('"')[0].split()
    xy = [tuple(map(float, p.split(","))) for p in points]
    assert len(xy) == 4
    assert [x for x, _ in xy] == sorted(x for x, _ in xy) and all(0 <= x <= 200 for x, _ in xy)
    assert min(xy, key=lambda p: p[1]) == xy[0] and max(xy, key=lambda p: p[1]) == xy[3]  # highest loss on top
    assert "0.9" in svg and "0.2" in svg and "step 4" in svg


def test_pretrain_in_a_child_gives_its_curve_resumes_and_feeds_match_pair(session):
    fast = ["--log-every", "1", "--ckpt-every", "2"]
    session.start_training("pretrain", "train", "run-a", iterations=3, patch=16, width=0.25, spacing_mm=3,
                           extra=fast)
    with pytest.raises(SessionError, match="already running"):
        session.start_training("pretrain", "train", "run-b", iterations=3, patch=16)
    status = session.wait_training(timeout_s=300)
    assert status.state == "done", status.message
    assert [step for step, _ in status.losses] == [1, 2, 3]
    assert all(np.isfinite(loss) for _, loss in status.losses)
    assert status.checkpoint.endswith("runs/run-a/checkpoints/last.pt")
    with pytest.raises(SessionError, match="already has a checkpoint"):
        session.start_training("pretrain", "train", "run-a", iterations=5, patch=16)
    status = session.start_training("pretrain", "train", "run-a", iterations=5, patch=16, width=0.25,
                                    resume=True, spacing_mm=3, extra=fast)
    status = session.wait_training(timeout_s=300)
    assert status.state == "done", status.message
    assert [step for step, _ in status.losses] == [4, 5]  # continued, not restarted
    from gvsl.checkpoint import read_checkpoint
    assert read_checkpoint(status.checkpoint)["step"] == 5
    assert session.use_trained_model() == status.checkpoint and session.checkpoint == status.checkpoint


def test_cancel_stops_pretraining_with_its_checkpoint_saved(session):
    import time
    session.start_training("pretrain", "train", "run-c", iterations=500, patch=16, width=0.25,
                           extra=["--log-every", "1", "--spacing", "3"])
    deadline = time.monotonic() + 300
    while len(session.poll_training().losses) < 2:
        assert session.training.state == "running" and time.monotonic() < deadline, session.training.message
        time.sleep(0.1)
    session.cancel_training()
    status = session.wait_training(timeout_s=300)
    assert status.state == "stopped" and "Resume continues it" in status.message
    from gvsl.checkpoint import read_checkpoint
    saved = read_checkpoint(status.checkpoint)["step"]
    assert 2 <= saved < 500 and f"at step {saved};" in status.message


def test_finetune_in_a_child_gives_its_curve_and_best_checkpoint(session, data_root):
    from gvsl.samples import synthetic_volume
    for folder in ("images", "labels"):
        (data_root / "seg" / folder).mkdir(parents=True)
    for seed in range(3):
        image, labels = synthetic_volume(size=(24, 24, 20), spacing=(1.5, 1.5, 1.5), seed=20 + seed, n_blobs=6)
        sitk.WriteImage(image, str(data_root / "seg" / "images" / f"case{seed}.nii.gz"))
        sitk.WriteImage(labels, str(data_root / "seg" / "labels" / f"case{seed}.nii.gz"))
    classes = ",".join(f"c{k}" for k in range(1, int(sitk.GetArrayFromImage(labels).max()) + 1))
    session.start_training("finetune", "seg/images", "ft", labels="seg/labels", classes=classes, iterations=4,
                           patch=16, width=0.25, spacing_mm=1.5, extra=["--log-every", "1", "--val-every", "2"])
    status = session.wait_training(timeout_s=300)
    assert status.state == "done", status.message
    assert [step for step, _ in status.losses] == [1, 2, 3, 4]
    assert status.checkpoint.endswith("runs/ft/checkpoints/best.pt")
    with pytest.raises(SessionError, match="no pre-trained checkpoint"):
        session.use_trained_model()  # a segmentation model is not a Match pair model
