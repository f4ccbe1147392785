"""``gvsl pretrain``: GVSL self-supervised pre-training, from one CPU to many GPUs."""
from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from .augment import augment_pair, damage_appearance
from .checkpoint import FORMAT, FORMAT_VERSION
from .data import PairSampler, load_training_volumes
from .losses import GVSLLoss, LossWeights
from .network import GVSL
from .runtime import (Distributed, EtaClock, MetricsLog, Reporter, StopFlag, check_finite_losses, check_grad_scale,
                      check_training_patch, error_events, gather_sampler_states, prepare_run_dir,
                      resolve_precision, resume_state, run_folder_lock, write_checkpoint)
from .safe_io import finite_or_none, write_json_atomic
from .synth import KnownPairConfig, KnownPairSource


@dataclass
class PretrainConfig:
    data: str
    out: str
    patch: List[int] = field(default_factory=lambda: [128, 128, 128])
    iters: int = 10000
    batch: int = 1
    lr: float = 1e-4
    width: float = 1.0
    device: str = "auto"
    amp: bool = False  # kept for old scripts; mixed precision is what precision="auto" picks
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (see runtime.resolve_precision)
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 10
    preset: str = "auto"
    spacing: float = 1.0
    cache_dir: Optional[str] = None
    resume: bool = False
    weights: dict = field(default_factory=lambda: asdict(LossWeights()))
    augment: bool = True
    init: Optional[str] = None  # start from these weights (ours or official)
    # Fraction of steps on known-transform pairs (gvsl.synth: real crops under a random affine +
    # elastic transform, synthetic label maps, random contrasts), supervised by the known field.
    known_pairs: float = 0.0
    known: dict = field(default_factory=lambda: KnownPairConfig().to_json())
    matching: str = "official"  # Z-matching head: official | correlation (see network.GVSL)
    match_window: Optional[int] = None  # correlation head: local soft-argmax window (network.correlation_flow)
    # constant, or cosine from lr down to lr_final over the run: a step-wise function of the
    # step, so a resumed run continues the same curve.
    lr_schedule: str = "constant"
    lr_final: float = 1e-5
    # Two-volume pairs drawn from any two volumes, or only from two volumes of the same folder
    # (one body region per folder: a chest crop is never matched to a head).
    pairs_within: str = "any"


