"""The browser front end clicked through in headless Chromium: open a pair, Match pair,
click a point in the fixed view, and check the best match the page shows against the
engine's own answer for that point. Needs the ``web`` extra (trame-slicer, playwright) and
Debian's chromium (``apt-get install chromium``; never ``playwright install``); skipped
without them. ``GVSL_WEB_SCREENSHOTS=folder`` also saves the page at each stage."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer")
try:
    import trame_slicer.core  # noqa: F401  (trame-slicer 2 fails to import on slicer-core other than 5.11)
except ImportError as error:
    pytest.skip(f"trame-slicer not usable here ({error}); install the web extra", allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("GVSL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium on this machine (apt-get install chromium)", allow_module_level=True)

from conftest import write_shifted_pair  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NUMBERS = re.compile(r"-?\d+\.\d+")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pair_root(tmp_path):
    return write_shifted_pair(tmp_path / "data", (40, 40, 36), 4, (3.0, -2.0, 1.5))


def start_server(tmp_path, pair_root, checkpoint, *extra):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "GVSLModule"), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    log_path = tmp_path / f"server_{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "GVSLWeb", "--port", str(port), "--data-root",
                                    str(pair_root), "--work-dir", str(tmp_path / "work"), "--checkpoint",
                                    str(checkpoint), "--device", "cpu", *extra], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail("web server exited:\n" + log_path.read_text()[-3000:])
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"http://127.0.0.1:{port}/"
        time.sleep(0.5)
    process.kill()
    pytest.fail("web server did not listen within 120 s:\n" + log_path.read_text()[-3000:])


def stop_server(process):
    os.killpg(process.pid, 9)
    process.wait(timeout=30)


@pytest.fixture
def server(tmp_path, pair_root, tiny_checkpoint):
    process, url = start_server(tmp_path, pair_root, tiny_checkpoint)
    yield url, tmp_path
    stop_server(process)


def open_browser(p):
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
    return browser, browser.new_page(viewport={"width": 1400, "height": 900})


def shot(page, name):
    folder = os.environ.get("GVSL_WEB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"))


def test_match_pair_and_heatmap_click_in_the_browser(server, pair_root):
    from gvsl.conventions import lps_to_ras, ras_to_lps
    from gvsl.match import MatchResult
    url, tmp_path = server
    with playwright_sync.sync_playwright() as p:
        browser, page = open_browser(p)
        page.goto(url)
        page.locator("#gvsl-fixed-path").fill("../outside.nrrd")
        page.locator("#gvsl-fixed-open").click()
        page.locator("#gvsl-error").wait_for(timeout=30_000)
        assert "outside the data folder" in page.locator("#gvsl-error").inner_text()

        page.locator("#gvsl-fixed-path").fill("fixed.nrrd")
        page.locator("#gvsl-fixed-open").click()
        page.locator("#gvsl-moving-path").fill("moving.nrrd")
        page.locator("#gvsl-moving-open").click()
        page.get_by_text("Moving: moving").wait_for(timeout=30_000)
        shot(page, "web_1_opened")
        page.locator("#gvsl-match").click()
        page.locator("#gvsl-summary").wait_for(state="visible", timeout=300_000)
        assert "local NCC" in page.locator("#gvsl-summary").inner_text()
        shot(page, "web_2_matched")

        views = page.locator("img, canvas").filter(has_not=page.locator("#gvsl-error"))
        boxes = [b for b in (views.nth(i).bounding_box() for i in range(views.count())) if b and b["width"] > 100]
        left = min(boxes, key=lambda b: b["x"])
        answers = []
        for fx, fy in ((0.45, 0.55), (0.55, 0.45)):  # a second click must move the query, not be ignored
            previous = page.locator("#gvsl-best-match").inner_text() if answers else ""
            page.mouse.click(left["x"] + fx * left["width"], left["y"] + fy * left["height"])
            page.wait_for_function(
                "([previous]) => { const e = document.querySelector('#gvsl-best-match');"
                " return e && e.offsetParent !== null && e.innerText.includes('->') && e.innerText !== previous; }",
                arg=[previous], timeout=60_000)
            shot(page, f"web_3_heatmap_{len(answers) + 1}")
            answers.append(page.locator("#gvsl-best-match").inner_text())
        browser.close()

    result_folder = sorted((tmp_path / "work").glob("match_*/result"))[-1]
    engine = MatchResult.load_state(result_folder, sitk.ReadImage(str(pair_root / "fixed.nrrd")),
                                    sitk.ReadImage(str(pair_root / "moving.nrrd")))
    queries = []
    for text in answers:
        query, best = text.split("->")
        query_ras = np.array([float(v) for v in NUMBERS.findall(query)[:3]])
        best_ras = np.array([float(v) for v in NUMBERS.findall(best)[:3]])
        _, engine_best_lps, _ = engine.heatmap(ras_to_lps(query_ras), "fixed")
        # The page prints millimetres to 3 decimals; both sides read the same state file.
        np.testing.assert_allclose(best_ras, lps_to_ras(engine_best_lps), atol=2e-3)
        queries.append(query_ras)
    assert np.linalg.norm(queries[1] - queries[0]) > 5.0  # the second click queried its own point


def test_upload_then_pretrain_with_loss_curve_and_use_the_model_in_the_browser(server, pair_root):
    from gvsl.checkpoint import read_checkpoint
    url, tmp_path = server
    with playwright_sync.sync_playwright() as p:
        browser, page = open_browser(p)
        page.goto(url)
        page.locator("#gvsl-fixed-upload").set_input_files(str(pair_root / "moving.nrrd"))
        page.get_by_text("Fixed: moving").wait_for(timeout=60_000)  # the uploaded file's name

        page.locator("#gvsl-train-data").fill("nowhere")
        page.locator("#gvsl-train-start").click()
        page.locator("#gvsl-error").wait_for(timeout=30_000)
        assert "nowhere: no such folder" in page.locator("#gvsl-error").inner_text()

        for element, value in (("data", "."), ("run", "web-run"), ("iters", "4"), ("patch", "16"),
                               ("width", "0.25"), ("spacing", "3")):
            page.locator(f"#gvsl-train-{element}").fill(value)
        page.locator("#gvsl-train-start").click()
        page.get_by_text("done: 4 steps").wait_for(timeout=300_000)
        page.locator("#gvsl-train-use").scroll_into_view_if_needed()
        shot(page, "web_4_pretrained")
        curve = page.locator("#gvsl-train-curve polyline").get_attribute("points")
        page.locator("#gvsl-train-use").click()
        page.get_by_text("Match pair uses: ").filter(has_text="last.pt").wait_for(timeout=30_000)
        model = page.locator("#gvsl-match-model").inner_text()
        browser.close()
    assert len(curve.split()) == 4  # one point per logged step of a 4-step run
    checkpoint = tmp_path / "work" / "runs" / "web-run" / "checkpoints" / "last.pt"
    assert read_checkpoint(checkpoint)["step"] == 4 and str(checkpoint) in model
    uploaded = sitk.ReadImage(str(tmp_path / "work" / "uploads" / "fixed_moving.nrrd"))
    original = sitk.ReadImage(str(pair_root / "moving.nrrd"))
    assert np.array_equal(sitk.GetArrayViewFromImage(uploaded), sitk.GetArrayViewFromImage(original))


def test_finetune_from_the_page_with_its_curve_and_no_match_pair_offer(server, pair_root):
    """Fine-tuning clicked through: the Fine-tune toggle shows the label fields, a refusal names
    the missing class names, a 4-step run draws its curve and ends with its checkpoint, and a
    segmentation model is not offered for Match pair."""
    from gvsl.checkpoint import read_checkpoint
    from gvsl.samples import synthetic_volume
    url, tmp_path = server
    for folder in ("images", "labels"):
        (pair_root / "seg" / folder).mkdir(parents=True)
    for seed in range(3):
        image, labels = synthetic_volume(size=(24, 24, 20), spacing=(1.5, 1.5, 1.5), seed=30 + seed, n_blobs=6)
        sitk.WriteImage(image, str(pair_root / "seg" / "images" / f"case{seed}.nii.gz"))
        sitk.WriteImage(labels, str(pair_root / "seg" / "labels" / f"case{seed}.nii.gz"))
    classes = ",".join(f"c{k}" for k in range(1, int(sitk.GetArrayFromImage(labels).max()) + 1))
    with playwright_sync.sync_playwright() as p:
        browser, page = open_browser(p)
        page.goto(url)
        assert not page.locator("#gvsl-train-labels").is_visible()  # pre-training needs no labels
        page.locator("#gvsl-train-kind-finetune").click()
        page.locator("#gvsl-train-labels").wait_for(state="visible", timeout=30_000)
        for element, value in (("data", "seg/images"), ("labels", "seg/labels"), ("run", "web-ft"),
                               ("iters", "4"), ("patch", "16"), ("width", "0.25"), ("spacing", "1.5")):
            page.locator(f"#gvsl-train-{element}").fill(value)
        page.locator("#gvsl-train-start").click()
        page.locator("#gvsl-error").wait_for(timeout=30_000)
        assert "class names" in page.locator("#gvsl-error").inner_text()

        page.locator("#gvsl-train-classes").fill(classes)
        page.locator("#gvsl-train-start").click()
        page.get_by_text("done: 4 steps").wait_for(timeout=300_000)
        curve = page.locator("#gvsl-train-curve polyline").get_attribute("points")
        use_offered = page.locator("#gvsl-train-use").is_visible()
        shot(page, "web_5_finetuned")
        browser.close()
    assert len(curve.split()) == 4
    assert not use_offered  # a segmentation model is not a Match pair model
    run = tmp_path / "work" / "runs" / "web-ft" / "checkpoints"
    saved = sorted(path.name for path in run.glob("*.pt"))
    assert "last.pt" in saved and read_checkpoint(run / "last.pt")["step"] == 4


def test_a_second_tab_is_told_that_it_shares_the_session(server):
    """trame keeps one state per server: a second tab gets a warning saying so, and it goes once
    the other tab is closed."""
    url, _ = server
    with playwright_sync.sync_playwright() as p:
        browser, first = open_browser(p)
        first.goto(url)
        first.locator("#gvsl-match").wait_for(timeout=60_000)
        assert not first.locator("#gvsl-shared").is_visible()
        second = browser.new_page()
        second.goto(url)
        second.locator("#gvsl-shared").wait_for(timeout=30_000)
        assert "2 browser tabs" in second.locator("#gvsl-shared").inner_text()
        first.locator("#gvsl-shared").wait_for(timeout=30_000)  # the same state: both tabs see it
        second.close(run_before_unload=True)
        first.locator("#gvsl-shared").wait_for(state="detached", timeout=30_000)
        browser.close()


def test_a_server_with_a_token_only_serves_a_browser_that_has_it(tmp_path, pair_root, tiny_checkpoint):
    process, url = start_server(tmp_path, pair_root, tiny_checkpoint, "--token", "s3cret-token")
    try:
        with playwright_sync.sync_playwright() as p:
            browser, page = open_browser(p)
            page.goto(url + "?secret=s3cret-token")
            page.locator("#gvsl-match").wait_for(timeout=60_000)  # the page connected and built itself
            page = browser.new_page()
            page.goto(url)
            page.wait_for_timeout(5_000)
            assert page.locator("#gvsl-match").count() == 0  # refused: the UI never arrives
            page.goto(url + "?secret=wrong")
            page.wait_for_timeout(5_000)
            assert page.locator("#gvsl-match").count() == 0
            browser.close()
    finally:
        stop_server(process)


def test_gvsl_web_starts_the_front_end_with_its_own_options():
    done = subprocess.run([sys.executable, "-m", "gvsl", "web", "--host", "0.0.0.0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "give an access token with --token" in done.stderr
    done = subprocess.run([sys.executable, "-m", "gvsl", "web", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--data-root" in done.stdout
