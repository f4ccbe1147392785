"""One browser user's GVSL session: the web front end's logic, without trame or Qt.

The same layers as the Slicer panel: the engine (``gvsl``, no slicer) <- the MRML logic
(``GVSLModuleLib.GVSLLogic``) <- a front end. This class is what the web page calls; it
owns the volumes the user opened, the background ``gvsl match`` child process (the same
``GVSLJob`` the panel runs, so progress, Cancel and the child's errors behave alike) and the
heatmap queries on the cached features. pytest drives it on slicer-core without a browser.

Files: the server only reads volumes from under ``data_root`` (a path the user types is
resolved there and refused if it leaves it), from an upload, or the generated sample pair;
everything it writes goes to ``work_dir``.
"""
from __future__ import annotations

import io
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from GVSLModuleLib import mrml_io
from GVSLModuleLib.jobs import GVSLJob
from GVSLModuleLib.logic import GVSLLogic, MatchPairResult, match_summary

ROLES = ("fixed", "moving")
# What the readers below accept; anything else is refused by name before SimpleITK sees it.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_UPLOAD_BYTES = 2 << 30
TRAINING_KINDS = ("pretrain", "finetune")
# Seconds a training child may take to write its checkpoint and exit after Cancel (as the panel).
TRAINING_STOP_GRACE_S = 120.0


class SessionError(ValueError):
    """A problem the page shows to the user as it is (it names the file and what is wrong)."""


def _suffix_ok(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES)


def _inside_root(data_root: Path, typed: str) -> Tuple[Path, Path]:
    """(root, path) of ``typed`` (relative to ``data_root``, or absolute inside it), resolved;
    refused when it leaves the root (``..``, links, absolute paths elsewhere)."""
    root = Path(data_root).resolve()
    candidate = Path(typed.strip()).expanduser()
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if path != root and root not in path.parents:
        raise SessionError(f"{typed}: outside the data folder {root}; this server only reads files under it")
    return root, path


def resolve_under_root(data_root: Path, typed: str) -> Path:
    """``typed`` (relative to ``data_root``, or absolute inside it) as an existing volume file."""
    if not typed or not typed.strip():
        raise SessionError("no file given: type a path under the data folder")
    root, path = _inside_root(data_root, typed)
    if not path.exists():
        raise SessionError(f"{typed}: no such file under {root}")
    if not path.is_file():
        raise SessionError(f"{typed}: is a folder, not a volume file")
    if not _suffix_ok(path.name):
        raise SessionError(f"{typed}: not a volume file this server reads ({', '.join(VOLUME_SUFFIXES)})")
    return path


def resolve_folder_under_root(data_root: Optional[Path], typed: str, what: str) -> Path:
    """``typed`` (relative to ``data_root``, or absolute inside it) as an existing folder."""
    if data_root is None:
        raise SessionError(f"this server was started without a data folder (--data-root): no {what} to read")
    if not typed or not typed.strip():
        raise SessionError(f"no {what} given: type a folder under the data folder ('.' is the data folder itself)")
    root, path = _inside_root(data_root, typed)
    if not path.is_dir():
        raise SessionError(f"{typed}: no such folder under {root}" if not path.exists() else
                           f"{typed}: is a file; the {what} is a folder of volumes")
    return path


def safe_run_name(typed: str) -> str:
    """A run's folder name under the work folder: letters, digits, '-', '_' and '.' only."""
    name = (typed or "").strip()
    if not name or name in (".", "..") or any(not (c.isalnum() or c in "-_.") for c in name):
        raise SessionError(f"run name {typed!r}: use letters, digits, '-', '_' or '.' (it names a folder)")
    return name


