"""EBM model, loss and trainer: shapes, determinism, resume, divergence rollback and failure."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from genmodels.configs import ConfigError, load_params
from genmodels.configs.base import to_dict
from genmodels.configs.ebm import EBMConfig
from genmodels.ebm import (
    EBMDivergenceError,
    EnergyMLP,
    build_model,
    cd_loss,
    images_to_float,
    load_trained,
    train_ebm,
)
from genmodels.training import save_checkpoint


def rings(n: int, seed: int) -> torch.Tensor:
    """``n`` uint8 images (n, 28, 28) of bright rings with random centre and radius ("zeros")."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    c = 14 + 2 * (torch.rand(n, 2, generator=g) - 0.5)
    r = 7 + 2 * torch.rand(n, 1, 1, generator=g)
    d = ((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2).sqrt()
    return (255 * torch.exp(-((d - r) ** 2) / 2.0)).to(torch.uint8)


TINY = EBMConfig(
    hidden=(32,),
    lr=1e-3,
    epochs=3,
    batch_size=16,
    buffer_size=64,
    langevin_steps=5,
    patience=10,
    sample_every=2,
    sample_steps=10,
    lr_decay=1.0,
    min_epochs=1,
    ema_decay=0.9,  # exercised everywhere: determinism, resume and rollback must carry the average too
)


def test_model_shapes_and_architecture() -> None:
    model = build_model(to_dict(EBMConfig()))
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(784, 512), (512, 512), (512, 1)]  # the seed's 784-512-512-1
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3,)
    assert torch.equal(model(x), model(x.reshape(3, 784)))


def test_cd_loss_matches_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    er, ef = torch.randn(7, generator=g), torch.randn(5, generator=g)
    loss, cd, reg = cd_loss(er, ef, 0.1)
    exp_cd = sum(er.tolist()) / 7 - sum(ef.tolist()) / 5
    exp_reg = 0.1 * (sum(v * v for v in er.tolist()) / 7 + sum(v * v for v in ef.tolist()) / 5)
    assert math.isclose(cd.item(), exp_cd, rel_tol=1e-5) and math.isclose(reg.item(), exp_reg, rel_tol=1e-5)
    assert math.isclose(loss.item(), exp_cd + exp_reg, rel_tol=1e-5)


def test_config_rejects_bad_values() -> None:
    assert load_params({"ebm": {"hidden": [8, 8], "lr": "1e-3"}}).ebm.lr == 1e-3
    with pytest.raises(ConfigError, match="ebm.reinit_prob"):
        load_params({"ebm": {"reinit_prob": 1.5}})
    with pytest.raises(ConfigError, match="ebm.batch_size"):
        load_params({"ebm": {"batch_size": 256, "buffer_size": 128}})
    with pytest.raises(ConfigError, match="ebm.activation"):
        load_params({"ebm": {"activation": "gelu"}})
    with pytest.raises(ConfigError, match="ebm.langevn_steps"):
        load_params({"ebm": {"langevn_steps": 10}})


def test_training_is_deterministic_and_reports_series() -> None:
    train, val = rings(48, 0), rings(16, 1)
    rows: list[tuple[int, dict[str, float]]] = []
    grids: list[tuple[int, torch.Tensor]] = []
    a = train_ebm(
        TINY, train, val, on_epoch=lambda e, m: rows.append((e, dict(m))), on_samples=lambda e, s: grids.append((e, s))
    )
    b = train_ebm(TINY, train, val)
    for k, v in a.checkpoint["final_model"].items():
        assert torch.equal(v, b.checkpoint["final_model"][k])
    assert torch.equal(a.checkpoint["buffer"]["examples"], b.checkpoint["buffer"]["examples"])
    assert [e for e, _ in rows] == [1, 2, 3]
    need = {
        "train_loss",
        "val_loss",
        "energy_real",
        "energy_fake",
        "val_energy_real",
        "val_energy_fake",
        "rollbacks",
        "lr",
    }
    assert need <= set(rows[0][1])
    assert all(r["rollbacks"] == 0 for _, r in rows)
    # The reported train loss is the mean of cd + reg over batches; reg >= 0 by construction.
    assert all(r["reg_loss"] >= 0 for _, r in rows)
    assert [e for e, _ in grids] == [2, 3] and grids[0][1].shape == (64, 1, 28, 28)
    # Best checkpoint = epoch with the lowest validation loss.
    best = min(rows, key=lambda r: r[1]["val_loss"])
    assert a.best_epoch == best[0] and a.best_val_loss == best[1]["val_loss"]
    # With min_epochs, earlier epochs are never selected.
    c = train_ebm(dataclasses.replace(TINY, min_epochs=2), train, val)
    assert c.best_epoch == min((2, 3), key=lambda e: rows[e - 1][1]["val_loss"])