def scheduled_lr(cfg: "PretrainConfig", step: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``cfg``."""
    if cfg.lr_schedule == "constant":
        return float(cfg.lr)
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r} (constant or cosine)")
    t = min(max(step / max(cfg.iters - 1, 1), 0.0), 1.0)
    return float(cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1.0 + math.cos(math.pi * t)))


def run_pretrain(cfg: PretrainConfig, progress: str = "auto") -> dict:
    """Run (or resume) pre-training; returns the final summary (also the ``done`` event)."""
    ddp = Distributed(cfg.device)
    reporter = Reporter(progress, enabled=ddp.is_main)
    with error_events(reporter):
        try:
            # One writer per run folder; a second run on the same --out is refused.
            with run_folder_lock(cfg.out, "gvsl pretrain", ddp.is_main,
                                 log=lambda message: reporter.event("log", message=message)):
                return _run(cfg, ddp, reporter)
        finally:
            ddp.close()


def _run(cfg: PretrainConfig, ddp: Distributed, reporter: Reporter) -> dict:
    device = ddp.device
    log = (lambda msg: reporter.event("log", message=msg)) if ddp.is_main else (lambda msg: None)
    run_dir = prepare_run_dir(cfg.out, cfg.resume, ddp.is_main, log)
    cache_dir = cfg.cache_dir or str(run_dir / "cache")
    arrays, report = load_training_volumes(cfg.data, cfg.preset, cfg.spacing, cache_dir, log=log)

    torch.manual_seed(cfg.seed)
    model = GVSL(width=cfg.width, matching=cfg.matching, match_window=cfg.match_window).to(device)
    if cfg.init:
        from .checkpoint import load_model
        from .checkpoint import CheckpointError
        init = load_model(cfg.init)
        if abs(float(init.width) - float(cfg.width)) > 1e-9:
            raise CheckpointError(f"{cfg.init}: has width {init.width:g}, this run has --width {cfg.width:g}; "
                                  f"pass --width {init.width:g} to start from these weights, or another --init")
        # Weights of another matching mode load too: only that mode's own parameters differ.
        try:
            missing, unexpected = model.load_state_dict(init.state_dict(), strict=False)
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            raise CheckpointError(f"{cfg.init}: does not fit this run's network ({len(lines) - 1} problems, first: "
                                  f"{lines[1] if len(lines) > 1 else lines[0][:200]})") from None
        if any(not k.startswith("match_") for k in missing + unexpected):
            odd = [k for k in missing + unexpected if not k.startswith("match_")]
            raise CheckpointError(f"{cfg.init}: does not fit this run's network ({len(odd)} tensors missing or "
                                  f"unexpected, e.g. {', '.join(odd[:3])})")
        log(init.load_report.summary())
    precision = resolve_precision(device, cfg.precision)
    precision.prepare(model)
    log(f"precision {precision.label} ({precision.reason})")
    check_training_patch(cfg.patch, cfg.batch, cfg.width, model, device, precision, arrays, warn=log)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = precision.grad_scaler()
    groups = None
    if cfg.pairs_within == "folder":
        groups = [str(Path(path).resolve().parent) for path in report.used]
    elif cfg.pairs_within != "any":
        raise ValueError(f"pairs_within must be 'any' or 'folder', not {cfg.pairs_within!r}")
    sampler = PairSampler(arrays, cfg.patch, seed=cfg.seed * 1000 + ddp.rank, groups=groups)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed * 1000 + ddp.rank + 1)
    known_source = KnownPairSource(sampler, cfg.patch, KnownPairConfig(**cfg.known), generator, device)

    start_step = 0
    last = run_dir / "checkpoints" / "last.pt"
    metrics = MetricsLog(run_dir / "metrics.jsonl" if ddp.is_main else None)
    if cfg.resume and last.exists():
        ckpt = resume_state(run_dir, model, optimizer, sampler, ddp, metrics, log, lr=cfg.lr)
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start_step = int(ckpt["step"])
    else:
        metrics.set_aside(log)
    if ddp.is_main:
        write_json_atomic(run_dir / "config.json", asdict(cfg))

    net = ddp.wrap(model)
    criterion = GVSLLoss(LossWeights(**cfg.weights), seed=cfg.seed + ddp.rank)
    clock = EtaClock(start_step, cfg.iters)
    reporter.event("start", step=start_step, total=cfg.iters, run_dir=str(run_dir), device=str(device),
                   world_size=ddp.world, volumes=len(report.used), skipped=report.skipped,
                   precision=precision.as_dict())

    def payload(step: int) -> dict:
        states = gather_sampler_states(ddp, sampler)
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "pretrain",
                "model": model.config, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
                "config": asdict(cfg), "preprocessing": {"preset": cfg.preset, "spacing": cfg.spacing},
                "sampler_states": states}

    def save(step: int, periodic: bool):
        data = payload(step)  # collective: every rank takes part
        if ddp.is_main:
            path = write_checkpoint(run_dir, data, step, periodic)
            reporter.event("checkpoint", step=step, path=str(path))

    step = start_step
    stopped = False
    terms = {}
    with StopFlag() as stop:
        model.train()
        while step < cfg.iters:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(cfg, step)
            truth = None
            with torch.no_grad():
                # The sampler's RNG decides, so a resumed run draws the same kinds of pairs.
                if cfg.known_pairs > 0 and sampler.rng.random() < cfg.known_pairs:
                    truth = known_source.sample(cfg.batch)
                    a_target, b_input = truth["a"], truth["b"]
                    # Half the inputs undamaged: `gvsl match` sees clean volumes.
                    damaged = cfg.augment and sampler.rng.random() < 0.5
                    a_input = damage_appearance(a_target, generator=generator) if damaged else a_target
                else:
                    a_np, b_np = sampler.sample(cfg.batch)
                    a = torch.from_numpy(a_np).to(device, non_blocking=True)
                    b = torch.from_numpy(b_np).to(device, non_blocking=True)
                    if cfg.augment:
                        a_input, a_target, b_input = augment_pair(a, b, generator=generator)
                    else:
                        a_input, a_target, b_input = a, a, b
            with precision.autocast():
                output = net(a_input, b_input)
            loss, terms = criterion(output, a_target, truth)
            if not torch.isfinite(loss.detach()):
                # Diverged weights, or only the low-precision range (an fp16 overflow the scaler
                # skips)? The same batch in fp32 decides, before the step can touch the weights.
                check_loss, check_terms = loss, terms
                if scaler.is_enabled():
                    with torch.no_grad():
                        check_loss, check_terms = criterion(net(a_input, b_input), a_target, truth)
                check_finite_losses({**{k: float(v.detach()) for k, v in check_terms.items()},
                                     "total": float(check_loss.detach())}, step + 1, run_dir)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seconds = time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.iters or step == start_step + 1:
                values = {k: float(v.detach()) for k, v in terms.items()}
                values["total"] = float(loss.detach())
                record = {"step": step, **values, "lr": optimizer.param_groups[0]["lr"],
                          "seconds_per_step": seconds, "samples_per_s": cfg.batch * ddp.world / seconds}
                if scaler.is_enabled():  # a falling scale means steps skipped for non-finite gradients
                    record["grad_scale"] = scaler.get_scale()
                metrics.write(finite_or_none(record))
                if "grad_scale" in record:
                    check_grad_scale(record["grad_scale"], step, run_dir)
                reporter.event("progress", step=step, total=cfg.iters, loss=values, eta_s=clock.eta(step),
                               samples_per_s=record["samples_per_s"])
            if ddp.any_flag(stop.requested):
                stopped = True
                break
            if step % cfg.ckpt_every == 0 and step < cfg.iters:
                save(step, periodic=True)
    save(step, periodic=False)
    checksums = ddp.parameter_checksums(model)
    summary = {"step": step, "total": cfg.iters, "stopped": stopped, "run_dir": str(run_dir),
               "checkpoint": str(last), "world_size": ddp.world, "rank_parameter_checksums": checksums,
               "final_loss": finite_or_none({k: float(v.detach()) for k, v in terms.items()})}
    reporter.event("done", **summary)
    return summary
