"""``gvsl segment``: apply a fine-tuned checkpoint to a volume.

The image is normalised and resampled as in training (to the checkpoint's spacing only,
never cropped or coarsened: the network sees what it learned from), segmented by MONAI's
Gaussian sliding-window inference in batches of windows, and the label map is resampled
(nearest neighbour) back onto the input's own grid, so it opens on top of the input
anywhere. Progress is reported per batch of windows; when the whole job will take long,
a ``warning`` event says how many windows there are and about how long they will take.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import CheckpointError, read_checkpoint
from .data import fitting_grid, normalized_image, read_image, resample_to
from .network import SegmentationNet
from .runtime import Precision

# Warn when the sliding window is expected to take longer than this.
LONG_SEGMENTATION_S = 60.0


@dataclass
class Segmenter:
    model: SegmentationNet
    classes: List[str]
    preprocessing: dict
    device: torch.device
    precision: Precision

    @staticmethod
    def load(path, device="auto", precision="auto") -> "Segmenter":
        from .runtime import pick_device, resolve_precision
        ckpt = read_checkpoint(path)
        if ckpt.get("format") != "gvsl" or ckpt.get("kind") != "finetune":
            raise CheckpointError(f"{path}: not a fine-tuned segmentation checkpoint (run gvsl finetune first)")
        dev = pick_device(device)
        model = SegmentationNet(ckpt["model"]["num_classes"], width=ckpt["model"]["width"])
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            lines = str(exc).strip().splitlines()
            raise CheckpointError(f"{path}: its weights do not fit the network it describes "
                                  f"({lines[1].strip() if len(lines) > 1 else lines[0][:200]}); the file is damaged") \
                from None
        chosen = resolve_precision(dev, precision)
        chosen.prepare(model)
        return Segmenter(model.to(dev).eval(), list(ckpt["classes"]), dict(ckpt["preprocessing"]), dev, chosen)

    def __call__(self, image: Union[str, sitk.Image], overlap: float = 0.5, window_batch: Optional[int] = None,
                 on_windows: Optional[Callable[[int, int], None]] = None) -> sitk.Image:
        """Label map (uint8, 0 = background) on the input image's grid. ``on_windows(done,
        total)`` is called after each batch of sliding windows."""
        from .finetune import predict_volume
        if not isinstance(image, sitk.Image):
            image = read_image(image)
        normalized, _ = normalized_image(image, self.preprocessing.get("preset", "auto"))
        grid = fitting_grid([image], float(self.preprocessing.get("spacing", 1.0)), max_size=None, multiple=1)[0]
        working = sitk.GetArrayFromImage(resample_to(normalized, grid))
        probs = predict_volume(self.model, working, self.preprocessing.get("patch", [128, 128, 128]), self.device,
                               overlap=overlap, precision=self.precision, window_batch=window_batch,
                               on_windows=on_windows)
        labels = sitk.GetImageFromArray(probs.argmax(0).astype(np.uint8))
        grid.apply_to(labels)
        return sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def class_volumes_ml(labels: sitk.Image, classes: List[str]) -> Dict[str, float]:
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=len(classes) + 1)
    return {name: float(counts[k + 1]) * voxel_ml for k, name in enumerate(classes)}


class SegmentStopped(Exception):
    """A stop was requested during the sliding window: no label map is written."""


class WindowProgress:
    """Turns ``on_windows(done, total)`` calls into ``progress`` events (step = windows done)
    and, once the first batch has been timed, one ``warning`` event when the whole sliding
    window will take longer than ``LONG_SEGMENTATION_S``. ``stop()`` returning True (the
    panel's Stop, through ``gvsl.stopfile``) raises :class:`SegmentStopped` after the batch."""

    def __init__(self, reporter, describe: str, stop: Optional[Callable[[], bool]] = None):
        self.reporter = reporter
        self.describe = describe
        self.stop = stop
        self.t0 = time.perf_counter()
        self.warned = False

    def __call__(self, done: int, total: int):
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (total - done)
        if not self.warned and elapsed + eta > LONG_SEGMENTATION_S and done < total:
            self.warned = True
            self.reporter.event("warning", message=(
                f"{total} sliding windows ({self.describe}); about {(elapsed + eta) / 60:.1f} minutes "
                f"in all at {elapsed / done:.1f} s per window. A smaller --overlap, "
                f"a GPU (--device cuda) or a checkpoint trained at a coarser spacing would be faster."),
                windows=total, estimated_s=elapsed + eta)
        self.reporter.event("progress", step=done, total=total, loss={}, eta_s=eta, unit="windows")
        if self.stop is not None and self.stop() and done < total:
            raise SegmentStopped(f"stopped after {done} of {total} sliding windows")


LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def check_label_map_name(out: Path):
    """``--out`` must name an image file by its extension (the writer picks the format by
    it): refused before the checkpoint is even read, not after the inference."""
    if not out.name.lower().endswith(LABEL_MAP_SUFFIXES) or out.name.lower() in LABEL_MAP_SUFFIXES:
        raise ValueError(f"--out {out}: not an image file name; end it with one of "
                         f"{', '.join(LABEL_MAP_SUFFIXES)} (e.g. {out.with_name(out.name.split('.')[0] or 'seg')}.nii.gz)")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give the label map's file name")


def segment_cli(args):
    from .runtime import Reporter, StopFlag, error_events
    from .safe_io import StagedFiles, check_writable_folder
    reporter = Reporter(args.progress)
    with error_events(reporter), StopFlag() as stop:
        out = Path(args.out)
        check_label_map_name(out)
        check_writable_folder(out.parent)  # before the work, not after it
        from .data import single_series
        image = single_series(args.image)  # a DICOM folder of several series is refused here
        segmenter = Segmenter.load(args.checkpoint, args.device, getattr(args, "precision", "auto"))
        patch = segmenter.preprocessing.get("patch", [128, 128, 128])
        reporter.event("start", step=0, total=0, device=str(segmenter.device), precision=segmenter.precision.as_dict())
        describe = (f"window {'x'.join(map(str, patch))} at the checkpoint's {segmenter.preprocessing.get('spacing', 1.0)} mm, "
                    f"overlap {args.overlap}, {segmenter.device} {segmenter.precision.label}")
        if stop.requested:
            reporter.event("done", stopped=True, out=None, message="stopped before the sliding window")
            return
        try:
            labels = segmenter(image, overlap=args.overlap, window_batch=getattr(args, "window_batch", None),
                               on_windows=WindowProgress(reporter, describe, stop=lambda: stop.requested))
        except SegmentStopped as exc:  # nothing written: exit 0, as a stopped training run does
            reporter.event("done", stopped=True, out=None, message=str(exc))
            return
        with StagedFiles(out.parent) as stage:  # the label map and its class list, complete or not at all
            stage.write_image(out.name, labels)
            stage.write_text(out.name.split(".")[0] + "_classes.txt",
                             "".join(f"{k + 1} {name}\n" for k, name in enumerate(segmenter.classes)))
        volumes = class_volumes_ml(labels, segmenter.classes)
        print(f"{'label':>5}  {'class':28s} {'volume (mL)':>12}")
        for k, (name, ml) in enumerate(volumes.items(), start=1):
            print(f"{k:>5}  {name:28s} {ml:12.2f}")
        reporter.event("done", out=str(out), volumes_ml=volumes)