def test_resume_after_interruption_is_byte_identical(tmp_path: Path) -> None:
    train, val = rings(48, 0), rings(16, 1)
    full = train_ebm(TINY, train, val)

    class Interrupt(Exception):
        pass

    def stop_after_2(epoch: int, metrics: object) -> None:
        if epoch == 2:
            raise Interrupt

    resume = tmp_path / "resume.pt"
    with pytest.raises(Interrupt):
        train_ebm(TINY, train, val, on_epoch=stop_after_2, resume_path=resume)
    assert resume.is_file()
    seen: list[int] = []
    resumed = train_ebm(TINY, train, val, resume_path=resume, on_epoch=lambda e, m: seen.append(e))
    assert seen == [3]  # only the missing epoch ran
    for key in ("model", "final_model"):
        for k, v in full.checkpoint[key].items():
            assert torch.equal(v, resumed.checkpoint[key][k])
    assert torch.equal(full.checkpoint["buffer"]["examples"], resumed.checkpoint["buffer"]["examples"])
    assert full.history.to_csv() == resumed.history.to_csv()
    # A resume file from another config is ignored (training starts afresh, same result as full).
    other = dataclasses.replace(TINY, epochs=1)
    fresh = train_ebm(other, train, val, resume_path=resume)
    assert fresh.epochs_run == 1


def test_divergence_rolls_back_with_lower_lr_and_recovers() -> None:
    # lr = 10 blows the energies past max_energy in the first epoch; after one rollback the
    # learning rate is 10 * 1e-4 = 1e-3, which trains normally.
    cfg = dataclasses.replace(TINY, lr=10.0, max_energy=50.0, rollback_lr_factor=1e-4, max_rollbacks=2)
    events = []
    rows: list[dict[str, float]] = []
    res = train_ebm(
        cfg, rings(48, 0), rings(16, 1), on_rollback=events.append, on_epoch=lambda e, m: rows.append(dict(m))
    )
    assert len(events) == 1 and events[0].epoch == 1 and events[0].count == 1
    assert math.isclose(events[0].lr_after, 1e-3) and events[0].lr_before == 10.0
    assert [r["rollbacks"] for r in rows] == [1, 1, 1]  # observable in the per-epoch series
    assert math.isclose(rows[0]["lr"], 1e-3)
    assert all(r["max_abs_energy"] <= 50.0 for r in rows)
    assert res.epochs_run == 3 and len(res.rollbacks) == 1


def test_repeated_divergence_fails_clearly_and_keeps_last_good_state(tmp_path: Path) -> None:
    resume = tmp_path / "resume.pt"
    good = train_ebm(dataclasses.replace(TINY, epochs=1, max_energy=50.0), rings(48, 0), rings(16, 1))
    assert good.epochs_run == 1
    # lr 1e4 with factor 0.5 keeps diverging: 2 rollbacks, then a clear error.
    cfg = dataclasses.replace(TINY, lr=1e4, max_energy=50.0, max_rollbacks=2)
    events = []
    with pytest.raises(EBMDivergenceError, match=r"diverged at epoch 1 .*after 2 rollback\(s\).*max_rollbacks = 2"):
        train_ebm(cfg, rings(48, 0), rings(16, 1), on_rollback=events.append, resume_path=resume)
    assert [e.count for e in events] == [1, 2]
    assert [e.lr_after for e in events] == [5e3, 2.5e3]
    snap = torch.load(resume, weights_only=True)
    assert snap["epoch"] == 0 and snap["history"] == []
    # The kept weights are the untouched initial ones: finite and inside nn.Linear's init bound.
    w = snap["model"]["net.0.weight"]
    assert torch.isfinite(w).all() and w.abs().max() <= 1 / math.sqrt(784)
    assert torch.isfinite(snap["buffer"]["examples"]).all()


def test_trained_model_separates_data_from_noise_and_loads(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, hidden=(64,), epochs=6, langevin_steps=10)
    train, val, test = rings(64, 0), rings(16, 1), rings(64, 2)
    res = train_ebm(cfg, train, val)
    noise = torch.rand(64, 784, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        e_test = res.model(images_to_float(test))
        e_noise = res.model(noise)
    # Mann-Whitney AUROC of -energy, held-out rings vs uniform noise.
    auroc = (e_test[:, None] < e_noise[None, :]).double().mean().item()
    assert auroc > 0.95, auroc
    path = tmp_path / "model.pt"
    save_checkpoint(path, kind="ebm", config=to_dict(cfg), **res.checkpoint)
    model, config = load_trained(path, "cpu")
    assert isinstance(model, EnergyMLP) and config == to_dict(cfg)
    with torch.no_grad():
        assert torch.equal(model(images_to_float(test)), e_test)