def loss_curve_svg(points: Sequence[Tuple[float, float]], width: int = 320, height: int = 120) -> str:
    """The loss curve as a small inline SVG (steps on x, loss on y, its range written beside it);
    "" for fewer than two points. No plotting library: the page shows it as it is."""
    if len(points) < 2:
        return ""
    steps = [float(p[0]) for p in points]
    losses = [float(p[1]) for p in points]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(losses), max(losses)
    pad = 4.0
    span_x, span_y = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    coordinates = " ".join(f"{pad + (x - x0) / span_x * (width - 2 * pad):.1f},"
                           f"{height - pad - (y - y0) / span_y * (height - 2 * pad):.1f}"
                           for x, y in zip(steps, losses))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" id="gvsl-loss-svg">'
            f'<rect width="{width}" height="{height}" fill="#fafafa" stroke="#ccc"/>'
            f'<polyline fill="none" stroke="#1976d2" stroke-width="1.5" points="{coordinates}"/>'
            f'<text x="{pad + 2}" y="12" font-size="10">{y1:.4g}</text>'
            f'<text x="{pad + 2}" y="{height - pad - 2}" font-size="10">{y0:.4g}</text>'
            f'<text x="{width - pad - 2}" y="{height - pad - 2}" font-size="10" text-anchor="end">'
            f'step {int(x1)}</text></svg>')


def read_volume(path: Path, shown_name: str) -> sitk.Image:
    """The engine's reader and checks (``gvsl.data.read_image``: 3D, scalar, complete, finite), its
    message naming ``shown_name`` (what the user typed or uploaded) instead of the server's path."""
    from gvsl.data import InputError, read_image
    try:
        return read_image(path)
    except InputError as error:
        raise SessionError(str(error).replace(str(path), shown_name)) from None


@dataclass
class MatchStatus:
    state: str = "idle"  # idle | running | done | cancelled | failed
    progress: float = 0.0  # 0..1
    message: str = ""
    summary: str = ""
    metrics: Dict = field(default_factory=dict)
    result_folder: Optional[str] = None


@dataclass
class TrainingStatus:
    kind: str = ""  # pretrain | finetune
    state: str = "idle"  # idle | running | done | stopped | failed
    progress: float = 0.0
    message: str = ""
    losses: List[Tuple[int, float]] = field(default_factory=list)  # (step, total loss)
    run_folder: Optional[str] = None
    checkpoint: Optional[str] = None  # what the run produced (pretrain: last.pt, finetune: best.pt)


def _drain(job: GVSLJob, handle) -> bool:
    """Hand every event the child has sent to ``handle``; once it has exited, wait for it, read
    what its output threads still held (its last progress and ``done``), reap what it left behind.
    Returns True while it still runs."""
    for event in job.poll():
        handle(event)
    if job.running:
        return True
    job.wait(timeout=30)
    for event in job.poll():
        handle(event)
    job.finish()
    return False


def _wait_while_running(poll, what: str, timeout_s: float, interval_s: float):
    deadline = time.monotonic() + timeout_s
    while (status := poll()).state == "running":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} still running after {timeout_s:.0f} s")
        time.sleep(interval_s)
    return status


