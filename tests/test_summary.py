"""stages/summary.py: the comparison page flags exactly the figures where a model does not beat a
naive baseline, shows floors and baselines beside each figure, and omits absent keys."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():  # noqa: ANN202 - the stage module
    spec = importlib.util.spec_from_file_location("summary_stage", REPO / "stages" / "summary.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["summary_stage"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


S = _load()

REALNVP = {
    "test_nll": 2.50,
    "test_nll_se": 0.01,
    "true_entropy": 2.40,
    "true_entropy_se": 0.002,
    "kl_gap": 0.10,
    "kl_gap_se": 0.01,
    "baseline_gaussian_test_nll": 3.20,
    "baseline_gaussian_test_nll_se": 0.01,
    "baseline_gaussian_kl_gap": 0.80,
    "baseline_kde_test_nll": 2.55,
    "baseline_kde_test_nll_se": 0.01,
    "baseline_kde_kl_gap": 0.15,
    # The model's MMD is worse than the KDE's: must be flagged.
    "mmd": 0.004,
    "mmd_floor": 0.0001,
    "baseline_gaussian_mmd": 0.05,
    "baseline_kde_mmd": 0.001,
    "energy_distance": 0.01,
    "energy_distance_floor": 0.001,
    "baseline_gaussian_energy_distance": 0.2,
    "baseline_kde_energy_distance": 0.02,
    "swd": 0.02,
    "swd_floor": 0.002,
    "baseline_gaussian_swd": 0.3,
    "baseline_kde_swd": 0.03,
    # target metric: the model (-2.45) is closer to the floor (-2.40) than both baselines.
    "sample_logp": -2.45,
    "sample_logp_floor": -2.40,
    "baseline_gaussian_sample_logp": -3.5,
    "baseline_kde_sample_logp": -2.6,
    "n_samples": 16384,
    "point_set": "two_moons",
}


def _row(rows, key):  # noqa: ANN001, ANN202
    return next(r for r in rows if r["row"].key == key)


def test_lower_is_better_flags_only_the_figures_a_baseline_wins() -> None:
    rows = S.model_rows("realnvp2d", REALNVP)
    assert not _row(rows, "test_nll")["flag"] and "beats gaussian and kde" in _row(rows, "test_nll")["verdict"]
    mmd = _row(rows, "mmd")
    assert mmd["flag"] and mmd["verdict"] == "⚠ not better than kde"
    assert mmd["floor"] == 0.0001 and mmd["baselines"] == {"gaussian": 0.05, "kde": 0.001}
    assert not _row(rows, "sample_logp")["flag"]  # closest to its floor
    assert _row(rows, "test_nll")["floor"] == 2.40 and _row(rows, "kl_gap")["floor"] == 0.0


def test_a_difference_within_two_standard_errors_is_a_tie_and_flagged() -> None:
    m = {**REALNVP, "test_nll": 2.53, "test_nll_se": 0.01, "baseline_kde_test_nll": 2.55}
    r = _row(S.model_rows("realnvp2d", m), "test_nll")
    # 2.55 - 2.53 = 0.02 < 2 * sqrt(0.01^2 + 0.01^2) = 0.028
    assert r["flag"] and "kde (tie within 2 SE)" in r["verdict"]
    m["test_nll"] = 2.51  # margin 0.04 > 0.028: a real win
    assert not _row(S.model_rows("realnvp2d", m), "test_nll")["flag"]


def test_target_metric_judges_distance_to_the_floor() -> None:
    m = {**REALNVP, "sample_logp": -2.0}  # overshoots the floor by 0.4 (mode-seeking); KDE is 0.2 off
    r = _row(S.model_rows("realnvp2d", m), "sample_logp")
    assert r["flag"] and "kde" in r["verdict"] and "gaussian" not in r["verdict"]


def test_higher_is_better_for_auroc() -> None:
    ebm = {
        "ood_auroc": 0.9,
        "baseline_gaussian_ood_auroc": 0.95,
        "baseline_kde_ood_auroc": 0.7,
        "ood_auroc_noise": 1.0,
        "baseline_gaussian_ood_auroc_noise": 0.99,
        "baseline_kde_ood_auroc_noise": 0.98,
        "fid": 10.0,
        "fid_floor": 1.0,
        "baseline_gaussian_fid": 30.0,
        "baseline_kde_fid": 20.0,
        "energy_data": -1.0,
    }
    rows = S.model_rows("ebm", ebm)
    assert _row(rows, "ood_auroc")["verdict"] == "⚠ not better than gaussian"
    assert not _row(rows, "ood_auroc_noise")["flag"] and not _row(rows, "fid")["flag"]
    assert _row(rows, "energy_data")["verdict"] == ""  # information only, never judged
    assert "ood_auroc_fashion" not in {r["row"].key for r in rows}  # absent key -> no row


def test_absent_entropy_keys_give_no_rows_and_nan_is_flagged() -> None:
    csv_like = {
        k: v for k, v in REALNVP.items() if "kl_gap" not in k and "sample_logp" not in k and k != "true_entropy"
    }
    rows = S.model_rows("realnvp2d", csv_like)
    keys = {r["row"].key for r in rows}
    assert "kl_gap" not in keys and "sample_logp" not in keys
    assert _row(rows, "test_nll")["floor"] is None
    page = S.render({"realnvp2d": csv_like})
    assert "KL gap" not in page and "| 0 " not in page  # absent, not zero
    nan = _row(S.model_rows("realnvp2d", {**REALNVP, "swd": None}), "swd")  # JSON null = NaN written by write_json
    assert nan["flag"] and "NaN" in nan["verdict"]


def test_render_overview_counts_flags_and_names_missing_models() -> None:
    page = S.render({"realnvp2d": REALNVP}, {"realnvp2d": {"epochs_run": 40, "best_epoch": 31, "stopped_early": True}})
    overview = page.split("## Overview")[1].split("## realnvp2d")[0]
    assert (
        "| realnvp2d | KL gap = NLL − H (nats) | 0.1 ± 0.01 | 0 (perfect model) | 0.15 (kde) | ⚠ 1 of 6 |" in overview
    )
    for m in ("ddpm", "flow", "ebm"):
        assert f"| {m} | not evaluated yet" in overview
    assert "Training: 40 epochs, best epoch 31, stopped early." in page
    assert "| MMD² (RBF) | **0.004** | ↓ | 1.000e-04 (real vs real) | 0.05 | 0.001 | ⚠ not better than kde |" in page
    assert "`plots/figures/realnvp2d/results.png`" in page
    assert "`n_samples` = 1.638e+04" in page or "`n_samples` = 16384" in page


def test_summary_cli_writes_a_deterministic_page(tmp_path: Path) -> None:
    mdir = tmp_path / "metrics"
    mdir.mkdir()
    (mdir / "realnvp2d.json").write_text(json.dumps(REALNVP))
    (mdir / "train_realnvp2d.json").write_text(json.dumps({"epochs_run": 3, "best_epoch": 3}))
    out = tmp_path / "metrics" / "SUMMARY.md"
    texts = []
    for _ in range(2):
        subprocess.run(
            [sys.executable, str(REPO / "stages" / "summary.py"), "--metrics-dir", str(mdir), "--out", str(out)],
            check=True,
        )
        texts.append(out.read_bytes())
    assert texts[0] == texts[1]
    page = texts[0].decode()
    assert page.startswith("# Model comparison") and "⚠ not better than kde" in page


def test_summary_rejects_a_non_object_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "flow.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="flow.json"):
        S.load_metrics(tmp_path)
