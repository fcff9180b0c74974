"""Training a DDPM on 2D points: ELBO-weighted MSE, early stopping, resumable, callback-logged.

The loss per point is the unbiased one-step estimate of the negative ELBO
(:func:`genmodels.diffusion.elbo.elbo_estimate`), so ``train_loss`` and ``val_loss`` read
as NLL bounds in nats (noisy ones; the stage reports the full bound at the end). The
validation estimate uses fixed, stratified steps (each ``t`` equally often) and fixed noise,
so epoch-to-epoch changes reflect the model, not the Monte-Carlo draw (common random numbers).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genmodels.configs.base import to_dict
from genmodels.configs.ddpm import DDPMConfig
from genmodels.diffusion.elbo import decoder_const, elbo_estimate, prior_kl, weighted_mse
from genmodels.diffusion.model import DDPM, build_model, reset_parameters
from genmodels.distributed import (
    DistInfo,
    MethodAsForward,
    all_reduce_sum,
    broadcast_from_main,
    local_loss_weight,
    shard_rows,
    wrap_ddp,
)
from genmodels.training import (
    EarlyStopping,
    EpochCallback,
    History,
    check_finite,
    generator_state,
    load_checkpoint,
    make_generator,
    save_checkpoint,
    set_generator_state,
    update_average,
)

KIND = "ddpm"
RESUME_KIND = "ddpm_resume"
SQ_DECAY = 0.1
"""Weight of a batch in the running mean of each step's squared loss (importance sampling)."""


@dataclass
class TrainResult:
    """What :func:`train_ddpm` returns.

    Attributes:
        model: the DDPM with the best (validation) weights, in eval mode.
        history: per-epoch ``train_loss``, ``val_loss``, ``lr``.
        best_epoch, best_val: where early stopping found the best validation loss.
        epochs_run: epochs completed (including ones done before a resume).
        stopped_early: whether patience ran out before ``config.epochs``.
    """

    model: DDPM
    history: History
    best_epoch: int
    best_val: float
    epochs_run: int
    stopped_early: bool


def config_dict(config: DDPMConfig) -> dict[str, Any]:
    """The plain dict stored in checkpoints (rebuilds the model with :func:`build_model`)."""
    return to_dict(config)


UNIFORM_MIX = 0.1
"""Share of the uniform distribution in every step proposal: bounds ``1/p(t)`` by ``L / 0.1``
so a step whose loss estimate is still small keeps being visited."""


def _proposal(score: Tensor) -> Tensor:
    """Step proposal (L,) proportional to ``score`` (L,), mixed with the uniform."""
    return (1 - UNIFORM_MIX) * score / score.sum() + UNIFORM_MIX / score.shape[0]


