"""Browser front end latency and server memory, measured in headless Chromium (issue 18).

Starts ``python -m GVSLWeb`` on a synthetic shifted pair of ``--size``^3 voxels (1 mm; the
anatomy of ``gvsl.samples.synthetic_volume``), drives Debian's chromium with Playwright and
prints one table:

* first frame: page load (navigation start) -> the first view image drawn in the page;
* open pair: Open clicked for both volumes -> both names shown (the server reads the files);
* Match pair: click -> metrics shown (the child process, its refinement, the import);
* click -> heatmap frame, first and following clicks: mouse click in the fixed view -> the
  first view image drawn after the page shows the best match. The server loads the cached
  features in the background once the metrics show; the first click comes ``--think-s``
  after that (0 measures a click that has to wait for the loading);
* server memory: resident set (VmRSS) and peak (VmHWM) of the server process after each stage,
  and the Match pair child's peak resident set (polled).

A frame is counted when the page hands an image to the browser (``URL.createObjectURL`` or a
canvas ``drawImage``, wrapped by an init script), so it includes decode but not the display's
vsync. Run on an idle machine (no training, no tests)::

    apt-get install chromium && pip install -e ".[web]"
    python benchmarks/web_latency.py --size 256 [--clicks 5] [--out benchmarks/results/web_latency_cpu.txt]
    python benchmarks/web_latency.py --sample --screenshots Resources/Screenshots/web_sample   # a real CT
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "GVSLExtension"))
from common import markdown_table  # noqa: E402

FRAME_HOOK = """
window.__gvslFrames = [];
const note = () => window.__gvslFrames.push(performance.now());
const createObjectURL = URL.createObjectURL;
URL.createObjectURL = function (...args) { note(); return createObjectURL.apply(this, args); };
const drawImage = CanvasRenderingContext2D.prototype.drawImage;
CanvasRenderingContext2D.prototype.drawImage = function (...args) { note(); return drawImage.apply(this, args); };
"""


def memory_mib(pid: int) -> dict:
    """VmRSS and VmHWM of ``pid`` in MiB (Linux /proc)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def descendants(pid: int):
    """Process ids whose parent chain reaches ``pid`` (Linux /proc, no psutil)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


class ChildPeak(threading.Thread):
    """Polls the server's descendants (the Match pair child) for their largest resident set."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.peak_mib, self.running = pid, interval_s, 0.0, True

    def run(self):
        while self.running:
            for child in descendants(self.pid):
                try:
                    self.peak_mib = max(self.peak_mib, memory_mib(child).get("VmHWM", 0.0))
                except OSError:
                    pass
            time.sleep(self.interval_s)


