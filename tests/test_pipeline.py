"""The whole pipeline on the smoke params, for real: every metrics file and figure is written,
a forced re-run is byte-identical, and a DDPM change re-runs only the DDPM stages."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, DvcProject, deep_merge

MODELS = ("realnvp2d", "ddpm", "flow", "ebm")


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every pipeline output: checkpoints, prepared data, metrics, series, figures.

    ``metrics/timing/`` is left out on purpose: it holds wall-clock sampling speeds, the one
    output that is not reproducible by nature, kept apart from ``metrics/<model>.json`` for that.
    """
    out = {}
    for folder in ("models", "data/prepared", "metrics", "plots"):
        for p in sorted((root / folder).rglob("*")):
            if p.is_file() and not p.relative_to(root).as_posix().startswith("metrics/timing/"):
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
def test_whole_pipeline_smoke_reproducible_and_selective(dvc_project: DvcProject) -> None:
    proj, root = dvc_project, dvc_project.root
    shutil.copy2(REPO / "params.smoke.yaml", root / "params.smoke.yaml")
    smoke = yaml.safe_load((REPO / "params.smoke.yaml").read_text())
    tiny = yaml.safe_load((root / "params.yaml").read_text())  # project params + the fixture's mirror paths
    proj.write_params(raw=deep_merge(tiny, smoke))
    proj.commit("smoke params")

    first_run = proj.dvc("repro")
    ran = set(proj.ran_stages(first_run))
    expected = {f"train_{m}" for m in MODELS} | {f"evaluate@{m}" for m in MODELS} | {f"plot@{m}" for m in MODELS}
    assert expected | {"summary"} <= ran
    for m in MODELS:
        assert (root / "metrics" / f"{m}.json").is_file() and (root / "metrics" / f"train_{m}.json").is_file()
        pngs = list((root / "plots" / "figures" / m).glob("*.png"))
        assert len(pngs) >= 3, f"{m}: figures {pngs}"
    assert "| " in (root / "metrics" / "SUMMARY.md").read_text()
    first = _hashes(root)
    assert len(first) > 40

    # Same params, same seeds, CPU: every output byte-identical after a forced re-run.
    proj.dvc("repro", "--force")
    second = _hashes(root)
    assert second.keys() == first.keys()
    differ = sorted(k for k in first if first[k] != second[k])
    assert differ == [], f"outputs differ between two runs: {differ}"

    proj.commit("ran")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ddpm"]["hidden_units"] = params["ddpm"]["hidden_units"] + 4
    proj.write_params(raw=params)
    rerun = set(proj.ran_stages(proj.dvc("repro")))
    assert rerun == {"train_ddpm", "evaluate@ddpm", "plot@ddpm", "summary"}, rerun
