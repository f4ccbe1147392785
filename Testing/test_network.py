"""The network, its Z-matching head and loading of official weights."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gvsl
from gvsl.checkpoint import CheckpointError
from gvsl.losses import GVSLLoss

DATA = Path(__file__).parent / "data"


def test_gradients_reach_every_parameter_and_batch_gives_distinct_affines():
    torch.manual_seed(0)
    model = gvsl.GVSL(width=0.25)
    a = torch.rand(2, 1, 32, 32, 32)
    b = torch.rand(2, 1, 32, 32, 32)
    out = model(a, b)
    assert out.affine.shape == (2, 3, 4)
    assert out.flow.shape == (2, 3, 32, 32, 32)
    assert out.warped.shape == out.restored.shape == (2, 1, 32, 32, 32)
    loss, terms = GVSLLoss()(out, a)
    loss.backward()
    starved = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert starved == []
    for head in ("fc_rot", "fc_scl", "fc_trans", "fc_shear", "f_conv", "out_flow", "sp_conv", "res_conv", "unet"):
        assert any(n.startswith(head) for n, _ in model.named_parameters())
    assert not torch.allclose(out.affine[0], out.affine[1])


def test_affine_head_is_bounded():
    model = gvsl.GVSL(width=0.25)
    with torch.no_grad():
        for fc in (model.fc_rot, model.fc_scl, model.fc_trans, model.fc_shear):
            fc.bias.fill_(50.0)
        out = model(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32), restore=False)
    from gvsl.network import MAX_TRANSLATION_VOXELS
    translation = out.affine[0, :, 3]
    assert torch.all(translation.abs() <= MAX_TRANSLATION_VOXELS + 1e-4)
    assert torch.isfinite(out.affine).all()
    linear = out.affine[0, :, :3]
    assert 0.75 ** 3 * 0.5 < float(torch.det(linear)) < 1.25 ** 3 * 2  # bounded scale and shear


def test_odd_sizes_are_padded_and_cropped_back():
    model = gvsl.GVSL(width=0.25).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 20, 27, 33), torch.rand(1, 1, 20, 27, 33))
    assert out.restored.shape == (1, 1, 20, 27, 33)
    assert out.features_a.shape[2:] == (20, 27, 33)


def official_state_dict(seed=0):
    shapes = json.loads((DATA / "official_gvsl_state_dict_shapes.json").read_text(encoding="utf-8"))["state_dict"]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.05
        if key.endswith(".weight") and len(shape) == 1:  # GroupNorm scale
            t = 1.0 + t
        state[key] = t
    return state


def reference_official_restoration(state, x):
    """The official UNet_base + res_conv forward, written out with functional ops from
    the official code's layer order (Conv-GN-LReLU x2, maxpool, trilinear
    align_corners=True upsampling, [skip, up] concatenation, pad to 16 and crop)."""
    def double_conv(prefix, x):
        for i in (0, 3):
            w = state[f"{prefix}.double_conv.{i}.weight"]
            x = F.conv3d(x, w, state[f"{prefix}.double_conv.{i}.bias"], padding=1)
            x = F.group_norm(x, w.shape[0] // 8, state[f"{prefix}.double_conv.{i + 1}.weight"],
                             state[f"{prefix}.double_conv.{i + 1}.bias"])
            x = F.leaky_relu(x, 0.2)
        return x

    Z, Y, X = x.shape[2:]
    dz, dy, dx = [(16 - s % 16) % 16 for s in (Z, Y, X)]
    x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2, dz // 2, dz - dz // 2])
    x1 = double_conv("unet.inc", x)
    x2 = double_conv("unet.down1.maxpool_conv.1", F.max_pool3d(x1, 2))
    x3 = double_conv("unet.down2.maxpool_conv.1", F.max_pool3d(x2, 2))
    x4 = double_conv("unet.down3.maxpool_conv.1", F.max_pool3d(x3, 2))
    x5 = double_conv("unet.down4.maxpool_conv.1", F.max_pool3d(x4, 2))
    y = x5
    for name, skip in (("up1", x4), ("up2", x3), ("up3", x2), ("up4", x1)):
        y = F.interpolate(y, scale_factor=2, mode="trilinear", align_corners=True)
        y = double_conv(f"unet.{name}.conv", torch.cat([skip, y], 1))
    y = y[:, :, dz // 2:Z + dz // 2, dy // 2:Y + dy // 2, dx // 2:X + dx // 2]
    r = F.conv3d(y, state["res_conv.0.weight"], state["res_conv.0.bias"], padding=1)
    r = F.leaky_relu(F.group_norm(r, 4, state["res_conv.1.weight"], state["res_conv.1.bias"]), 0.2)
    return F.conv3d(r, state["res_conv.3.weight"], state["res_conv.3.bias"])


def test_official_weights_load_and_restoration_matches_official(tmp_path):
    state = official_state_dict()
    path = tmp_path / "GVSL_epoch_1000.pth"
    torch.save(state, path)
    model = gvsl.load_model(path)
    assert model.load_report.source == "official"
    assert model.load_report.random_init == []
    assert model.width == 1.0
    torch.manual_seed(1)
    a = torch.rand(1, 1, 20, 24, 18)
    with torch.no_grad():
        ours = model(a, torch.rand_like(a)).restored
        reference = reference_official_restoration(state, a)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_backbone_only_file_loads_and_reports_random_heads(tmp_path):
    state = {k[len("unet."):]: v for k, v in official_state_dict().items() if k.startswith("unet.")}
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = gvsl.load_model(path)
    assert model.load_report.random_init and all(not k.startswith("unet.") for k in model.load_report.random_init)
    assert "left at random init" in model.load_report.summary()


def test_wrong_shape_and_foreign_files_give_clear_errors(tmp_path):
    state = official_state_dict()
    state["fc_rot.weight"] = torch.zeros(4, 256)
    bad = tmp_path / "bad_shape.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"bad_shape.pth: wrong tensor shapes: fc_rot.weight"):
        gvsl.load_model(bad)
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(CheckpointError, match="resnet.pth: .*not GVSL3D-UNet weights"):
        gvsl.load_model(foreign)
    text = tmp_path / "notes.pth"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(CheckpointError, match="notes.pth: not a PyTorch checkpoint"):
        gvsl.load_model(text)


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > should_not_exist",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"unet.inc.double_conv.0.weight": torch.zeros(32, 1, 3, 3, 3), "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="evil.pth: refused: the file needs arbitrary unpickling"):
        gvsl.load_model(path)
    assert not Path("should_not_exist").exists()


def test_our_checkpoint_round_trip(tiny_model, tiny_checkpoint):
    model = gvsl.load_model(tiny_checkpoint)
    assert model.load_report.source == "gvsl" and model.load_report.random_init == []
    for (k, v), (k2, v2) in zip(model.state_dict().items(), tiny_model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_safetensors_weights_load(tmp_path, tiny_model):
    from safetensors.torch import save_file
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path))
    model = gvsl.load_model(path)
    assert model.width == 0.25


def test_export_drops_optimizer_state_and_still_loads(tmp_path):
    from gvsl.checkpoint import FORMAT, export_weights, read_checkpoint, save_atomic
    tiny_model = gvsl.GVSL(width=0.25)
    optimizer = torch.optim.Adam(tiny_model.parameters())
    tiny_model(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)).restored.mean().backward()
    optimizer.step()
    full = save_atomic({"format": FORMAT, "format_version": 1, "kind": "pretrain", "model": tiny_model.config,
                        "state_dict": tiny_model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3},
                       tmp_path / "full.pt")
    slim = export_weights(full, tmp_path / "slim.pt")
    assert "optimizer" not in read_checkpoint(slim)
    assert slim.stat().st_size < 0.6 * full.stat().st_size
    assert gvsl.load_model(slim).load_report.random_init == []


def test_export_sets_the_match_window_of_a_correlation_model_only(tmp_path):
    from gvsl.checkpoint import FORMAT, CheckpointError, export_weights, read_checkpoint, save_atomic
    from gvsl.cli import main
    model = gvsl.GVSL(width=0.25, matching="correlation")
    source = save_atomic({"format": FORMAT, "format_version": 1, "kind": "pretrain", "model": model.config,
                          "state_dict": model.state_dict(), "step": 3}, tmp_path / "corr.pt")
    assert main(["export", str(source), str(tmp_path / "w1.pt"), "--match-window", "1"]) == 0
    assert gvsl.load_model(tmp_path / "w1.pt").match_window == 1
    assert "match_window" not in read_checkpoint(export_weights(tmp_path / "w1.pt", tmp_path / "w0.pt", None))["model"]
    assert read_checkpoint(export_weights(tmp_path / "w1.pt", tmp_path / "kept.pt"))["model"]["match_window"] == 1
    assert main(["export", str(tmp_path / "w1.pt"), str(tmp_path / "none.pt"), "--match-window", "none"]) == 0
    assert gvsl.load_model(tmp_path / "none.pt").match_window is None
    official = save_atomic({"format": FORMAT, "format_version": 1, "kind": "pretrain",
                            "model": gvsl.GVSL(width=0.25).config, "state_dict": gvsl.GVSL(width=0.25).state_dict()},
                           tmp_path / "official_head.pt")
    with pytest.raises(CheckpointError, match="correlation head"):
        export_weights(official, tmp_path / "x.pt", 1)
    with pytest.raises(ValueError, match="match_window"):
        export_weights(source, tmp_path / "x.pt", 5)


def _saved_model(path, width=0.25, seed=0, step=1):
    from gvsl.checkpoint import FORMAT, save_atomic
    torch.manual_seed(seed)
    model = gvsl.GVSL(width=width)
    return save_atomic({"format": FORMAT, "format_version": 1, "kind": "pretrain", "model": model.config,
                        "state_dict": model.state_dict(), "step": step}, path), model


def test_export_of_several_checkpoints_averages_their_weights(tmp_path):
    from gvsl.checkpoint import read_checkpoint
    from gvsl.cli import main
    first, model_a = _saved_model(tmp_path / "a.pt", seed=0, step=100)
    second, model_b = _saved_model(tmp_path / "b.pt", seed=1, step=200)
    assert main(["export", str(first), str(second), str(tmp_path / "mean.pt")]) == 0
    averaged = read_checkpoint(tmp_path / "mean.pt")
    assert averaged["step"] == 200 and averaged["averaged_from"] == [str(first), str(second)]
    loaded = gvsl.load_model(tmp_path / "mean.pt")
    assert loaded.load_report.random_init == []
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    for key, value in loaded.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, (state_a[key] + state_b[key]) / 2, atol=1e-6), key
    assert not torch.allclose(state_a["unet.inc.double_conv.0.weight"], state_b["unet.inc.double_conv.0.weight"])


def test_averaging_refuses_checkpoints_of_two_architectures(tmp_path, capsys):
    from gvsl.checkpoint import CheckpointError, average_weights
    from gvsl.cli import main
    narrow, _ = _saved_model(tmp_path / "narrow.pt", width=0.25)
    wide, _ = _saved_model(tmp_path / "wide.pt", width=0.5)
    with pytest.raises(CheckpointError, match="wide.pt.*differs from.*narrow.pt"):
        average_weights([narrow, wide], tmp_path / "mean.pt")
    assert not (tmp_path / "mean.pt").exists()
    with pytest.raises(CheckpointError, match="at least two"):
        average_weights([narrow], tmp_path / "mean.pt")
    assert main(["export", str(narrow), str(wide), str(tmp_path / "mean.pt")]) == 1
    assert "wide.pt" in capsys.readouterr().err


def test_correlation_flow_finds_a_known_shift_and_fit_affine_recovers_an_affine():
    from gvsl.conventions import affine_to_flow
    from gvsl.network import affine_from_parameters, correlation_flow, fit_affine
    torch.manual_seed(0)
    features_b = torch.randn(1, 16, 12, 12, 12)
    # a(p) = b(p + (1, -2, 0)): every cell of a matches the cell of b at that offset.
    features_a = torch.roll(features_b, shifts=(-1, 2, 0), dims=(2, 3, 4))
    flow, confidence = correlation_flow(features_a, features_b, radius=3, temperature=torch.tensor(0.01))
    inner = flow[:, :, 3:-3, 3:-3, 3:-3]
    assert torch.allclose(inner, torch.tensor([1.0, -2.0, 0.0]).view(1, 3, 1, 1, 1).expand_as(inner), atol=1e-3)
    assert float(confidence[:, :, 3:-3, 3:-3, 3:-3].min()) > 0.99
    affine = affine_from_parameters(torch.tensor([[0.1, -0.05, 0.08]]), torch.tensor([[1.05, 0.95, 1.0]]),
                                    torch.tensor([[2.0, -3.0, 1.0]]), torch.zeros(1, 6))
    dense = affine_to_flow(affine, (10, 12, 14))
    assert torch.allclose(fit_affine(dense, torch.ones(1, 1, 10, 12, 14)), affine, atol=1e-4)


def test_local_soft_argmax_is_not_pulled_by_similar_cells_farther_away():
    """Smooth features (neighbouring cells alike, as a decoder's are) against themselves: over the
    whole search the softmax weight of similar cells on one side (at the volume's border) pulls the
    answer off zero; mean shift with a one-cell Gaussian brings it back towards zero. A known shift
    is still found, and the confidence is that of the whole search."""
    import torch.nn.functional as F
    from gvsl.network import correlation_flow
    torch.manual_seed(0)
    smooth = F.avg_pool3d(torch.randn(1, 16, 14, 14, 14), 7, 1, 3)
    temperature = torch.tensor(0.05)
    whole, confidence = correlation_flow(smooth, smooth, 3, temperature)
    local, local_confidence = correlation_flow(smooth, smooth, 3, temperature, window=1)
    assert float(local.norm(dim=1).mean()) < 0.5 * float(whole.norm(dim=1).mean())
    assert torch.equal(confidence, local_confidence)
    distinct = torch.randn(1, 16, 12, 12, 12)
    shifted = torch.roll(distinct, shifts=(-1, 2, 0), dims=(2, 3, 4))
    found, _ = correlation_flow(shifted, distinct, 3, torch.tensor(0.01), window=1)
    inner = found[:, :, 3:-3, 3:-3, 3:-3]
    assert torch.allclose(inner, torch.tensor([1.0, -2.0, 0.0]).view(1, 3, 1, 1, 1).expand_as(inner), atol=1e-3)
    # It trains: finite gradients for the features and the temperature (an earlier, masked form gave the
    # temperature a NaN gradient, and the mixed-precision scaler then skipped every step).
    log_temperature = torch.tensor(math.log(0.05), requires_grad=True)
    features = smooth.clone().requires_grad_(True)
    flow, _ = correlation_flow(features, torch.roll(smooth, 1, 2), 3, log_temperature.exp(), window=1)
    flow.square().mean().backward()
    assert torch.isfinite(log_temperature.grad) and float(log_temperature.grad) != 0.0
    assert torch.isfinite(features.grad).all() and float(features.grad.abs().sum()) > 0


def test_correlation_matching_keeps_the_output_contract_and_round_trips(tmp_path):
    from gvsl.checkpoint import load_model
    from gvsl.conventions import compose_affine_then_local
    from gvsl.network import GVSL
    model = GVSL(width=0.25, matching="correlation").eval()
    a, b = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = model(a, b)
    assert torch.allclose(out.flow, compose_affine_then_local(out.affine, out.local_flow), atol=1e-4)
    path = tmp_path / "m.pt"
    from gvsl.checkpoint import FORMAT, FORMAT_VERSION
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "pretrain", "model": model.config,
                "state_dict": model.state_dict()}, path)
    loaded = load_model(path)
    assert loaded.matching == "correlation" and loaded.match_window is None
    with torch.no_grad():
        assert torch.allclose(loaded(a, b).flow, out.flow, atol=1e-5)
    with pytest.raises(ValueError, match="matching"):
        GVSL(width=0.25, matching="nearest")
    # The local soft-argmax window travels with the weights (the same weights, another answer).
    windowed = GVSL(width=0.25, matching="correlation", match_window=1).eval()
    windowed.load_state_dict(model.state_dict())
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "pretrain", "model": windowed.config,
                "state_dict": windowed.state_dict()}, path)
    loaded = load_model(path)
    assert loaded.match_window == 1
    with torch.no_grad():
        assert torch.allclose(loaded(a, b).flow, windowed(a, b).flow, atol=1e-5)
    with pytest.raises(ValueError, match="match_window"):
        GVSL(width=0.25, matching="correlation", match_window=4)
