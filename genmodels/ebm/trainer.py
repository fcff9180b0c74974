"""Contrastive-divergence training of the energy MLP, with divergence detection and rollback.

Loss per batch (Du & Mordatch 2019, eq. 2 plus their L2 energy regulariser):

    L = mean E(x_real) - mean E(x_fake) + alpha * (mean E(x_real)^2 + mean E(x_fake)^2)

where ``x_fake`` are Langevin samples from the replay buffer. Lowering ``L`` pushes data energy
down and sample energy up; the penalty keeps energies near 0 so they cannot run away together.

EBM training is known to blow up (energies or gradients explode, NaN). Each epoch accumulates a
divergence flag on the device (no host sync per batch) and checks it once at the end; a bad
epoch is undone: model, optimizer, buffer, early stopping and history return to the last good
epoch, the learning rate is multiplied by ``rollback_lr_factor``, a slice of the buffer restarts
from noise, and the epoch is retried. After ``max_rollbacks`` rollbacks training fails with
:class:`EBMDivergenceError`; the last good state stays on disk in the resume file.

Under ``torchrun`` (``dist=`` with more than one process) each rank holds the whole replay buffer
in the same state, draws the same global batch of chains and restarts, runs Langevin on its slice
of them only (the expensive part) with its rows of the whole batch's noise, and every rank pushes
the gathered chains back; the CD loss of its slice of the data goes through DDP, weighted so that
DDP's gradient average is the gradient of the global-batch loss. Divergence flags are combined
over ranks and validation is rank 0's, so every rank takes the same decisions (rollback, best
epoch, early stopping) and the run follows the single-process one up to float reduction order.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genmodels.configs.base import to_dict
from genmodels.configs.ebm import EBMConfig
from genmodels.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    broadcast_from_main,
    local_loss_weight,
    shard_rows,
    wrap_ddp,
)
from genmodels.ebm.buffer import ReplayBuffer
from genmodels.ebm.langevin import BufferSampler
from genmodels.ebm.model import IMAGE_SHAPE, N_PIXELS, EnergyMLP, build_model
from genmodels.training import (
    EarlyStopping,
    EpochCallback,
    History,
    NonFiniteLossError,
    atomic_save,
    generator_state,
    make_generator,
    set_generator_state,
    update_average,
)

SampleCallback = Callable[[int, Tensor], None]
"""``on_samples(epoch, images (n, 1, 28, 28) in [0, 1])``: buffer chains every ``sample_every`` epochs."""

RESUME_KIND = "ebm_resume"


class EBMDivergenceError(NonFiniteLossError):
    """Training diverged more often than ``max_rollbacks`` allows; the last good state is kept."""


@dataclass(frozen=True)
class RollbackEvent:
    """One rollback: the epoch that diverged, why, and the learning rate before/after."""

    epoch: int
    reason: str
    lr_before: float
    lr_after: float
    count: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "reason": self.reason,
            "lr_before": self.lr_before,
            "lr_after": self.lr_after,
            "count": self.count,
        }


@dataclass
class EBMTrainResult:
    """What :func:`train_ebm` hands back.

    Attributes:
        model: the energy model with the best (lowest validation loss) weights, eval mode.
        history: per-epoch series (one row per kept epoch; ``rollbacks`` is cumulative).
        best_epoch, best_val_loss: the kept checkpoint.
        epochs_run: epochs completed (without the undone ones).
        stopped_early: early stopping ended training before ``epochs``.
        rollbacks: every divergence that was rolled back.
        checkpoint: payload for :func:`genmodels.training.save_checkpoint` with ``kind='ebm'``:
            best weights, final weights, optimizer, buffer and generator states.
    """

    model: EnergyMLP
    history: History
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    rollbacks: list[RollbackEvent] = field(default_factory=list)
    checkpoint: dict[str, Any] = field(default_factory=dict)


def images_to_float(images: Tensor) -> Tensor:
    """uint8 images ``(N, 28, 28)`` (or float in [0, 1]) -> float32 ``(N, 784)`` in [0, 1]."""
    x = images.reshape(images.shape[0], -1)
    if x.shape[1] != N_PIXELS:
        raise ValueError(f"expected 28x28 images, got shape {tuple(images.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


def cd_loss(e_real: Tensor, e_fake: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """Contrastive divergence + L2 penalty.

    Args:
        e_real: energies of data ``(B,)``; e_fake: energies of samples ``(B',)``.

    Returns:
        ``(loss, cd, reg)`` scalars with ``loss = cd + reg``.
    """
    cd = e_real.mean() - e_fake.mean()
    reg = alpha * (e_real.pow(2).mean() + e_fake.pow(2).mean())
    return cd + reg, cd, reg


class _Trainer:
    """Holds the mutable training state so snapshots, rollback and resume treat it as one unit."""

    def __init__(self, config: EBMConfig, train: Tensor, val: Tensor, device: torch.device) -> None:
        self.config = config
        self.config_dict = to_dict(config)
        self.device = device
        self.train_x = images_to_float(train).to(device)
        self.val_x = images_to_float(val).to(device)
        if self.train_x.shape[0] == 0 or self.val_x.shape[0] == 0:
            raise ValueError("train_ebm needs at least one training and one validation image")
        g_init = make_generator(config.seed, "cpu")
        self.model = build_model(self.config_dict)
        # Re-draw the weights from our own generator: nn.Linear's init uses the global RNG.
        _init_weights(self.model, g_init)
        self.model.to(device)
        # Polyak average of the weights: the live weights oscillate (beta1 = 0, a moving CD
        # target); the average is what validation, the best checkpoint and users see.
        self.ema: EnergyMLP | None = copy.deepcopy(self.model).requires_grad_(False) if config.ema_decay > 0 else None
        self.ema_updates = 0
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2))
        self.g_data = make_generator(config.seed + 1, device)
        self.g_langevin = make_generator(config.seed + 2, device)
        self.buffer = ReplayBuffer(
            config.buffer_size,
            (N_PIXELS,),
            config.reinit_prob,
            generator=make_generator(config.seed + 3, device),
            device=device,
        )
        self.sampler = BufferSampler(
            self.buffer,
            n_steps=config.langevin_steps,
            step_size=config.step_size,
            noise_std=config.noise_std,
            grad_clip=config.grad_clip,
            generator=self.g_langevin,
        )
        # Fixed buffer slots scored against the validation images every epoch, so the validation
        # loss compares the same chains (as the model moves them) across epochs.
        g_val = make_generator(config.seed + 4, "cpu")
        n_val = self.val_x.shape[0]
        self.val_slots = torch.randperm(config.buffer_size, generator=g_val)[: min(n_val, config.buffer_size)].to(
            device
        )
        self.early = EarlyStopping(config.patience)
        self.history = History()
        self.epoch = 0
        self.best_state = _clone_state(self.eval_model.state_dict())
        self.events: list[RollbackEvent] = []
        self.stopped_early = False
        # Data parallel (set by enable_ddp): the rank/world and the DDP wrapper of self.model.
        self.dist: DistInfo | None = None
        self.ddp_model: torch.nn.Module | None = None

    def enable_ddp(self, dist: DistInfo) -> None:
        """Train data-parallel from now on: the loss goes through DDP, sampling through the plain module.

        DDP broadcasts rank 0's weights at construction; they equal every rank's anyway (same
        seed, same resume file).
        """
        self.dist = dist
        self.ddp_model = wrap_ddp(self.model, dist)

    # --- state -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything a rollback or a resume restores (CPU copies, safe for ``weights_only``)."""
        return {
            "kind": RESUME_KIND,
            "config": self.config_dict,
            "epoch": self.epoch,
            "model": _clone_state(self.model.state_dict(), cpu=True),
            "ema": _clone_state(self.eval_model.state_dict(), cpu=True),
            "ema_updates": self.ema_updates,
            "optimizer": _cpu(copy.deepcopy(self.optimizer.state_dict())),
            "buffer": self.buffer.state_dict(),
            "g_data": generator_state(self.g_data),
            "g_langevin": generator_state(self.g_langevin),
            "early_stopping": self.early.state_dict(),
            "history": [dict(r) for r in self.history.rows],
            "best_state": _clone_state(self.best_state, cpu=True),
            "events": [e.as_dict() for e in self.events],
            "stopped_early": self.stopped_early,
        }

    def restore(self, snap: Mapping[str, Any], *, generators: bool) -> None:
        """Load a :meth:`snapshot`; ``generators=False`` keeps the current RNG streams (rollback)."""
        self.epoch = int(snap["epoch"])
        self.model.load_state_dict(snap["model"])
        if self.ema is not None:
            self.ema.load_state_dict(snap["ema"])
        self.ema_updates = int(snap["ema_updates"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if generators:
            self.buffer.load_state_dict(snap["buffer"])
            set_generator_state(self.g_data, snap["g_data"])
            set_generator_state(self.g_langevin, snap["g_langevin"])
        else:
            # A rollback must not replay the same random stream into the same blow-up.
            g_state = generator_state(self.buffer.generator)
            self.buffer.load_state_dict(snap["buffer"])
            set_generator_state(self.buffer.generator, g_state)
        self.early.load_state_dict(snap["early_stopping"])
        self.history = History([dict(r) for r in snap["history"]])
        self.best_state = _clone_state(snap["best_state"], device=self.device)
        self.events = [RollbackEvent(**e) for e in snap["events"]]
        self.stopped_early = bool(snap["stopped_early"])

    @property
    def eval_model(self) -> EnergyMLP:
        """The weights that are validated and kept: the average when ``ema_decay > 0``."""
        return self.ema if self.ema is not None else self.model

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # --- one epoch ---------------------------------------------------------------------------

    def run_epoch(self) -> tuple[dict[str, float], str | None]:
        """Train one epoch and validate; returns ``(metrics, divergence reason or None)``."""
        cfg = self.config
        self.model.train()
        n = self.train_x.shape[0]
        perm = torch.randperm(n, generator=self.g_data, device=self.device)
        sums = torch.zeros(5, device=self.device)  # loss, cd, reg, e_real, e_fake (batch means)
        bad_value = torch.zeros((), dtype=torch.bool, device=self.device)
        bad_energy = torch.zeros((), dtype=torch.bool, device=self.device)
        max_abs = torch.zeros((), device=self.device)
        batches = perm.split(cfg.batch_size)
        dist = self.dist
        for idx in batches:
            real = self.train_x[idx]
            noise = torch.randn(real.shape, generator=self.g_data, device=self.device)
            real = (real + cfg.data_noise * noise).clamp(0.0, 1.0)
            if dist is not None and self.ddp_model is not None:
                # Data parallel: the global batch's data and data noise were drawn in full above,
                # as one process draws them; this rank takes its rows. The sampler draws the global
                # batch of chains on every rank and runs Langevin on this rank's rows with the plain
                # module (input gradients only: no DDP hooks, no gradient all-reduce).
                b, rank, world = real.shape[0], dist.rank, dist.world_size
                real_l = shard_rows(real, rank, world)
                fake_l = self.sampler.sample_shard(self.model, b, rank, world)
                energies = self.ddp_model(torch.cat([real_l, fake_l]))
                e_real, e_fake = energies[: real_l.shape[0]], energies[real_l.shape[0] :]
                # cd_loss is a sum of batch means over b data and b chains: this rank's sums over
                # its rows, divided by b, add up over ranks to it, and local_loss_weight(b, world)
                # (= world / b) makes DDP's gradient average the gradient of the global-batch loss.
                s_real, s_fake = e_real.sum(), e_fake.sum()
                cd_sum = s_real - s_fake
                reg_sum = cfg.alpha * (e_real.pow(2).sum() + e_fake.pow(2).sum())
                loss_sum = cd_sum + reg_sum
                self.optimizer.zero_grad(set_to_none=True)
                (loss_sum * local_loss_weight(b, world)).backward()
                grad_sq = self._step()  # of the averaged (global-batch) gradient: the same on every rank
                with torch.no_grad():
                    stats = torch.stack([loss_sum, cd_sum, reg_sum, s_real, s_fake]).detach() / b
                    sums += stats  # this rank's share of the batch means; summed over ranks below
                    bad_value |= ~torch.isfinite(stats).all() | ~torch.isfinite(grad_sq)
                    if energies.numel() > 0:  # a rank's slice is empty when b < world
                        max_abs = torch.maximum(max_abs, energies.detach().abs().max().nan_to_num(math.inf))
                    bad_energy |= max_abs > cfg.max_energy
                continue
            fake = self.sampler(self.model, real.shape[0])
            energies = self.model(torch.cat([real, fake]))
            e_real, e_fake = energies[: real.shape[0]], energies[real.shape[0] :]
            loss, cd, reg = cd_loss(e_real, e_fake, cfg.alpha)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_sq = self._step()
            with torch.no_grad():
                stats = torch.stack([loss, cd, reg, e_real.mean(), e_fake.mean()]).detach()
                sums += stats
                bad_value |= ~torch.isfinite(stats).all() | ~torch.isfinite(grad_sq)
                max_abs = torch.maximum(max_abs, energies.detach().abs().max().nan_to_num(math.inf))
                bad_energy |= max_abs > cfg.max_energy
        if dist is not None:
            # Global epoch figures on every rank; a divergence on any rank rolls all of them back.
            sums = all_reduce_sum(sums)
            flags = all_reduce_max(torch.stack([bad_value.to(max_abs.dtype), bad_energy.to(max_abs.dtype), max_abs]))
            bad_value, bad_energy, max_abs = flags[0] > 0, flags[1] > 0, flags[2]
        means = (sums / len(batches)).tolist()
        val = self.validate()
        if dist is not None:
            # Every rank validates the same weights on the same chains; rank 0's figures decide
            # (best epoch, early stopping, divergence) so all ranks leave the loop together.
            keys = list(val)
            shared = broadcast_from_main(torch.tensor([val[k] for k in keys], dtype=torch.float64, device=self.device))
            val = dict(zip(keys, shared.tolist(), strict=True))
        metrics = {
            "train_loss": means[0],
            "cd_loss": means[1],
            "reg_loss": means[2],
            "energy_real": means[3],
            "energy_fake": means[4],
            **val,
            "max_abs_energy": float(max_abs),
            "lr": self.lr,
        }
        reason = None
        if bool(bad_value) or not all(math.isfinite(v) for v in metrics.values()):
            reason = "non-finite loss, energy or gradient"
        elif bool(bad_energy) or abs(val["val_energy_real"]) > cfg.max_energy:
            reason = f"energy magnitude {float(max_abs):.3g} exceeded max_energy {cfg.max_energy:g}"
        return metrics, reason

    def _step(self) -> Tensor:
        """Optimizer step and EMA update after ``backward``; returns the squared gradient norm."""
        cfg = self.config
        grad_sq = torch.stack([p.grad.pow(2).sum() for p in self.model.parameters() if p.grad is not None]).sum()
        self.optimizer.step()
        if self.ema is not None:
            self.ema_updates += 1
            update_average(list(self.ema.parameters()), list(self.model.parameters()), cfg.ema_decay, self.ema_updates)
        return grad_sq

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss: held-out zeros against the model's own chains (fixed buffer slots)."""
        model = self.eval_model
        self.model.eval()
        e_val = torch.cat([model(b) for b in self.val_x.split(1024)])
        e_neg = model(self.buffer.examples[self.val_slots])
        loss, _, _ = cd_loss(e_val, e_neg, self.config.alpha)
        self.model.train()
        return {
            "val_loss": float(loss),
            "val_energy_real": float(e_val.mean()),
            "val_energy_fake": float(e_neg.mean()),
        }

    def sample_grid(self, n: int = 64) -> Tensor:
        """The first ``n`` buffer chains as images ``(n, 1, 28, 28)``."""
        return self.buffer.examples[:n].detach().reshape(-1, *IMAGE_SHAPE).cpu().clone()


def train_ebm(
    config: EBMConfig,
    train: Tensor,
    val: Tensor,
    *,
    device: torch.device | str = "cpu",
    on_epoch: EpochCallback | None = None,
    on_samples: SampleCallback | None = None,
    on_rollback: Callable[[RollbackEvent], None] | None = None,
    resume_path: str | os.PathLike[str] | None = None,
    dist: DistInfo | None = None,
) -> EBMTrainResult:
    """Train the EBM by contrastive divergence with early stopping, best checkpoint and rollback.

    Args:
        config: the ``ebm`` params section.
        train, val: images ``(N, 28, 28)`` uint8 (or float in [0, 1]) of the modelled class.
        device: where to train.
        on_epoch: ``(epoch, metrics)`` after each kept epoch: ``train_loss``, ``val_loss``,
            ``cd_loss``, ``reg_loss``, ``energy_real``, ``energy_fake``, ``val_energy_real``,
            ``val_energy_fake``, ``max_abs_energy``, ``lr``, ``rollbacks`` (cumulative).
        on_samples: ``(epoch, images (64, 1, 28, 28))`` every ``sample_every`` epochs and at the end.
        on_rollback: called with each :class:`RollbackEvent` as it happens.
        resume_path: resume file, written atomically after every epoch; when it exists with
            the same config training continues from it (byte-identical to an uninterrupted run).
        dist: the rank/world of a ``torchrun`` job (:func:`genmodels.distributed.init_from_env`);
            with ``world_size > 1`` the energy MLP is wrapped in DistributedDataParallel and each
            rank computes its slice of every global batch of ``config.batch_size`` images and
            chains. Every rank keeps the whole replay buffer in the same state (same generators;
            the chains each rank moved are gathered and pushed on all ranks), draws the global
            batch's data noise, chain slots, restarts and Langevin noise in full and slices them,
            so the run follows the single-process one up to float reduction order. Divergence
            flags are combined over ranks, validation figures are rank 0's; every rank reads the
            resume file, only rank 0 writes it and calls ``on_epoch``/``on_samples``/``on_rollback``.
            ``None`` or world size 1: single process.

    Raises:
        EBMDivergenceError: more than ``max_rollbacks`` divergences (the resume file keeps the
            last good state).
    """
    device = torch.device(device)
    state = _Trainer(config, train, val, device)
    resume = Path(resume_path) if resume_path is not None else None
    if resume is not None and resume.is_file():
        snap = _load_resume(resume, state.config_dict, device)
        if snap is not None:
            state.restore(snap, generators=True)
    writer = resume  # where the resume state is written: one process only
    if dist is not None and dist.world_size > 1:
        state.enable_ddp(dist)  # after the resume state is loaded: every rank has read the same file
        if not dist.is_main:
            writer = None
            on_epoch = on_samples = on_rollback = None
    good = state.snapshot()
    while state.epoch < config.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        metrics, reason = state.run_epoch()
        if reason is not None:
            if len(state.events) >= config.max_rollbacks:
                where = f"; the last good state (epoch {good['epoch']}) is kept in {resume}" if resume else ""
                raise EBMDivergenceError(
                    f"EBM training diverged at epoch {epoch} ({reason}) after {len(state.events)} rollback(s) "
                    f"(ebm.max_rollbacks = {config.max_rollbacks}){where}. Lower ebm.lr, raise ebm.alpha or "
                    "lower ebm.step_size."
                )
            lr_before = float(good["optimizer"]["param_groups"][0]["lr"])
            state.restore(good, generators=False)
            lr_after = lr_before * config.rollback_lr_factor
            state.set_lr(lr_after)
            state.buffer.reinitialize(config.rollback_reinit_fraction)
            event = RollbackEvent(epoch, reason, lr_before, lr_after, len(state.events) + 1)
            state.events.append(event)
            if on_rollback is not None:
                on_rollback(event)
            good = state.snapshot()
            if writer is not None:
                atomic_save(good, writer)
            continue
        metrics["rollbacks"] = float(len(state.events))
        state.epoch = epoch
        state.history.append(epoch, metrics)
        # During the first epochs the chains lag far behind the model, so the validation CD loss
        # is spuriously low (samples are easy to tell from data); selection starts after them.
        stop = False
        if epoch >= min(config.min_epochs, config.epochs):
            stop = state.early.step(metrics["val_loss"], epoch)
            if state.early.improved:
                state.best_state = _clone_state(state.eval_model.state_dict())
        state.stopped_early = stop and epoch < config.epochs
        if config.lr_decay < 1.0:
            state.set_lr(state.lr * config.lr_decay)
        good = state.snapshot()
        if writer is not None:
            atomic_save(good, writer)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if on_samples is not None and config.sample_every > 0:
            last = state.stopped_early or epoch == config.epochs
            if epoch % config.sample_every == 0 or last:
                on_samples(epoch, state.sample_grid())

    final_state = _clone_state(state.model.state_dict(), cpu=True)
    best = EnergyMLP(N_PIXELS, config.hidden, config.activation).to(device)
    best.load_state_dict(state.best_state)
    best.eval()
    checkpoint = {
        "model": _clone_state(state.best_state, cpu=True),
        "final_model": final_state,
        "final_eval_model": _clone_state(state.eval_model.state_dict(), cpu=True),
        "optimizer": _cpu(copy.deepcopy(state.optimizer.state_dict())),
        "buffer": state.buffer.state_dict(),
        "g_data": generator_state(state.g_data),
        "g_langevin": generator_state(state.g_langevin),
        "best_epoch": state.early.best_epoch,
        "best_val_loss": state.early.best,
        "epochs_run": state.epoch,
        "rollbacks": [e.as_dict() for e in state.events],
    }
    return EBMTrainResult(
        model=best,
        history=state.history,
        best_epoch=state.early.best_epoch,
        best_val_loss=state.early.best,
        epochs_run=state.epoch,
        stopped_early=state.stopped_early,
        rollbacks=list(state.events),
        checkpoint=checkpoint,
    )


def _load_resume(path: Path, config: Mapping[str, Any], device: torch.device) -> dict[str, Any] | None:
    """The resume snapshot at ``path`` if it belongs to this config, else None (start afresh)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("kind") != RESUME_KIND or dict(obj.get("config", {})) != dict(config):
        return None
    return obj


def _init_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear init (Kaiming-uniform, a=sqrt(5)), drawn from ``generator``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.uniform_(-bound, bound, generator=generator)


def _clone_state(
    state: Mapping[str, Tensor], *, cpu: bool = False, device: torch.device | None = None
) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        t = v.detach()
        if cpu:
            t = t.cpu()
        elif device is not None:
            t = t.to(device)
        out[k] = t.clone()
    return out


def _cpu(obj: Any) -> Any:
    """Move every tensor in a nested optimizer state dict to the CPU."""
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj
