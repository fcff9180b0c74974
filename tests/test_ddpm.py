"""DDPM samplers with the Bayes-optimal (oracle) network on Gaussian data, the network's
time-embedding paths, and the trainer: determinism, resume, NaN handling, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_diffusion_elbo import S2, M, oracle_model

from genmodels.configs.ddpm import DDPMConfig
from genmodels.diffusion import (
    DenoiserMLP,
    build_model,
    config_dict,
    load_trained,
    sample,
    save_trained,
    strided_steps,
    train_ddpm,
)
from genmodels.diffusion.schedule import NoiseSchedule
from genmodels.training import CheckpointError, NonFiniteLossError, save_checkpoint


def _check_gaussian(x: torch.Tensor, bias_tol: float) -> None:
    """Sample mean/variance against N(M, diag(S2)): 5 standard errors + a small discretisation allowance."""
    n = x.shape[0]
    mean, var = x.mean(0), x.var(0)
    se_m = (S2 / n).sqrt()
    se_v = S2 * math.sqrt(2.0 / (n - 1))
    assert torch.all((mean - M).abs() < 5 * se_m + bias_tol), (mean, M)
    assert torch.all((var - S2).abs() < 5 * se_v + bias_tol * S2), (var, S2)


@pytest.mark.parametrize("parameterization", ["mean", "eps", "x0"])
@pytest.mark.parametrize(("eta", "steps", "tol"), [(1.0, 50, 0.03), (0.0, 250, 0.05)])
def test_strided_sampler_with_oracle_reproduces_the_data(parameterization: str, eta: float, steps: int, tol: float) -> None:
    """The deterministic DDIM (eta = 0) needs more steps: at S = 50 its last jump to x0_hat
    under-disperses by ~16% on this linear schedule (3% at S = 250)."""
    s = NoiseSchedule(2500, 1e-4, 0.02, dtype=torch.float64)
    model = oracle_model(s, parameterization)
    x = sample(model, 20000, sampling_steps=steps, eta=eta, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2) and x.dtype == torch.float64
    _check_gaussian(x, bias_tol=tol)


@pytest.mark.parametrize("parameterization", ["mean", "eps"])
def test_full_ancestral_chain_with_oracle_reproduces_the_data(parameterization: str) -> None:
    s = NoiseSchedule(2500, 1e-4, 0.02, dtype=torch.float64)
    model = oracle_model(s, parameterization)
    x = sample(model, 20000, generator=torch.Generator().manual_seed(1))
    _check_gaussian(x, bias_tol=0.02)


def test_strided_steps_cover_the_chain() -> None:
    assert strided_steps(10, 10) == list(range(10, -1, -1))
    taus = strided_steps(2500, 7)
    assert taus[0] == 2500 and taus[-1] == 0 and all(a > b for a, b in zip(taus, taus[1:], strict=False))
    with pytest.raises(ValueError):
        strided_steps(10, 11)


def test_time_embedding_table_equals_per_row_embedding() -> None:
    net = DenoiserMLP(2, 32, 16, 3, n_steps=20).double()
    for p in net.parameters():  # non-zero output layer so the comparison means something
        torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100, 2, generator=g, dtype=torch.float64)
    t = torch.randint(1, 21, (100,), generator=g)
    per_row = net(x[:21], t[:21])  # 21 rows <= L + 1: embedded row by row
    table = net(x, t)[:21]  # 100 rows > L + 1: gathered from the table
    torch.testing.assert_close(per_row, table)
    one = net(x[:5], t[:1])  # a single step broadcast over the batch
    torch.testing.assert_close(one, net(x[:5], t[:1].expand(5)))


def _random_ddpm(n_steps: int, parameterization: str, seed: int):  # noqa: ANN202
    cfg = config_dict(DDPMConfig(n_steps=n_steps, hidden_units=16, parameterization=parameterization))
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight non-zero, the output layer too, so the paths must agree
        for p in model.net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("rows", [7, 300])  # fewer / more rows than the L + 1 = 51 steps
def test_forward_equals_textbook_mlp(rows: int) -> None:
    """The network's fused forward (per-layer shifts with the bias folded in, a gathered
    step table for big batches) against the plain definition: sinusoidal embedding ->
    time MLP -> one projection chunked per layer -> SiLU(W h + b + p) -> output layer."""
    from genmodels.diffusion.model import sinusoidal_embedding

    net = _random_ddpm(50, "mean", 0).net.double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, 51, (rows,), generator=g)
    proj = net.time_proj(net.time_mlp(sinusoidal_embedding(t, net.time_embed_dim).double()))
    h = x
    for layer, p in zip([net.inp, *net.hidden], proj.chunk(net.n_hidden, dim=1), strict=True):
        h = torch.nn.functional.silu(layer(h) + p)
    torch.testing.assert_close(net(x, t), net.out(h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("blocks", [0, 2])
def test_forward_at_shared_step_equals_forward(dtype: torch.dtype, blocks: int) -> None:
    """``blocks``: whole CPU blocks of rows before a ragged last one (0: one block, no split)."""
    net = _random_ddpm(50, "mean", 0).net.to(dtype)
    n = blocks * net.CPU_BLOCK_ROWS + 300
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=dtype)
    biases = net.step_biases(dtype)
    assert biases.shape == (51, net.n_hidden, 16)  # (L + 1, hidden layers, width)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for t in (1, 17, 50):
        tt = torch.tensor([t])
        with torch.inference_mode():
            fast = net.forward_at(x, biases[t])
        torch.testing.assert_close(fast, net(x, tt), **tol)


@pytest.mark.parametrize("parameterization", ["mean", "eps", "x0"])
def test_fast_sampler_and_bound_equal_the_per_row_network(parameterization: str) -> None:
    """The samplers and the full bound use forward_at; redo both with the plain forward and
    the same noise draws (same generator, same order) and compare."""
    from genmodels.diffusion.elbo import decoder_const, nll_bound, prior_kl, weighted_mse

    model = _random_ddpm(30, parameterization, 2).double()
    L = model.n_steps
    # ancestral chain, reference loop with the plain forward
    got = sample(model, 200, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    for t in range(L, 0, -1):
        tt = torch.full((200,), t)  # per-row steps: the forward's general path
        _, mean = model.predict(x, tt)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64) if t > 1 else torch.zeros_like(x)
        x = model.schedule.step(mean, tt, noise)
    torch.testing.assert_close(got, model.unstandardize(x), rtol=1e-8, atol=1e-8)  # float64, 30 chained steps
    # full bound: noise drawn step by step for all points (one chunk)
    pts = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 + 1
    bound = nll_bound(model, pts, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x0 = model.standardize(pts)
    ref = torch.zeros(64, dtype=torch.float64)
    for t in range(1, L + 1):
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        ref += weighted_mse(model, x0, torch.full((64,), t), noise)
    ref = ref + prior_kl(model, x0) + decoder_const(model) + model.log_scale_sum()
    torch.testing.assert_close(bound, ref, rtol=1e-8, atol=1e-8)


TINY = DDPMConfig(
    n_steps=40, hidden_units=16, epochs=4, batch_size=64, lr=1e-2, patience=50, sampling_steps=8, ema_decay=0.9
)


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (M + S2.sqrt() * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_is_deterministic_and_improves() -> None:
    train, val = _data(512, 0), _data(256, 1)
    seen: list[float] = []
    r1 = train_ddpm(TINY, train, val, on_epoch=lambda e, m: seen.append(m["val_loss"]))
    r2 = train_ddpm(TINY, train, val)
    assert _equal_states(r1.model.state_dict(), r2.model.state_dict())
    assert [r["val_loss"] for r in r1.history.rows] == seen and len(seen) == 4
    assert seen[-1] < seen[0]  # the zero-output start is the identity chain: far from the data
    assert r1.best_val == min(seen)


@pytest.mark.parametrize("t_sampling", ["importance", "uniform"])
def test_resume_gives_identical_weights(tmp_path: Path, t_sampling: str) -> None:
    cfg = DDPMConfig(**{**config_dict(TINY), "t_sampling": t_sampling})
    train, val = _data(512, 0), _data(256, 1)
    ref = train_ddpm(cfg, train, val)

    class Killed(Exception):
        pass

    def kill_at_2(epoch: int, metrics: object) -> None:
        if epoch == 2:
            raise Killed

    resume = tmp_path / "resume.pt"
    with pytest.raises(Killed):
        train_ddpm(cfg, train, val, resume_path=resume, on_epoch=kill_at_2)
    assert resume.is_file()
    resumed_epochs: list[int] = []
    res = train_ddpm(cfg, train, val, resume_path=resume, on_epoch=lambda e, m: resumed_epochs.append(e))
    assert resumed_epochs == [3, 4]
    assert _equal_states(ref.model.state_dict(), res.model.state_dict())
    assert ref.history.to_csv() == res.history.to_csv()


def _stop_at_2(epoch: int, metrics: object) -> None:
    """``on_epoch`` that interrupts a run after its second epoch (a kill between epochs)."""
    if epoch == 2:
        raise KeyboardInterrupt


def test_resume_state_without_the_ema_count_is_ignored(tmp_path: Path) -> None:
    """A resume file from before the EMA warm-up (no ``ema_updates``) is stale: the run starts
    afresh and ends where an uninterrupted run ends, instead of failing on the missing key."""
    train, val = _data(512, 0), _data(256, 1)
    ref = train_ddpm(TINY, train, val)
    resume = tmp_path / "resume.pt"

    with pytest.raises(KeyboardInterrupt):
        train_ddpm(TINY, train, val, resume_path=resume, on_epoch=_stop_at_2)
    old = torch.load(resume, weights_only=True)
    del old["ema_updates"]
    torch.save(old, resume)
    epochs: list[int] = []
    res = train_ddpm(TINY, train, val, resume_path=resume, on_epoch=lambda e, m: epochs.append(e))
    assert epochs == [1, 2, 3, 4]
    assert _equal_states(ref.model.state_dict(), res.model.state_dict())


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_state(tmp_path: Path) -> None:
    train, val = _data(512, 0), _data(256, 1)
    resume = tmp_path / "resume.pt"

    with pytest.raises(KeyboardInterrupt):
        train_ddpm(TINY, train, val, resume_path=resume, on_epoch=_stop_at_2)
    before = resume.read_bytes()
    bad = train.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="train_loss became nan at epoch 3"):
        train_ddpm(TINY, bad, val, resume_path=resume)
    assert resume.read_bytes() == before


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    res = train_ddpm(TINY, _data(256, 0), _data(128, 1))
    path = tmp_path / "model.pt"
    save_trained(path, res.model, config_dict(TINY))
    model, config = load_trained(path)
    assert config == config_dict(TINY)
    assert _equal_states(model.state_dict(), res.model.state_dict())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(
        sample(model, 64, sampling_steps=8, generator=g1), sample(res.model, 64, sampling_steps=8, generator=g2)
    )
    # another model's checkpoint, and weights that do not fit the stored config
    save_checkpoint(tmp_path / "other.pt", kind="realnvp2d", config={}, model={})
    with pytest.raises(CheckpointError, match="expected 'ddpm'"):
        load_trained(tmp_path / "other.pt")
    wrong = {**config_dict(TINY), "hidden_units": 32}
    save_checkpoint(tmp_path / "wrong.pt", kind="ddpm", config=wrong, model=res.model.state_dict())
    with pytest.raises(CheckpointError, match="do not match"):
        load_trained(tmp_path / "wrong.pt")
    assert build_model(wrong).net.inp.out_features == 32


def test_ema_starts_with_the_warm_up_average(tmp_path: Path) -> None:
    """The EMA's first updates use TensorFlow's warm-up decay ``min(d, (1 + k) / (10 + k))``, not
    ``d`` itself: with ``d = 0.9995`` a plain EMA would still hold 13% of the initial (identity)
    network after 4,000 steps. One step per epoch: after epoch 1 the average must be
    ``init + 0.9 (theta_1 - init)`` exactly, after epoch 2 ``ema_1 + (1 - 2/11) (theta_2 - ema_1)``."""
    from genmodels.diffusion.model import reset_parameters
    from genmodels.training import make_generator

    cfg = DDPMConfig(**{**config_dict(TINY), "batch_size": 512, "ema_decay": 0.9995, "epochs": 2})
    train, val = _data(512, 0), _data(256, 1)
    init = build_model(config_dict(cfg))
    reset_parameters(init.net, make_generator(cfg.seed, "cpu"))
    resume = tmp_path / "resume.pt"
    states = []

    def keep(epoch: int, metrics: object) -> None:
        states.append(torch.load(resume, weights_only=True))

    train_ddpm(cfg, train, val, resume_path=resume, on_epoch=keep)
    (s1, s2) = states
    assert s1["ema_updates"] == 1 and s2["ema_updates"] == 2
    for name, p0 in init.net.named_parameters():
        key = f"net.{name}"
        ema1 = torch.lerp(p0.detach(), s1["model"][key], 1 - 1 / 10)
        torch.testing.assert_close(s1["ema"][key], ema1, rtol=0, atol=1e-7)
        torch.testing.assert_close(s2["ema"][key], torch.lerp(ema1, s2["model"][key], 1 - 2 / 11), rtol=0, atol=1e-7)
    # and the average really moved off the initial weights (a plain 0.9995 EMA: 0.05% of the step)
    moved = max((s1["ema"][f"net.{n}"] - p.detach()).abs().max().item() for n, p in init.net.named_parameters())
    step = max((s1["model"][f"net.{n}"] - p.detach()).abs().max().item() for n, p in init.net.named_parameters())
    assert moved > 0.5 * step > 0


def test_forward_at_bfloat16_rounds_exactly_where_it_says() -> None:
    """The bfloat16 path (oneDNN matmul + SiLU post-op on the CPU) against an emulation in float64
    that rounds the input, weights, biases and every activation to bfloat16 and nothing else:
    they agree to one bfloat16 step of the output, while the exact float64 network differs by
    far more (so the path really runs in 16 bits, and rounds nowhere else)."""
    import copy

    import torch.nn.functional as F

    net = _random_ddpm(50, "eps", 0).net  # float32, every weight non-zero
    exact_net = copy.deepcopy(net).double()
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    b16, b64 = net.step_biases(torch.bfloat16), exact_net.step_biases(torch.float64)
    assert b16.dtype == torch.bfloat16
    torch.testing.assert_close(b16.double(), b64.to(torch.bfloat16).double(), rtol=0, atol=0)  # rounded once

    def bf(v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.bfloat16).double()

    for t in (1, 17, 50):
        with torch.inference_mode():
            fast = net.forward_at(x, b16[t])
            exact = exact_net.forward_at(x.double(), b64[t])
        assert fast.dtype == torch.float32 and fast.shape == (1000, 2)
        with torch.no_grad():
            h = bf(x.double())
            for layer, b in zip([exact_net.inp, *exact_net.hidden], b16[t].double(), strict=True):
                h = bf(F.silu(h @ bf(layer.weight).T + b))
            emu = bf(h @ bf(exact_net.out.weight).T + bf(exact_net.out.bias))
        ulp = float(2.0**-8 * emu.abs().max())  # one bfloat16 step at the largest output
        d_emu, d_exact = (fast.double() - emu).abs(), (fast.double() - exact).abs()
        # The kernel accumulates each product in float32, in its own order (AMX tiles and
        # AVX512-BF16 differ), so an activation within a float32 rounding of a bfloat16 tie
        # may round the other way: a rare output then moves by one bfloat16 step. Measured:
        # AMX 0 differing outputs of 2000; AVX512-BF16 without AMX 1 of 2000 (t = 17, one step),
        # against the exact network 2.1-3.3 steps at the maximum and 0.09-0.19 on average.
        assert float((d_emu > 0).double().mean()) <= 0.01, (t, d_emu)
        assert float(d_emu.max()) <= ulp, (t, float(d_emu.max()), ulp)
        assert float(d_exact.max()) > ulp, (t, float(d_exact.max()), ulp)
        assert float(d_emu.mean()) <= float(d_exact.mean()) / 100, (t, float(d_emu.mean()), float(d_exact.mean()))


def test_sampling_dtype_choice() -> None:
    from genmodels.diffusion import sampling_dtype

    assert sampling_dtype("bfloat16", "cpu") == torch.bfloat16
    assert sampling_dtype("float32", "cpu") == torch.float32
    assert sampling_dtype("auto", "cpu", torch.float64) == torch.float64  # a float64 model asked for precision
    assert sampling_dtype("auto", "cuda") == torch.float32  # launch-bound there: no gain from 16 bits
    # auto on the CPU: bfloat16 exactly where the kernel lists AMX tiles (read independently of torch)
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    want = torch.bfloat16 if "amx_tile" in flags and "amx_bf16" in flags else torch.float32
    assert sampling_dtype("auto", "cpu") == want
    with pytest.raises(ValueError, match="'auto', 'float32', 'bfloat16'"):
        sampling_dtype("float16", "cpu")


@pytest.mark.parametrize("parameterization", ["mean", "eps"])
def test_bfloat16_chain_stays_beside_the_float32_chain(parameterization: str) -> None:
    """Same seed, same noise: a trained model's full chain with the network in bfloat16 ends
    within a few percent of the samples' spread from the float32 chain (measured: 0.4-1.6%),
    and the two are not the same chain (the 16-bit network really ran)."""
    cfg = DDPMConfig(**{**TINY.__dict__, "parameterization": parameterization, "epochs": 8})
    model = train_ddpm(cfg, _data(1024, 0), _data(256, 1)).model
    a = sample(model, 2000, generator=torch.Generator().manual_seed(3), precision="float32")
    b = sample(model, 2000, generator=torch.Generator().manual_seed(3), precision="bfloat16")
    dev = float((a - b).abs().max() / a.std())
    assert 0 < dev < 0.05, dev