def _val_draws(model: DDPM, config: DDPMConfig, n_val: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed validation draws: steps (n_val,), their ``1/p(t)`` (n_val,), noise (n_val, 2).

    Steps are stratified quantiles of a fixed proposal ``p ~ eps_weight`` (the ELBO's
    weight of a unit noise error), so every epoch sees the same low-variance estimate.
    """
    g = make_generator(config.seed + 1, device)
    p = _proposal(model.schedule.eps_weight[1:].to(device=device, dtype=torch.float64))
    u = (torch.arange(n_val, device=device, dtype=torch.float64) + 0.5) / n_val
    idx = torch.searchsorted(torch.cumsum(p, 0), u).clamp_max(config.n_steps - 1)
    perm = torch.randperm(n_val, generator=g, device=device)
    idx = idx[perm]
    noise = torch.randn(n_val, 2, generator=g, device=device)
    return idx + 1, (1.0 / p[idx]).to(torch.float32), noise


def train_ddpm(
    config: DDPMConfig,
    train: Tensor,
    val: Tensor,
    *,
    device: torch.device | str = "cpu",
    on_epoch: EpochCallback | None = None,
    resume_path: Path | None = None,
    dist: DistInfo | None = None,
) -> TrainResult:
    """Train a DDPM with Adam + exponential LR decay + early stopping on the validation ELBO.

    Args:
        config: the ``ddpm`` params section.
        train, val: (N, 2) and (M, 2) float32 points in data units.
        device: where the full data tensors, the model and the generators live.
        on_epoch: ``on_epoch(epoch, {"train_loss", "val_loss", "lr"})`` after every epoch.
        resume_path: resume state written atomically every epoch; when it exists with the
            same config, training continues from it (byte-identical to an uninterrupted run).
        dist: the rank/world of a ``torchrun`` job (:func:`genmodels.distributed.init_from_env`);
            with ``world_size > 1`` the network is wrapped in DistributedDataParallel and each
            rank computes its slice of every global batch of ``config.batch_size`` points. The
            steps and noise are drawn for the whole global batch on every rank (same generator,
            same order as one process) and sliced, and the importance-sampling statistics are
            summed over ranks, so the run follows the single-process one up to float reduction
            order. The validation loss is rank 0's on all ranks; only rank 0 writes the resume
            state and calls ``on_epoch``. ``None`` or world size 1: single process.
    Returns:
        :class:`TrainResult` with the best weights loaded.
    Raises:
        NonFiniteLossError: a NaN/inf loss; the resume state of the last good epoch is kept.
    """
    device = torch.device(device)
    cfg = config_dict(config)
    train = train.to(device=device, dtype=torch.float32)
    val = val.to(device=device, dtype=torch.float32)

    g = make_generator(config.seed, device)
    model = build_model(cfg)
    reset_parameters(model.net, make_generator(config.seed, "cpu"))
    model.set_standardization(train.cpu())
    model.to(device)
    ema = copy.deepcopy(model) if config.ema_decay > 0 else None
    # fused: one kernel for all parameters instead of ~10 ops per tensor (about 1.5 ms of an
    # 11 ms CPU step at the defaults); the same update rule, deterministic.
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.lr_decay)
    stopper = EarlyStopping(patience=config.patience, min_delta=config.min_delta)
    history = History()
    ema_updates = 0  # optimiser steps averaged so far (the EMA's warm-up counter)
    best_state = copy.deepcopy((ema or model).state_dict())
    start_epoch, stopped = 1, False
    L = config.n_steps
    # running mean of each step's squared loss term; starts at the prior guess eps_weight^2
    # (a unit noise error everywhere) so the first proposal is already sensible
    sq_loss = model.schedule.eps_weight[1:].to(device).pow(2).clone()

    if resume_path is not None and Path(resume_path).is_file():
        try:
            st = load_checkpoint(resume_path, kind=RESUME_KIND, config=cfg, map_location=device)
        except Exception:  # noqa: BLE001 - a stale/foreign resume file means "start afresh"
            st = None
        if st is not None and "ema_updates" not in st:
            # written before the EMA had its warm-up (572956f): its average cannot be continued
            # the way a fresh run would build it, so it is stale too
            st = None
        if st is not None:
            model.load_state_dict(st["model"])
            if ema is not None:
                ema.load_state_dict(st["ema"])
                ema_updates = int(st["ema_updates"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            set_generator_state(g, st["generator"])
            stopper.load_state_dict(st["early_stopping"])
            history.rows = [dict(r) for r in st["history"]]
            sq_loss = st["sq_loss"].to(device)
            best_state = st["best_state"]
            start_epoch, stopped = int(st["epoch"]) + 1, bool(st["stopped"])

    # Data parallel (torchrun): the per-point ELBO term goes through DDP's forward so its
    # gradients are averaged over ranks; the single-process path below stays exactly as it was.
    ddp = dist is not None and dist.world_size > 1
    if ddp:
        # Buffers (schedule, standardisation) are constants: broadcast once, at construction.
        ddp_term = wrap_ddp(MethodAsForward(model, weighted_mse), dist, forward_sync_buffers=False)
        if not dist.is_main:
            resume_path = None  # one writer; every rank has read the same state above
            on_epoch = None

    t_val, w_val, noise_val = _val_draws(model, config, val.shape[0], device)
    n, bs = train.shape[0], config.batch_size
    epoch = start_epoch - 1
    ema_params = list(ema.parameters()) if ema is not None else []
    params = list(model.parameters())

    for epoch in range(start_epoch, config.epochs + 1):
        if stopped:
            break
        model.train()
        perm = torch.randperm(n, generator=g, device=device)
        total = torch.zeros((), device=device)
        const_total = torch.zeros((), device=device)  # DDP only: the global batches' constants
        for i in range(0, n, bs):
            x = train[perm[i : i + bs]]
            b = x.shape[0]
            if config.t_sampling == "importance":
                # Nichol & Dhariwal (2021): p(t) ~ sqrt(E[L_t^2]) minimises the variance of the
                # unbiased estimate sum_t L_t = E_p[L_t / p(t)]
                p = _proposal(sq_loss.sqrt())
                t = torch.multinomial(p, b, replacement=True, generator=g) + 1
                inv_p = 1.0 / p[t - 1]
            else:
                t = torch.randint(1, L + 1, (b,), generator=g, device=device)
                inv_p = torch.full((b,), float(L), device=device)
            noise = torch.randn(x.shape, generator=g, device=device)
            x0 = model.standardize(x)
            if ddp:
                # Steps and noise above were drawn for the whole global batch, as one process
                # draws them; this rank computes its rows. The weight makes DDP's gradient
                # average the gradient of the global-batch mean.
                r, w = dist.rank, dist.world_size
                t_l = shard_rows(t, r, w)
                term_l = ddp_term(shard_rows(x0, r, w), t_l, shard_rows(noise, r, w))
                weighted_l = (shard_rows(inv_p, r, w) * term_l).sum()
                with torch.no_grad():
                    consts = prior_kl(model, x0).mean() + decoder_const(model) + model.log_scale_sum()
                    sq_l = torch.nan_to_num(term_l.detach().pow(2), nan=0.0, posinf=0.0)
                    # each step's squared-loss sum over the global batch (one small all-reduce);
                    # the counts come from the global steps every rank holds
                    s_sum = all_reduce_sum(torch.zeros_like(sq_loss).index_add_(0, t_l - 1, sq_l))
                    cnt = torch.zeros_like(sq_loss).index_add_(0, t - 1, torch.ones_like(t, dtype=sq_loss.dtype))
                    upd = (1 - SQ_DECAY) * sq_loss + SQ_DECAY * s_sum / cnt.clamp_min(1)
                    sq_loss = torch.where(cnt > 0, upd, sq_loss)
                opt.zero_grad(set_to_none=True)
                (weighted_l * local_loss_weight(b, w)).backward()
                opt.step()
                if ema is not None:
                    update_average(ema_params, params, config.ema_decay, ema_updates)
                    ema_updates += 1
                total += weighted_l.detach()  # summed over ranks at the end of the epoch
                const_total += consts * b
                continue
            term = weighted_mse(model, x0, t, noise)
            # + constants (no gradient) so the loss reads as an NLL bound in nats
            consts = prior_kl(model, x0).mean() + decoder_const(model) + model.log_scale_sum()
            loss = (inv_p * term).mean() + consts
            with torch.no_grad():
                t0 = t - 1
                # a non-finite term must not poison the proposal: the epoch-end check reports it
                sq = torch.nan_to_num(term.detach().pow(2), nan=0.0, posinf=0.0)
                s_sum = torch.zeros_like(sq_loss).index_add_(0, t0, sq)
                cnt = torch.zeros_like(sq_loss).index_add_(0, t0, torch.ones_like(term))
                upd = (1 - SQ_DECAY) * sq_loss + SQ_DECAY * s_sum / cnt.clamp_min(1)
                sq_loss = torch.where(cnt > 0, upd, sq_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                update_average(ema_params, params, config.ema_decay, ema_updates)
                ema_updates += 1
            # weighted by batch size so a short last batch counts for what it is
            total += loss.detach() * x.shape[0]
        if ddp:
            total = all_reduce_sum(total) + const_total  # every rank reports the global training loss
        lr = opt.param_groups[0]["lr"]
        sched.step()
        evaluated = ema if ema is not None else model
        evaluated.eval()
        with torch.no_grad():
            val_loss = elbo_estimate(evaluated, val, t_val, noise_val, w_val).mean()
        if ddp:
            val_loss = broadcast_from_main(val_loss)  # one early-stopping decision for all ranks
        # one host sync per epoch
        train_loss_f, val_loss_f = (total / n).item(), val_loss.item()
        check_finite(train_loss_f, "train_loss", epoch)
        check_finite(val_loss_f, "val_loss", epoch)
        metrics = {"train_loss": train_loss_f, "val_loss": val_loss_f, "lr": lr}
        history.append(epoch, metrics)
        stopped = stopper.step(val_loss_f, epoch)
        if stopper.improved:
            best_state = copy.deepcopy(evaluated.state_dict())
        if resume_path is not None:
            save_checkpoint(
                resume_path,
                kind=RESUME_KIND,
                config=cfg,
                epoch=epoch,
                stopped=stopped,
                model=model.state_dict(),
                ema=ema.state_dict() if ema is not None else {},
                ema_updates=ema_updates,
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                generator=generator_state(g),
                early_stopping=stopper.state_dict(),
                history=history.rows,
                best_state=best_state,
                sq_loss=sq_loss,
            )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if stopped:
            break

    final = build_model(cfg).to(device)
    final.load_state_dict(best_state)
    final.eval()
    epochs_run = int(history.rows[-1]["epoch"]) if history.rows else 0
    return TrainResult(
        model=final,
        history=history,
        best_epoch=stopper.best_epoch,
        best_val=stopper.best,
        epochs_run=epochs_run,
        stopped_early=stopped,
    )


def save_trained(path: str | Path, model: DDPM, config: Mapping[str, Any], **extra: Any) -> None:
    """Write the final checkpoint: weights (incl. standardisation buffers) + the config."""
    save_checkpoint(path, kind=KIND, config=config, model=model.state_dict(), **extra)


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> tuple[DDPM, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_trained` (``weights_only=True``).

    Returns:
        ``(model in eval mode on device, config dict)``.
    Raises:
        CheckpointError: missing file, not a DDPM checkpoint, or weights that do not fit the config.
    """
    from genmodels.training import CheckpointError

    ckpt = load_checkpoint(path, kind=KIND, map_location=device)
    config = dict(ckpt["config"])
    model = build_model(config).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: weights do not match its config ({str(err)[:300]})") from None
    model.eval()
    return model, config
