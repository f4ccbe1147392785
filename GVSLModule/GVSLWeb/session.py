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
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from GVSLModuleLib import mrml_io
from GVSLModuleLib.jobs import GVSLJob
from GVSLModuleLib.logic import GVSLLogic, MatchPairResult, match_summary

ROLES = ("fixed", "moving")
# What the readers below accept; anything else is refused by name before SimpleITK sees it.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_UPLOAD_BYTES = 2 << 30


class SessionError(ValueError):
    """A problem the page shows to the user as it is (it names the file and what is wrong)."""


def _suffix_ok(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES)


def resolve_under_root(data_root: Path, typed: str) -> Path:
    """``typed`` (relative to ``data_root``, or absolute inside it) as an existing volume file."""
    if not typed or not typed.strip():
        raise SessionError("no file given: type a path under the data folder")
    root = Path(data_root).resolve()
    candidate = Path(typed.strip()).expanduser()
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if path != root and root not in path.parents:
        raise SessionError(f"{typed}: outside the data folder {root}; this server only reads files under it")
    if not path.exists():
        raise SessionError(f"{typed}: no such file under {root}")
    if not path.is_file():
        raise SessionError(f"{typed}: is a folder, not a volume file")
    if not _suffix_ok(path.name):
        raise SessionError(f"{typed}: not a volume file this server reads ({', '.join(VOLUME_SUFFIXES)})")
    return path


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
    def start_match(self, refine_iterations=None, time_budget_s=None) -> MatchStatus:
        missing = [role for role in ROLES if role not in self.volumes]
        if missing:
            raise SessionError(f"open a {' and a '.join(missing)} volume first")
        if self.job is not None and self.job.running:
            raise SessionError("Match pair is already running: wait for it or Cancel")
        self._runs += 1
        folder = self.work_dir / f"match_{self._runs:03d}"
        job, result_folder = self.logic.matchJob(self.volumes["fixed"], self.volumes["moving"], self.checkpoint,
                                                 self.device, workFolder=folder, refineIterations=refine_iterations,
                                                 timeBudgetSeconds=time_budget_s)
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
        for event in job.poll():
            kind = event.get("event")
            if kind == "progress" and event.get("total"):
                status.progress = min(1.0, float(event["step"]) / float(event["total"]))
                status.message = str(event.get("stage") or event.get("message") or "matching")
            elif kind in ("stage", "output") and event.get("message"):
                status.message = str(event["message"])
        if job.running:
            return status
        job.wait(timeout=30)
        job.poll()
        job.finish()
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
        return status

    def wait(self, timeout_s: float = 600.0, interval_s: float = 0.2) -> MatchStatus:
        deadline = time.monotonic() + timeout_s
        while self.poll().state == "running":
            if time.monotonic() > deadline:
                raise TimeoutError(f"gvsl match still running after {timeout_s:.0f} s")
            time.sleep(interval_s)
        return self.status

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