class WebSession:
    """The web page's actions on one MRML scene."""

    def __init__(self, scene, work_dir, data_root=None, checkpoint=None, python=None, device="auto"):
        self.scene = scene
        self.logic = GVSLLogic(scene)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_root = Path(data_root).resolve() if data_root else None
        self.checkpoint, self.python, self.device = checkpoint, python, device
        self.volumes: Dict[str, object] = {}
        self.job: Optional[GVSLJob] = None
        self.status = MatchStatus()
        self.result: Optional[MatchPairResult] = None
        self._runs = 0
        self._warm_up = None
        self.training_job: Optional[GVSLJob] = None
        self.training = TrainingStatus()

    # ------------------------------------------------------------------ inputs
    def _add_volume(self, role: str, image: sitk.Image, name: str):
        if role not in ROLES:
            raise SessionError(f"unknown role {role!r}: one of {ROLES}")
        node = self.volumes.get(role)
        if node is None or self.scene.GetNodeByID(node.GetID()) is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.SetName(name)
        mrml_io.update_volume_from_image(node, image)
        mrml_io.ensure_display(node)
        self.volumes[role] = node
        self.result = None  # a new input makes the last answer stale
        self.logic.lastMatch = None
        return node

    def load_path(self, role: str, typed: str):
        if self.data_root is None:
            raise SessionError("this server was started without a data folder (--data-root): upload a file "
                               "or open the sample pair")
        path = resolve_under_root(self.data_root, typed)
        return self._add_volume(role, read_volume(path, typed), Path(typed).name.split(".")[0])

    def load_upload(self, role: str, filename: str, content: bytes):
        name = Path(filename or "").name
        if not name or not _suffix_ok(name):
            raise SessionError(f"{filename or 'upload'}: not a volume file this server reads "
                               f"({', '.join(VOLUME_SUFFIXES)})")
        if len(content) > MAX_UPLOAD_BYTES:
            raise SessionError(f"{name}: {len(content) / 2**30:.1f} GiB, above this server's upload limit")
        folder = self.work_dir / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{role}_{name}"
        partial = folder / f".{path.name}.partial"
        partial.write_bytes(content)
        partial.replace(path)
        return self._add_volume(role, read_volume(path, name), name.split(".")[0])

    def load_sample_pair(self):
        from GVSLModuleLib.logic import sample_images
        images = sample_images()
        (fixed_name, fixed), (moving_name, moving) = images.items()
        return self._add_volume("fixed", fixed, fixed_name), self._add_volume("moving", moving, moving_name)

    # ------------------------------------------------------------------- match
    def start_match(self, refine_iterations=None, time_budget_s=None, refine_detail="full") -> MatchStatus:
        missing = [role for role in ROLES if role not in self.volumes]
        if missing:
            raise SessionError(f"open a {' and a '.join(missing)} volume first")
        if self.job is not None and self.job.running:
            raise SessionError("Match pair is already running: wait for it or Cancel")
        self._runs += 1
        folder = self.work_dir / f"match_{self._runs:03d}"
        job, result_folder = self.logic.matchJob(self.volumes["fixed"], self.volumes["moving"], self.checkpoint,
                                                 self.device, workFolder=folder, refineIterations=refine_iterations,
                                                 timeBudgetSeconds=time_budget_s, refineDetail=refine_detail)
        if self.python:
            job.python = self.python
        self.job = job.start()
        self.status = MatchStatus("running", 0.0, "starting gvsl match", result_folder=result_folder)
        return self.status

    def poll(self) -> MatchStatus:
        """Read the child's events; once it has ended, import its answer into the scene."""
        job, status = self.job, self.status
        if job is None or status.state != "running":
            return status
        def handle(event):
            kind = event.get("event")
            if kind == "progress" and event.get("total"):
                status.progress = min(1.0, float(event["step"]) / float(event["total"]))
                status.message = str(event.get("stage") or event.get("message") or "matching")
            elif kind in ("stage", "output") and event.get("message"):
                status.message = str(event["message"])

        if _drain(job, handle):
            return status
        if job.stop_requested and job.returncode != 0:
            status.state, status.message = "cancelled", "cancelled: nothing was imported"
        elif job.returncode != 0:
            status.state, status.message = "failed", job.error_message() or f"gvsl match exited with {job.returncode}"
        else:
            self.result = self.logic.importMatchFolder(status.result_folder, self.volumes["fixed"],
                                                       self.volumes["moving"])
            self.logic.showDeformationGrid(True)
            status.metrics = dict(self.result.metrics)
            status.summary = match_summary(status.metrics)
            status.state, status.progress = "done", 1.0
            status.message = "stopped on request: the answer reached so far" if job.stop_requested else "done"
            self._warm_up_queries()
        return status

    def _warm_up_queries(self):
        """Load the cached features and run one throw-away query at the fixed volume's centre, in
        a thread: the first click would otherwise pay that (torch's import and first calls, about
        2 s here). Engine only, no MRML; a click meanwhile waits for it (``heatmap_at``)."""
        import threading
        last = self.logic.lastMatch
        if last is None:
            return

        def warm():
            engine = last.result  # loads state.npz (torch, features) on first use
            size = engine.fixed.GetSize()
            engine.heatmap(engine.fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size]))

        self._warm_up = threading.Thread(target=warm, name="gvsl-heatmap-warm-up", daemon=True)
        self._warm_up.start()

    def wait(self, timeout_s: float = 600.0, interval_s: float = 0.2) -> MatchStatus:
        return _wait_while_running(self.poll, "gvsl match", timeout_s, interval_s)

    def cancel(self, grace_s: float = 20.0):
        """Ask the child to stop (it saves nothing half-done); kill its tree after ``grace_s``."""
        if self.job is not None and self.job.running:
            self.job.request_stop()
            self.job.stop(grace_s)
        return self.poll()

    # ----------------------------------------------------------------- queries
    def heatmap_at(self, point_ras: Sequence[float], query: str = "fixed") -> Dict:
        """The similarity heatmap of the feature at ``point_ras`` of the ``query`` volume over the
        other volume of the matched pair, and where it matches best (RAS, mm)."""
        if self.result is None:
            raise SessionError("run Match pair first: the heatmap uses its cached features")
        if query not in ROLES:
            raise SessionError(f"unknown volume {query!r}: one of {ROLES}")
        if self._warm_up is not None:
            self._warm_up.join()  # the same result object: never load it twice
            self._warm_up = None
        heatmap, best_ras = self.logic.similarityHeatmap(np.asarray(point_ras, float), self.volumes[query])
        self.logic.updateBestMatchMarkup(best_ras)
        other = "moving" if query == "fixed" else "fixed"
        return {"heatmap": heatmap, "best_match_ras": [float(v) for v in best_ras], "target": other,
                "best_similarity": float(heatmap.GetAttribute("GVSL.bestSimilarity"))}

    def result_archive(self) -> bytes:
        """The last result folder as a zip (what the page offers for download)."""
        if self.status.state != "done" or not self.status.result_folder:
            raise SessionError("no result to download yet: run Match pair first")
        folder = Path(self.status.result_folder)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                archive.write(path, path.relative_to(folder).as_posix())
        return buffer.getvalue()

    def result_files(self) -> List[str]:
        if not self.status.result_folder:
            return []
        folder = Path(self.status.result_folder)
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    # ---------------------------------------------------------------- training
    def start_training(self, kind: str, data: str, run_name: str, labels: str = "", classes: str = "",
                       iterations: int = 1000, patch: int = 64, width: float = 0.25, learning_rate: float = 1e-4,
                       init: str = "", resume: bool = False, spacing_mm=None,
                       extra: Sequence[str] = ()) -> TrainingStatus:
        """Start ``gvsl pretrain`` (``data``: a folder of volumes) or ``gvsl finetune`` (``data``:
        images, ``labels``: label maps, ``classes``: comma-separated names) on folders under the
        data root; the run goes to ``WORK/runs/RUN_NAME``, where ``resume`` continues it."""
        if kind not in TRAINING_KINDS:
            raise SessionError(f"unknown training {kind!r}: one of {TRAINING_KINDS}")
        if self.training_job is not None and self.training_job.running:
            raise SessionError(f"{self.training.kind} is already running: wait for it or Cancel")
        try:
            iterations, patch, width, learning_rate = int(iterations), int(patch), float(width), float(learning_rate)
            spacing_mm = None if spacing_mm in (None, "") else float(spacing_mm)
        except (TypeError, ValueError):
            raise SessionError("iterations and patch want whole numbers; width, learning rate and spacing "
                               "numbers") from None
        if iterations < 1 or patch < 16 or width <= 0 or learning_rate <= 0 or (spacing_mm is not None
                                                                                 and spacing_mm <= 0):
            raise SessionError("iterations >= 1, patch >= 16, and width, learning rate and spacing > 0, please")
        if spacing_mm is not None:
            extra = [*extra, "--spacing", str(spacing_mm)]
        data_folder = resolve_folder_under_root(self.data_root, data,
                                                "images folder" if kind == "finetune" else "data folder")
        run_folder = self.work_dir / "runs" / safe_run_name(run_name)
        if "--log-every" not in extra:  # a curve of at most ~200 points, and points for short runs too
            extra = [*extra, "--log-every", str(max(1, iterations // 200))]
        last = run_folder / "checkpoints" / "last.pt"
        if resume and not last.exists():
            raise SessionError(f"run {run_name}: nothing to resume (no checkpoint yet); start it instead")
        if not resume and last.exists():
            raise SessionError(f"run {run_name}: already has a checkpoint; Resume it or choose another name")
        if kind == "pretrain":
            init_args = ["--init", self._resolve_checkpoint(init)] if init else []
            job = self.logic.pretrainJob(str(data_folder), str(run_folder), patch, iterations, 1, width,
                                         learning_rate, self.device, resume, extra=[*init_args, *extra])
            produced = last
        else:
            label_folder = resolve_folder_under_root(self.data_root, labels, "labels folder")
            names = [c.strip() for c in (classes or "").split(",") if c.strip()]
            if not names:
                raise SessionError("fine-tuning needs the class names of labels 1..K, comma-separated")
            job = self.logic.finetuneJob(str(data_folder), str(label_folder), str(run_folder), names,
                                         self._resolve_checkpoint(init) if init else "scratch", "full", patch,
                                         iterations, 1, learning_rate, self.device, resume,
                                         extra=[*(["--width", str(width)] if not init else []), *extra])
            produced = run_folder / "checkpoints" / "best.pt"
        if self.python:
            job.python = self.python
        self.training_job = job.start()
        self.training = TrainingStatus(kind, "running", 0.0, f"starting gvsl {kind}", [], str(run_folder),
                                       str(produced))
        return self.training

    def _resolve_checkpoint(self, typed: str) -> str:
        """A checkpoint the user names: one of this server's runs (``runs/NAME/...``, under the work
        folder) or a file under the data root."""
        typed = typed.strip()
        for root in (self.work_dir, self.data_root):
            if root is None:
                continue
            try:
                _, path = _inside_root(root, typed)
            except SessionError:
                continue
            if path.is_file():
                return str(path)
        raise SessionError(f"{typed}: no such checkpoint among this server's runs or under the data folder")

    def poll_training(self) -> TrainingStatus:
        job, status = self.training_job, self.training
        if job is None or status.state != "running":
            return status
        def handle(event):
            kind = event.get("event")
            if kind == "progress" and event.get("total"):
                status.progress = min(1.0, float(event["step"]) / float(event["total"]))
                losses = event.get("loss") or {}
                if losses:
                    value = losses.get("total", next(iter(losses.values())))
                    if value is not None:
                        status.losses.append((int(event["step"]), float(value)))
                shown = ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if v is not None)
                status.message = f"step {event['step']}/{event['total']}  {shown}"
            elif kind == "validation" and "mean_dice" in event:
                status.message = f"validation Dice {event['mean_dice']:.3f} at step {event['step']}"
            elif kind == "start" and event.get("step"):
                status.message = f"resumed at step {event['step']}"

        job.kill_if_overdue(TRAINING_STOP_GRACE_S)
        if _drain(job, handle):
            return status
        done = job.last("done") or {}
        if job.stop_requested:
            status.state = "stopped"
            status.message = ("stopped and killed (it did not exit in time)" if job.killed else
                              f"at step {done.get('step', '?')}; Resume continues it")
        elif job.returncode != 0:
            status.state = "failed"
            status.message = job.error_message() or f"gvsl {status.kind} exited with {job.returncode}"
        else:
            status.state, status.progress = "done", 1.0
            status.message = f"{done.get('step', '?')} steps, checkpoint {Path(status.checkpoint).name}"
        if not Path(status.checkpoint or "").exists():
            status.checkpoint = None
        return status

    def wait_training(self, timeout_s: float = 600.0, interval_s: float = 0.2) -> TrainingStatus:
        return _wait_while_running(self.poll_training, f"gvsl {self.training.kind}", timeout_s, interval_s)

    def cancel_training(self):
        """Ask the child to save and stop (non-blocking; ``poll_training`` kills it when overdue)."""
        if self.training_job is not None and self.training_job.running:
            self.training_job.request_stop()
            self.training.message = "stopping: the run saves its checkpoint, then exits ..."
        return self.training

    def use_trained_model(self):
        """Match pair from now on uses the pre-training run's checkpoint."""
        status = self.training
        if status.kind != "pretrain" or not status.checkpoint:
            raise SessionError("no pre-trained checkpoint yet: run pre-training first")
        self.checkpoint = status.checkpoint
        return self.checkpoint
