"""The image normalizing flow on Fashion-MNIST (seeds/000): builder, trainer, sampler, Gaussian baseline.

Model (data -> noise), on continuous 8-bit pixel space ``v = x + u`` (see :mod:`genmodels.flows.image`):

    image -> vector (784) -> /256 -> logit_λ -> [LU linear, whitening-initialised]
          -> n_layers x ( [LU linear] -> affine coupling (MLP shift/log-scale, alternating masks) -> [ActNorm] )
          -> N(0, I)

Bracketed layers are switched by params. The seed's flow is the unbracketed part. The
whitening layer makes the untrained flow *equal* to the full-covariance Gaussian baseline
in logit space (couplings start at the identity), so training only has to improve on it;
without it an MLP coupling flow spends its CPU budget learning the pixel correlations a
Gaussian gets in closed form.

Likelihoods are reported in bits per dimension in 8-bit pixel space with every Jacobian of
the preprocessing included (:func:`genmodels.flows.image.bits_per_dim`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genmodels.configs.base import from_mapping, to_dict
from genmodels.configs.flow import FlowConfig
from genmodels.distributed import (
    DistInfo,
    MethodAsForward,
    all_reduce_sum,
    broadcast_from_main,
    local_loss_weight,
    shard_rows,
    wrap_ddp,
)
from genmodels.flows.base import AffineCoupling, Compose, Flow, StandardNormal, Transform, alternating_masks
from genmodels.flows.base import checkerboard_mask_2d
from genmodels.flows.image import ActNorm, LULinear, bits_per_dim, dequantize, preprocessing, quantize
from genmodels.training import (
    CheckpointError,
    EarlyStopping,
    EpochCallback,
    History,
    check_finite,
    generator_state,
    load_checkpoint,
    make_generator,
    mean_and_se,  # re-exported: train_flow and bench_flow report test bits/dim with it
    save_checkpoint,
    set_generator_state,
)

IMAGE_SHAPE: tuple[int, int] = (28, 28)
"""Fashion-MNIST image shape (H, W)."""

SamplesCallback = Callable[[int, Tensor], None]
"""``on_samples(epoch, images)``: a uint8 ``(n, H, W)`` sample grid, every ``sample_every`` epochs."""


def _as_config(config: FlowConfig | Mapping[str, Any]) -> FlowConfig:
    return config if isinstance(config, FlowConfig) else from_mapping(FlowConfig, config, "flow")


class ImageFlow(Flow):
    """A :class:`Flow` on images ``(B, H, W)`` of continuous pixel values in ``[0, 256)``."""

    def __init__(self, transform: Compose, shape: tuple[int, ...]) -> None:
        super().__init__(transform, StandardNormal((math.prod(shape),)))
        self.shape = tuple(shape)
        self.dim = math.prod(shape)

    def bpd(self, v: Tensor) -> Tensor:
        """Dequantized images ``v`` (B, H, W) -> bits per dimension (B,) in 8-bit pixel space."""
        return bits_per_dim(self.log_prob(v), self.dim)

    @torch.no_grad()
    def initialize(self, v: Tensor, shrinkage: float = 0.0) -> None:
        """Data-dependent init (whitening LU layer, ActNorms) from dequantized images ``v`` (N, H, W).

        ``shrinkage`` is the whitening's covariance ridge (see :meth:`LULinear.initialize`).

        Layers are initialised in order, each on the output of the already-initialised
        layers before it, as in Glow.
        """
        x = v
        for t in self.transform.transforms:
            init = getattr(t, "initialize", None)
            # Only the first LU layer whitens: the ones between couplings start at the identity.
            if isinstance(t, LULinear):
                if not getattr(t, "identity_init", False):
                    t.initialize(x, shrinkage=shrinkage)
            elif init is not None:
                init(x)
            x, _ = t(x)

    @torch.no_grad()
    def sample_images(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """``n`` samples as uint8 images ``(n, H, W)`` in [0, 255]; ``temperature`` scales the base noise."""
        return quantize(self.sample(n, generator=generator, temperature=temperature))


class SoftClamp(nn.Module):
    """``c * tanh(x / c)`` element-wise on ``(B, D)``: identity near 0, bounded by ``±c``.

    Used on a coupling conditioner's *input* (the untouched half, so invertibility and the
    log-det are unaffected): a held-out image with a coordinate many standard deviations
    out in the whitened space otherwise drives the ReLU MLP to extrapolate linearly into
    huge shifts, and one such image dominates a mean bpd.
    """

    def __init__(self, bound: float) -> None:
        super().__init__()
        self.bound = float(bound)

    def forward(self, x: Tensor) -> Tensor:
        return self.bound * torch.tanh(x / self.bound)


def _conditioner(
    in_features: int, out_features: int, hidden: int, n_hidden: int, g: torch.Generator, input_clamp: float = 0.0
) -> nn.Sequential:
    """MLP ``(B, in) -> (B, out)`` for a coupling; hidden layers drawn from ``g``, output layer zero.

    Same architecture as :func:`genmodels.flows.base.mlp`, but every random number comes from
    the explicit generator (PyTorch's default init would draw from the global RNG). With
    ``input_clamp > 0`` the input first goes through :class:`SoftClamp`.
    """
    layers: list[nn.Module] = [SoftClamp(input_clamp)] if input_clamp > 0 else []
    width = in_features
    for _ in range(n_hidden):
        lin = nn.Linear(width, hidden)
        bound = 1.0 / math.sqrt(width)
        with torch.no_grad():
            nn.init.uniform_(lin.weight, -bound, bound, generator=g)
            nn.init.uniform_(lin.bias, -bound, bound, generator=g)
        layers += [lin, nn.ReLU()]
        width = hidden
    out = nn.Linear(width, out_features)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    layers.append(out)
    return nn.Sequential(*layers)


def coupling_masks(kind: str, n_layers: int, shape: tuple[int, ...]) -> list[Tensor]:
    """Alternating masks for ``n_layers`` couplings on the flat ``prod(shape)`` vector."""
    dim = math.prod(shape)
    if kind == "checkerboard" and len(shape) == 2:
        base = checkerboard_mask_2d(shape[0], shape[1])
        return [base if i % 2 == 0 else ~base for i in range(n_layers)]
    return alternating_masks(dim, n_layers, kind)


def build_model(config: FlowConfig | Mapping[str, Any], shape: tuple[int, ...] = IMAGE_SHAPE) -> ImageFlow:
    """The image flow for ``config`` (a :class:`FlowConfig` or its plain-dict form).

    Weights are drawn from a generator seeded with ``config.seed``: same config -> same
    initial weights. Data-dependent layers need :meth:`ImageFlow.initialize` before training.
    """
    cfg = _as_config(config)
    g = make_generator(cfg.seed)
    dim = math.prod(shape)
    layers: list[Transform] = list(preprocessing(tuple(shape), cfg.logit_lambda))
    if cfg.whiten != "none":
        whiten = LULinear(dim)
        # Frozen, it is the Gaussian baseline's exact whitening; trained with Adam, each of its
        # D^2 entries moves by ~lr per step, which at first costs more than it gains.
        whiten.requires_grad_(cfg.whiten == "learned")
        layers.append(whiten)
    for i, mask in enumerate(coupling_masks(cfg.mask, cfg.n_layers, tuple(shape))):
        if cfg.linear_between and i > 0:
            lu = LULinear(dim)
            lu.identity_init = True  # mixes coordinates once trained; starts as the identity
            layers.append(lu)
        n_cond = int(mask.sum())
        net = _conditioner(n_cond, 2 * (dim - n_cond), cfg.hidden_units, cfg.n_hidden, g, cfg.cond_clamp)
        layers.append(AffineCoupling(mask, net, scale_bound=cfg.scale_bound))
        if cfg.actnorm:
            layers.append(ActNorm(dim))
    return ImageFlow(Compose(layers), tuple(shape))


def gaussian_baseline(
    train: Tensor, logit_lambda: float, *, generator: torch.Generator | None = None, shrinkage: float = 0.0
) -> ImageFlow:
    """Full-covariance Gaussian in logit space, as an :class:`ImageFlow` (same bpd code path).

    ``train`` is uint8 ``(N, H, W)``; its dequantized logit-space mean and covariance
    (unbiased, + ``(1e-6 + shrinkage * mean variance) I``, float64 Cholesky) define a
    whitening layer, which is the whole transform.
    """
    shape = tuple(train.shape[1:])
    model = ImageFlow(Compose([*preprocessing(shape, logit_lambda), LULinear(math.prod(shape))]), shape)
    model.to(train.device)
    model.initialize(dequantize(train, generator), shrinkage=shrinkage)
    return model.eval()


@torch.no_grad()
def per_image_bpd(model: ImageFlow, images: Tensor, *, seed: int, batch_size: int = 1000, n_dequant: int = 1) -> Tensor:
    """Bits per dimension of each uint8 image ``(N, H, W)`` -> ``(N,)``, averaged over ``n_dequant`` noise draws.

    The dequantization noise comes from a generator seeded with ``seed``, so repeated
    evaluations (every epoch's validation) see the same noise and are comparable.
    """
    was_training = model.training
    model.eval()
    p = next(model.parameters(), None)
    device = p.device if p is not None else images.device
    g = make_generator(seed, device)
    out = torch.zeros(images.shape[0], dtype=torch.float64, device=device)
    for _ in range(n_dequant):
        for i in range(0, images.shape[0], batch_size):
            batch = images[i : i + batch_size].to(device)
            out[i : i + batch_size] += model.bpd(dequantize(batch, g)).to(torch.float64)
    model.train(was_training)
    return out / n_dequant


@dataclass
class FlowTrainResult:
    """What :func:`train_flow` returns; ``model`` holds the best (lowest validation bpd) weights."""

    model: ImageFlow
    history: History
    best_epoch: int
    best_val_bpd: float
    epochs_run: int
    stopped_early: bool


def _clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_flow(
    model: ImageFlow,
    train: Tensor,
    val: Tensor,
    config: FlowConfig | Mapping[str, Any],
    *,
    device: torch.device | str = "cpu",
    on_epoch: EpochCallback | None = None,
    on_samples: SamplesCallback | None = None,
    resume_path: Path | None = None,
    dist: DistInfo | None = None,
) -> FlowTrainResult:
    """Maximum likelihood (mean bpd) with AdamW, gradient clipping, exponential LR decay, early stopping.

    Args:
        model: from :func:`build_model` with the same ``config``.
        train, val: uint8 images ``(N, H, W)``; dequantized afresh every epoch (train) or
            with fixed noise (validation, seed ``seed + 2``).
        on_epoch: gets ``train_loss``/``val_loss`` (= ``train_bpd``/``val_bpd``), ``val_bpd_median``, ``lr``.
        on_samples: gets a uint8 sample grid ``(n_samples, H, W)`` every ``sample_every``
            epochs and at the last epoch (own generator, so it never changes training).
        resume_path: full training state is saved there every epoch; when it exists with
            this config, training continues from it (byte-identical to an uninterrupted run).
        dist: the rank/world of a ``torchrun`` job (:func:`genmodels.distributed.init_from_env`);
            with ``world_size > 1`` the flow is wrapped in DistributedDataParallel and each rank
            computes its slice of every global batch of ``batch_size`` images. The global
            batch's dequantisation noise is drawn in full on every rank (same generator, same
            order as one process) and sliced; gradients are clipped after DDP's average, i.e.
            on the global-batch gradient. So the run follows the single-process one up to float
            reduction order. Validation bpds are rank 0's on all ranks; only rank 0 writes the
            resume state and calls ``on_epoch``/``on_samples``. ``None`` or world size 1: single process.

    Raises:
        NonFiniteLossError: a NaN/inf train or validation bpd; the last resume state stays.
    """
    cfg = _as_config(config)
    cfg_dict = to_dict(cfg)
    device = torch.device(device)
    model.to(device)
    train, val = train.to(device), val.to(device)
    gen = make_generator(cfg.seed + 1, device)
    model.initialize(dequantize(train, gen), shrinkage=cfg.whiten_shrinkage)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    stopper = EarlyStopping(cfg.patience)
    history = History()
    best_state = _clone_state(model)
    start_epoch, stopped = 1, False

    state = _load_resume(resume_path, cfg_dict)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_generator_state(gen, state["generator"])
        stopper.load_state_dict(state["early_stopping"])
        history.rows = [dict(r) for r in state["history"]]
        best_state = state["best_model"]
        start_epoch, stopped = int(state["epoch"]) + 1, bool(state["stopped"])

    # Data parallel (torchrun): the loss goes through DDP's forward (bpd), so gradients are
    # averaged over ranks; the single-process path below stays exactly as it was.
    ddp = dist is not None and dist.world_size > 1
    if ddp:
        # Buffers (masks, LU constants) do not change in training: broadcast once, at construction.
        ddp_bpd = wrap_ddp(MethodAsForward(model, "bpd"), dist, forward_sync_buffers=False)
        if not dist.is_main:
            resume_path = None  # one writer; every rank has read the same state above
            on_epoch = None
            on_samples = None

    n = train.shape[0]
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped:
            break
        model.train()
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no per-step sync
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if ddp:
                # The whole global batch is dequantized on every rank (the generator advances as
                # in one process); this rank computes its rows, weighted so that DDP's gradient
                # average is the gradient of the global-batch mean.
                v_l = shard_rows(dequantize(train[idx], gen), dist.rank, dist.world_size)
                loss_sum = ddp_bpd(v_l).sum()
                opt.zero_grad(set_to_none=True)
                (loss_sum * local_loss_weight(idx.numel(), dist.world_size)).backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                total += loss_sum.detach().to(torch.float64)
                continue
            loss = model.bpd(dequantize(train[idx], gen)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            total += loss.detach().to(torch.float64) * idx.numel()
        if ddp:
            total = all_reduce_sum(total)  # every rank reports the global training bpd
        lr = opt.param_groups[0]["lr"]
        sched.step()
        train_bpd = float(total / n)
        check_finite(train_bpd, "train_loss", epoch)
        val_each = per_image_bpd(model, val, seed=cfg.seed + 2, batch_size=cfg.eval_batch_size)
        if ddp:
            val_each = broadcast_from_main(val_each)  # one early-stopping decision for all ranks
        val_bpd = float(val_each.mean())
        check_finite(val_bpd, "val_loss", epoch)
        stopped = stopper.step(val_bpd, epoch)
        if stopper.improved:
            best_state = _clone_state(model)
        metrics = {
            "train_loss": train_bpd,
            "val_loss": val_bpd,
            "train_bpd": train_bpd,
            "val_bpd": val_bpd,
            # The median shows whether a bad mean comes from a few outlying images or from all.
            "val_bpd_median": float(val_each.median()),
            "lr": lr,
        }
        history.append(epoch, metrics)
        if resume_path is not None:
            save_checkpoint(
                resume_path,
                kind="flow_resume",
                config=cfg_dict,
                epoch=epoch,
                stopped=stopped,
                model=model.state_dict(),
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                generator=generator_state(gen),
                early_stopping=stopper.state_dict(),
                history=history.rows,
                best_model=best_state,
            )
        # Callbacks run after the state is on disk: an exception in one (or an interrupt) loses nothing.
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        last = stopped or epoch == cfg.epochs
        if on_samples is not None and ((cfg.sample_every and epoch % cfg.sample_every == 0) or last):
            g_s = make_generator(cfg.seed + 1000 + epoch, device)
            on_samples(epoch, model.sample_images(cfg.n_samples, generator=g_s, temperature=cfg.temperature))

    model.load_state_dict(best_state)
    model.eval()
    return FlowTrainResult(
        model=model,
        history=history,
        best_epoch=stopper.best_epoch,
        best_val_bpd=stopper.best,
        epochs_run=len(history.rows),
        stopped_early=stopped,
    )


def _load_resume(path: Path | None, cfg_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """The resume state at ``path`` when it exists and was written for this config, else ``None``."""
    if path is None or not Path(path).is_file():
        return None
    state = load_checkpoint(path, kind="flow_resume")
    if dict(state["config"]) != dict(cfg_dict):
        return None  # stale state from other params: start afresh rather than mix configs
    return state


def save_trained(path: str | Path, model: ImageFlow, config: FlowConfig | Mapping[str, Any], **extra: Any) -> None:
    """Checkpoint ``{'kind': 'flow', 'config', 'shape', 'state_dict', **extra}`` atomically."""
    cfg = _as_config(config)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, kind="flow", config=to_dict(cfg), shape=list(model.shape), state_dict=state, **extra)


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> tuple[ImageFlow, FlowConfig]:
    """Rebuild a trained flow from its checkpoint (``weights_only`` load) -> ``(model in eval mode, config)``.

    Raises:
        CheckpointError: missing/unsafe file, not a flow checkpoint, or weights that do not fit.
    """
    ckpt = load_checkpoint(path, kind="flow")
    cfg = _as_config(ckpt["config"])
    model = build_model(cfg, tuple(int(s) for s in ckpt["shape"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the flow its config builds ({err})") from None
    return model.to(device).eval(), cfg


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> Tensor:
    """uint8 ``(n, H, W)`` -> one uint8 ``(rows*(H+pad)+pad, nrow*(W+pad)+pad)`` grid image (black padding)."""
    n, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[k]
    return grid


__all__ = [
    "IMAGE_SHAPE",
    "FlowTrainResult",
    "ImageFlow",
    "build_model",
    "coupling_masks",
    "gaussian_baseline",
    "image_grid",
    "load_trained",
    "mean_and_se",
    "per_image_bpd",
    "save_trained",
    "train_flow",
]
