"""configure_torch: the deterministic flag reaches ATen without importing inductor (each case
in a fresh interpreter, because the flag and ``sys.modules`` are process-wide); the CPU
allocator tuning; ``mean_and_se``.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from genmodels.training import mean_and_se

_PROBE = """
import json, sys
{pre}
import torch
from genmodels.training import configure_torch
before = torch.empty(8).isnan().all().item()
configure_torch(0, {deterministic})
out = {{
    "enabled": torch.are_deterministic_algorithms_enabled(),
    "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    "inductor_loaded": "torch._inductor.config" in sys.modules,
    # With deterministic algorithms on, ATen fills torch.empty with NaN: proof that the
    # kernels see the flag, not just the Python getter.
    "empty_is_nan_before": before,
    "empty_is_nan_after": torch.empty(8).isnan().all().item(),
}}
if "torch._inductor.config" in sys.modules:
    out["inductor_deterministic"] = bool(sys.modules["torch._inductor.config"].deterministic)
print(json.dumps(out))
"""


def _probe(pre: str = "", deterministic: bool = True) -> dict:
    code = _PROBE.format(pre=pre, deterministic=deterministic)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_deterministic_flag_is_set_without_importing_inductor() -> None:
    out = _probe()
    assert out["enabled"] and out["warn_only"]
    assert not out["empty_is_nan_before"] and out["empty_is_nan_after"]
    # the whole point of the private setter: ~2 s of dynamo/inductor imports per stage avoided
    assert not out["inductor_loaded"]


def test_deterministic_flag_also_reaches_inductor_when_it_is_loaded() -> None:
    out = _probe(pre="import torch._inductor.config")
    assert out["enabled"] and out["warn_only"] and out["empty_is_nan_after"]
    assert out["inductor_deterministic"] is True


@pytest.mark.parametrize("pre", ["", "import torch._inductor.config"])
def test_deterministic_false_leaves_torch_alone(pre: str) -> None:
    out = _probe(pre=pre, deterministic=False)
    assert not out["enabled"] and not out["empty_is_nan_after"]


_FAULTS = """
import json, resource, sys
import torch
from genmodels.diffusion.model import DenoiserMLP
from genmodels.training import tune_cpu_allocator
tuned = tune_cpu_allocator() if {tune} else None
torch.set_num_threads(1)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

net = DenoiserMLP(2, 32, 64, 5, 2500)  # the DDPM's default network and training batch
x, t = torch.randn(4096, 2), torch.randint(1, 2501, (4096,))

def step():
    net(x, t).square().sum().backward()

for _ in range(3):  # warm up: the heap grows once
    step()
before = faults()
for _ in range(10):
    step()
print(json.dumps({{"tuned": tuned, "faults_per_step": (faults() - before) / 10}}))
"""


def _faults(tune: bool) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _FAULTS.format(tune=tune)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is for glibc")
def test_tuned_allocator_reuses_freed_activation_memory() -> None:
    """A DDPM training step (forward + backward, batch 4,096) allocates and frees some 30
    activations and gradients of 1 MiB. glibc serves them by mmap above its threshold and trims
    the freed heap top, so every step page-faults its memory in anew; with the thresholds raised
    the freed blocks are reused and a step faults a fraction of those pages in."""
    # How much glibc faults in varies from process to process with where its dynamic mmap
    # threshold settles (plain: 246-670 per step over 11 processes on the 2026-12-08 machine;
    # tuned: 0-128), so each side is the median of three processes.
    runs = {tune: [_faults(tune) for _ in range(3)] for tune in (False, True)}
    assert all(r["tuned"] is True for r in runs[True])
    plain = statistics.median(r["faults_per_step"] for r in runs[False])
    tuned = statistics.median(r["faults_per_step"] for r in runs[True])
    assert plain > 150, runs  # > 0.6 MiB of fresh pages per step, or there is nothing to compare
    assert tuned < 0.5 * plain, runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_and_se_against_the_statistics_module(dtype: torch.dtype) -> None:
    """The one "mean +- se" every stage reports: float64 mean and unbiased std / sqrt(N) of the
    values as given (a float32 tensor's own values, not re-rounded), checked against Python's
    ``statistics`` on exact floats; NaN standard error for a single value."""
    v = (torch.randn(1001, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 7).to(dtype)
    floats = [float(x) for x in v]
    mean, se = mean_and_se(v)
    assert mean == pytest.approx(statistics.fmean(floats), rel=1e-14)
    assert se == pytest.approx(statistics.stdev(floats) / math.sqrt(len(floats)), rel=1e-12)
    # float32 input: the sum is taken in float64 (a float32 sum of 1001 values near 7 is off by ~1e-6)
    assert abs(mean - statistics.fmean(floats)) < 1e-12
    m1, se1 = mean_and_se(v[:1])
    assert m1 == floats[0] and math.isnan(se1)
