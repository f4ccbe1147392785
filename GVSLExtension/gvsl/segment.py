"""``gvsl segment``: apply a fine-tuned checkpoint to a volume.

The image is normalised and resampled as in training, segmented by MONAI's Gaussian
sliding-window inference, and the label map is resampled (nearest neighbour) back onto
the input's own grid, so it opens on top of the input anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Union

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import CheckpointError, read_checkpoint
from .data import fitting_grid, normalized_image, read_image, resample_to
from .network import SegmentationNet


@dataclass
class Segmenter:
    model: SegmentationNet
    classes: List[str]
    preprocessing: dict
    device: torch.device

    @staticmethod
    def load(path, device="auto") -> "Segmenter":
        from .runtime import pick_device
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
        return Segmenter(model.to(dev).eval(), list(ckpt["classes"]), dict(ckpt["preprocessing"]), dev)

    def __call__(self, image: Union[str, sitk.Image], overlap: float = 0.5) -> sitk.Image:
        """Label map (uint8, 0 = background) on the input image's grid."""
        from .finetune import predict_volume
        if not isinstance(image, sitk.Image):
            image = read_image(image)
        normalized, _ = normalized_image(image, self.preprocessing.get("preset", "auto"))
        grid = fitting_grid([image], float(self.preprocessing.get("spacing", 1.0)), max_size=None, multiple=1)[0]
        working = sitk.GetArrayFromImage(resample_to(normalized, grid))
        probs = predict_volume(self.model, working, self.preprocessing.get("patch", [128, 128, 128]), self.device,
                               overlap=overlap, amp=self.device.type == "cuda")
        labels = sitk.GetImageFromArray(probs.argmax(0).astype(np.uint8))
        grid.apply_to(labels)
        return sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def class_volumes_ml(labels: sitk.Image, classes: List[str]) -> Dict[str, float]:
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=len(classes) + 1)
    return {name: float(counts[k + 1]) * voxel_ml for k, name in enumerate(classes)}


def segment_cli(args):
    from .runtime import Reporter, error_events
    from .safe_io import StagedFiles, check_writable_folder
    reporter = Reporter(args.progress)
    with error_events(reporter):
        reporter.event("start", step=0, total=2)
        out = Path(args.out)
        check_writable_folder(out.parent)  # before the work, not after it
        segmenter = Segmenter.load(args.checkpoint, args.device)
        labels = segmenter(args.image, overlap=args.overlap)
        with StagedFiles(out.parent) as stage:  # the label map and its class list, complete or not at all
            stage.write_image(out.name, labels)
            stage.write_text(out.name.split(".")[0] + "_classes.txt",
                             "".join(f"{k + 1} {name}\n" for k, name in enumerate(segmenter.classes)))
        volumes = class_volumes_ml(labels, segmenter.classes)
        print(f"{'label':>5}  {'class':28s} {'volume (mL)':>12}")
        for k, (name, ml) in enumerate(volumes.items(), start=1):
            print(f"{k:>5}  {name:28s} {ml:12.2f}")
        reporter.event("done", out=str(out), volumes_ml=volumes)