def write_pair(folder: Path, size: int, shift_mm=(4.0, -3.0, 2.0)):
    from gvsl.samples import synthetic_volume
    folder.mkdir(parents=True, exist_ok=True)
    fixed, _ = synthetic_volume(size=(size,) * 3, spacing=(1.0, 1.0, 1.0), seed=3)
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, shift_mm), sitk.sitkLinear, -1000.0)
    sitk.WriteImage(fixed, str(folder / "fixed.nrrd"))
    sitk.WriteImage(moving, str(folder / "moving.nrrd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="voxels per side of the synthetic pair (1 mm)")
    parser.add_argument("--clicks", type=int, default=5, help="heatmap clicks to time")
    parser.add_argument("--think-s", type=float, default=3.0,
                        help="pause between the metrics appearing and the first click (a user's reaction; the "
                             "server loads the features meanwhile)")
    parser.add_argument("--checkpoint", default=None, help="model (default: the shipped one)")
    parser.add_argument("--chromium", default=os.environ.get("GVSL_CHROMIUM") or shutil.which("chromium"))
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--sample", action="store_true",
                        help="open the bundled sample pair (the chest CT and its deformed twin) with the page's "
                             "Open sample pair instead of the synthetic --size pair")
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="save the page here after Match pair and after the first and last clicks")
    args = parser.parse_args(argv)
    if not args.chromium:
        parser.error("no chromium found: apt-get install chromium (or --chromium PATH)")
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="gvsl-web-bench-"))
    (work / "data").mkdir(parents=True)
    if not args.sample:
        write_pair(work / "data", args.size)
    pair_name = "sample pair (chest CT)" if args.sample else f"{args.size}^3"

    def screenshot(page, name):
        if args.screenshots:
            args.screenshots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.screenshots / f"{name}.png"))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "GVSLModule"), str(REPO / "GVSLExtension"),
                                                       os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "GVSLWeb", "--port", str(port), "--data-root", str(work / "data"),
               "--work-dir", str(work / "work"), "--device", "cpu"]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    log = open(work / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    rows, memory = [], []

    def remember(stage):
        memory.append((stage, memory_mib(server.pid)))

    try:
        t0 = time.monotonic()
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if server.poll() is not None or time.monotonic() - t0 > 180:
                raise SystemExit("server did not start:\n" + (work / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        rows.append(("server start -> listening", f"{time.monotonic() - t0:.2f}"))
        remember("started")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.add_init_script(FRAME_HOOK)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("window.__gvslFrames.length > 0", timeout=120_000)
            rows.append(("page load -> first frame", f"{page.evaluate('window.__gvslFrames[0]') / 1000:.2f}"))

            t = time.monotonic()
            if args.sample:
                page.locator("#gvsl-sample").click()
                # The names read "-" until a volume is open.
                page.wait_for_function("() => /Moving: [^-\\s]/.test(document.body.innerText)", timeout=300_000)
            else:
                for role in ("fixed", "moving"):
                    page.locator(f"#gvsl-{role}-path").fill(f"{role}.nrrd")
                    page.locator(f"#gvsl-{role}-open").click()
                page.get_by_text("Moving: moving").wait_for(timeout=300_000)
            rows.append((f"open pair ({pair_name}{'' if args.sample else ', two clicks'}) -> names shown",
                         f"{time.monotonic() - t:.2f}"))
            remember("pair opened")

            peak = ChildPeak(server.pid)
            peak.start()
            t = time.monotonic()
            page.locator("#gvsl-match").click()
            page.locator("#gvsl-summary").wait_for(state="visible", timeout=900_000)
            rows.append(("Match pair click -> metrics shown", f"{time.monotonic() - t:.2f}"))
            peak.running = False
            peak.join()
            remember("matched + imported")
            screenshot(page, "web_matched")

            views = page.locator("img, canvas")
            boxes = [b for b in (views.nth(i).bounding_box() for i in range(views.count())) if b and b["width"] > 100]
            left = min(boxes, key=lambda b: b["x"])
            latencies = []
            page.wait_for_timeout(1000 * args.think_s)
            for k in range(args.clicks):
                previous = page.locator("#gvsl-best-match").inner_text() if k else ""
                # Points spread around the centre of the fixed view, inside the volume.
                fx, fy = 0.42 + 0.16 * ((k * 37) % 10) / 10, 0.42 + 0.16 * ((k * 53) % 10) / 10
                clicked = page.evaluate("performance.now()")
                page.mouse.click(left["x"] + fx * left["width"], left["y"] + fy * left["height"])
                try:
                    page.wait_for_function(
                        "([previous]) => { const e = document.querySelector('#gvsl-best-match');"
                        " return e && e.offsetParent !== null && e.innerText.includes('->')"
                        " && e.innerText !== previous; }", arg=[previous], timeout=120_000, polling=10)
                except Exception:
                    error = page.locator("#gvsl-error")
                    raise SystemExit(f"click {k + 1}: no new best match within 120 s"
                                     + (f"; the page says: {error.inner_text()}" if error.count() else "")) from None
                shown = page.evaluate("performance.now()")
                page.wait_for_function("([t]) => window.__gvslFrames.some(f => f > t)", arg=[shown],
                                       timeout=30_000, polling=10)
                frame = page.evaluate("([t]) => window.__gvslFrames.find(f => f > t)", [shown])
                latencies.append(((shown - clicked) / 1000, (frame - clicked) / 1000))
                if k in (0, args.clicks - 1):
                    page.wait_for_timeout(500)  # the other view's frame too
                    screenshot(page, f"web_heatmap_click{k + 1}")
            remember("after heatmap clicks")
            browser.close()
        first_text, first_frame = latencies[0]
        rows.append((f"first click ({args.think_s:g} s after the metrics) -> best match shown / heatmap frame", f"{first_text:.2f} / {first_frame:.2f}"))
        if len(latencies) > 1:
            rest = latencies[1:]
            rows.append((f"later clicks (median of {len(rest)}) -> best match shown / heatmap frame",
                         f"{statistics.median(t for t, _ in rest):.2f} / {statistics.median(f for _, f in rest):.2f}"))
    finally:
        os.killpg(server.pid, 9)
        server.wait(timeout=30)
        log.close()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    table = markdown_table(["stage", "seconds"], rows)
    memory_table = markdown_table(["server after", "RSS MiB", "peak MiB"],
                                  [(stage, f"{m['VmRSS']:.0f}", f"{m['VmHWM']:.0f}") for stage, m in memory]
                                  + [("Match pair child (peak)", "", f"{peak.peak_mib:.0f}")])
    text = (f"# web_latency.py {'--sample' if args.sample else f'--size {args.size}'} --clicks {args.clicks} ({machine}, "
            f"{time.strftime('%Y-%m-%d')})\n\n{table}\n\n{memory_table}\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
