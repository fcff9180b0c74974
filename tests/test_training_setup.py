"""configure_torch: the deterministic flag reaches ATen without importing inductor.

Each case runs in a fresh interpreter, because the flag and ``sys.modules`` are process-wide.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

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
