"""Reading and checking inputs; sample data; the pair sampler."""
import numpy as np
import pytest
import SimpleITK as sitk

from gvsl.data import (InputError, PairSampler, find_volumes, fitting_grid, load_training_volumes,
                       normalize_intensity, read_image)
from gvsl.samples import chest_ct, mni_t1, synthetic_volume


def write(image, path):
    sitk.WriteImage(image, str(path))
    return path


def test_bad_inputs_are_refused_by_name(tmp_path):
    good, _ = synthetic_volume(size=(16, 16, 12))
    cases = {
        "broken.nii.gz": None,
        "flat.nrrd": sitk.Image([20, 20], sitk.sitkFloat32),
        "series.nrrd": sitk.JoinSeries([good, good]),
        "empty.mha": sitk.Image([10, 10, 10], sitk.sitkInt16),
        "nan.nrrd": sitk.GetImageFromArray(np.full((8, 8, 8), np.nan, np.float32)),
    }
    expected = {"broken.nii.gz": "unreadable", "flat.nrrd": "is 2D", "series.nrrd": "is 4D",
                "empty.mha": "is empty", "nan.nrrd": "no finite value"}
    for name, image in cases.items():
        path = tmp_path / name
        if image is None:
            path.write_bytes(b"\x00garbage")
        else:
            write(image, path)
        with pytest.raises(InputError) as info:
            read_image(path)
        assert str(info.value).startswith(str(path)) and expected[name] in str(info.value), str(info.value)
    with pytest.raises(InputError, match="missing.nii.gz: file not found"):
        read_image(tmp_path / "missing.nii.gz")


def test_sporadic_nans_are_replaced():
    array = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32)
    array[2, 3, 4] = np.nan
    image = read_image_from_array(array)
    assert np.isfinite(sitk.GetArrayViewFromImage(image)).all()


def read_image_from_array(array):
    from gvsl.data import check_image
    return check_image(sitk.GetImageFromArray(array), "array")


def test_training_set_skips_bad_files_and_names_them(tmp_path):
    for seed in range(2):
        write(synthetic_volume(size=(20, 20, 16), seed=seed)[0], tmp_path / f"ok{seed}.nii.gz")
    (tmp_path / "sub").mkdir()
    write(sitk.Image([20, 20], sitk.sitkFloat32), tmp_path / "sub" / "flat.nrrd")
    messages = []
    arrays, report = load_training_volumes(tmp_path, "ct", 2.0, tmp_path / "cache", log=messages.append)
    assert len(arrays) == 2 and len(report.skipped) == 1 and "flat.nrrd: is 2D" in report.skipped[0]
    assert any("flat.nrrd" in m for m in messages)
    # the cache is reused: same arrays, no re-resampling
    again, _ = load_training_volumes(tmp_path, "ct", 2.0, tmp_path / "cache", log=messages.append)
    assert [a.filename for a in again] == [a.filename for a in arrays]


def test_list_file_and_dicom_series_folder(tmp_path):
    image, _ = synthetic_volume(size=(16, 18, 6), spacing=(1.0, 1.0, 2.0), seed=3)
    image = sitk.Cast(sitk.Clamp(image, lowerBound=-1024, upperBound=3000), sitk.sitkInt16)
    series = tmp_path / "dicom"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        sl = image[:, :, k]
        for tag, value in (("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k)),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1"), ("0008|0060", "CT"),
                           ("0028|0030", "1\\1"), ("0018|0050", "2")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    found = find_volumes(tmp_path)
    assert any("::" in f for f in found)
    volume = read_image(next(f for f in found if "::" in f))
    assert volume.GetSize() == image.GetSize()
    np.testing.assert_allclose(volume.GetSpacing(), (1.0, 1.0, 2.0), atol=1e-3)
    listing = tmp_path / "list.txt"
    listing.write_text("# my volumes\ndicom\n", encoding="utf-8")
    assert find_volumes(listing) == [str(tmp_path / "dicom")]
    assert read_image(find_volumes(listing)[0]).GetSize() == image.GetSize()


def test_presets():
    ct = np.array([-2000.0, -1024.0, 0.0, 1024.0, 3000.0])
    out, used = normalize_intensity(ct, "auto")
    assert used == "ct" and np.allclose(out, [0, 0, 0.5, 1, 1])
    mr = np.linspace(0, 1000, 1001)
    out, used = normalize_intensity(mr, "auto")
    assert used == "mr" and out.min() == 0 and out.max() == 1


def test_sample_data_ships_with_packages():
    ct, labels, names = chest_ct()
    assert ct.GetSize() == (128, 128, 34) and len(names) == 7
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == set(range(8))
    t1, wm_gm, tissue = mni_t1()
    assert tissue == ["grey matter", "white matter"]
    assert t1.GetSize() == wm_gm.GetSize() and set(np.unique(sitk.GetArrayViewFromImage(wm_gm))) == {0, 1, 2}


def test_pair_sampler_crops_corresponding_positions():
    base = np.arange(40 * 40 * 40, dtype=np.float32).reshape(40, 40, 40)
    sampler = PairSampler([base, base.copy(), base.copy()], (16, 16, 16), seed=0)
    a, b = sampler.sample(4)
    assert a.shape == (4, 1, 16, 16, 16)
    np.testing.assert_array_equal(a, b)  # same relative position in equally sized volumes


def test_working_grids_cover_both_images_and_cap_size():
    a, _ = synthetic_volume(size=(40, 30, 20), spacing=(2.0, 2.0, 4.0))
    grids = fitting_grid([a, a], spacing_mm=1.0, max_size=48)
    assert grids[0].shape == grids[1].shape and max(grids[0].shape) <= 48
    assert all(s % 16 == 0 for s in grids[0].shape)
    extent = np.asarray(grids[0].size) * np.asarray(grids[0].spacing)
    assert np.all(extent >= np.array([80, 60, 80]) - 1e-6)


def test_pairs_within_groups_never_mix_regions():
    arrays = [np.full((20, 20, 20), value, np.float32) for value in (1, 2, 3, 4, 5)]
    groups = ["chest", "head", "head", "head", "pelvis"]
    sampler = PairSampler(arrays, (8, 8, 8), seed=0, groups=groups)
    seen = set()
    for _ in range(60):
        a, b = sampler.sample(1)
        pair = (int(a[0, 0, 0, 0, 0]), int(b[0, 0, 0, 0, 0]))
        assert pair[0] != pair[1] and set(pair) <= {2, 3, 4}, pair
        seen.add(pair)
    assert len(seen) == 6  # every ordered pair of the three heads is drawn
    with pytest.raises(ValueError, match="no folder holds two"):
        PairSampler(arrays[:2], (8, 8, 8), seed=0, groups=["chest", "head"])
