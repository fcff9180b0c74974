"""Stage `summary`: one Markdown page comparing every model with its floors and naive baselines.

Usage:

    python stages/summary.py [--metrics-dir metrics] [--out metrics/SUMMARY.md] [--figures-dir plots/figures]

Reads ``metrics/<model>.json`` (the ``evaluate`` stage) and, when present,
``metrics/train_<model>.json`` (the training stages), and writes ``metrics/SUMMARY.md``: an
overview table (one headline figure per model), then one table per model with each figure of
merit beside its floor / reference and the naive baselines (full-covariance Gaussian, KDE), and a
verdict column that flags (⚠) every figure where the model does not beat a naive baseline --
including ties within two standard errors when both sides report one. Missing keys (e.g. the
entropy-based keys of a user CSV point set) give no row; a model not yet evaluated is named as such.

The page is deterministic (sorted keys, fixed number formats, no timestamps), so it only changes
when a metric does. It does not talk to MLflow: the numbers in it are logged by ``evaluate``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

MODELS = ("realnvp2d", "ddpm", "flow", "ebm")
BASELINES = ("gaussian", "kde")
TITLES = {
    "realnvp2d": "RealNVP on the 2D point set",
    "ddpm": "DDPM on the 2D point set",
    "flow": "Image flow on Fashion-MNIST class 0",
    "ebm": "EBM on MNIST digit 0",
}
FIGURES = {
    "realnvp2d": ("results.png", "density.png", "loss.png"),
    "ddpm": ("results.png", "process.png", "density.png", "loss.png"),
    "flow": ("samples.png", "temperature.png", "interpolation.png", "loss.png"),
    "ebm": ("samples.png", "langevin.png", "loss.png"),
}


@dataclass(frozen=True)
class Row:
    """One figure of merit of a model.

    Attributes:
        key: the metric key in ``metrics/<model>.json``.
        label: what the reader sees.
        better: ``lower``, ``higher``, ``target`` (closest to the floor is best) or ``info``
            (shown, never judged).
        floor: key of the floor / reference value (``None`` = none), or a number (e.g. 0 for a KL gap).
        floor_label: how the floor column explains that value.
        baseline: the metric name after ``baseline_<name>_`` (``None`` = no baselines).
    """

    key: str
    label: str
    better: str
    floor: str | float | None = None
    floor_label: str = "floor"
    baseline: str | None = None


def _sample_rows(suffix: str = "", what: str = "") -> list[Row]:
    return [
        Row(f"mmd{suffix}", f"MMD² (RBF){what}", "lower", "mmd_floor", "real vs real", "mmd"),
        Row(
            f"energy_distance{suffix}",
            f"energy distance{what}",
            "lower",
            "energy_distance_floor",
            "real vs real",
            "energy_distance",
        ),
        Row(f"swd{suffix}", f"sliced Wasserstein-2{what}", "lower", "swd_floor", "real vs real", "swd"),
        Row(
            f"sample_logp{suffix}",
            f"mean true log p of samples{what}",
            "target",
            "sample_logp_floor",
            "real draw: the target",
            "sample_logp",
        ),
    ]


SPECS: dict[str, list[Row]] = {
    "realnvp2d": [
        Row("test_nll", "test NLL (nats)", "lower", "true_entropy", "true entropy H", "test_nll"),
        Row("kl_gap", "KL gap = NLL − H (nats)", "lower", 0.0, "perfect model", "kl_gap"),
        *_sample_rows(),
    ],
    "ddpm": [
        Row("nll_bound", "NLL bound, −ELBO (nats)", "lower", "true_entropy", "true entropy H", "test_nll"),
        Row("kl_gap_bound", "KL gap bound (nats)", "lower", 0.0, "perfect model", "kl_gap"),
        *_sample_rows(what=", full chain"),
        *_sample_rows("_strided", ", strided sampler"),
    ],
    "flow": [
        Row("test_bpd", "test bits/dim", "lower", None, "", "test_bpd"),
        Row("ood_auroc", "OOD AUROC vs other Fashion classes", "higher", 1.0, "perfect separation", "ood_auroc"),
        Row("ood_auroc_mnist", "OOD AUROC vs MNIST", "higher", 1.0, "perfect separation", "ood_auroc_mnist"),
        Row("fid", "FID (own classifier)", "lower", "fid_floor", "real vs real", "fid"),
        Row("classifier_test_accuracy", "FID classifier test accuracy", "info"),
        Row("fid_n_generated", "FID: generated images", "info"),
        Row("fid_n_real", "FID: real images", "info"),
    ],
    "ebm": [
        Row("ood_auroc", "OOD AUROC vs other digits", "higher", 1.0, "perfect separation", "ood_auroc"),
        Row("ood_auroc_noise", "OOD AUROC vs uniform noise", "higher", 1.0, "perfect separation", "ood_auroc_noise"),
        Row(
            "ood_auroc_fashion", "OOD AUROC vs Fashion-MNIST", "higher", 1.0, "perfect separation", "ood_auroc_fashion"
        ),
        Row("fid", "FID (own classifier)", "lower", "fid_floor", "real vs real", "fid"),
        Row("energy_data", "mean energy: test data", "info"),
        Row("energy_samples", "mean energy: samples", "info"),
        Row("energy_noise", "mean energy: uniform noise", "info"),
        Row("energy_other_digits", "mean energy: other digits", "info"),
        Row("energy_fashion", "mean energy: Fashion-MNIST", "info"),
        Row("classifier_test_accuracy", "FID classifier test accuracy", "info"),
        Row("fid_n_generated", "FID: generated images", "info"),
        Row("fid_n_real", "FID: real images", "info"),
    ],
}
HEADLINE = {"realnvp2d": "kl_gap", "ddpm": "kl_gap_bound", "flow": "test_bpd", "ebm": "fid"}
"""The figure the overview table shows per model (falls back to the first judged row present)."""


# ----------------------------------------------------------------------------------- logic


def _num(v: Any) -> float | None:
    """A metric value as float; None for absent/non-numeric; NaN for JSON null (a NaN written by write_json)."""
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def fmt(v: float | None) -> str:
    """Four significant digits; ``—`` for absent, ``NaN`` for not-a-number."""
    if v is None:
        return "—"
    if math.isnan(v):
        return "NaN"
    if v.is_integer() and abs(v) < 1e9:
        return str(int(v))  # counts and exact references (0, 1) read better without decimals
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def _floor_value(metrics: Mapping[str, Any], row: Row) -> float | None:
    if row.floor is None:
        return None
    if isinstance(row.floor, (int, float)):
        return float(row.floor)
    return _num(metrics[row.floor]) if row.floor in metrics else None


def _se(metrics: Mapping[str, Any], key: str) -> float | None:
    v = metrics.get(key + "_se")
    v = _num(v) if v is not None else None
    return v if v is not None and math.isfinite(v) else None


def judge(
    row: Row, value: float, floor: float | None, baselines: Mapping[str, float], ses: Mapping[str, float | None]
) -> tuple[str, bool]:
    """Verdict text and whether it is a flag (⚠): the model does not beat some naive baseline.

    A baseline counts as beaten only when the model is better by more than two standard errors
    of the difference (when both report a standard error; otherwise by any margin).

    Args:
        ses: standard errors keyed ``model`` and by baseline name (None = unknown).
    """
    if row.better == "info" or not baselines:
        return "", False
    if math.isnan(value):
        return "⚠ no value (NaN: diverged?)", True
    not_beaten: list[str] = []
    for name, b in sorted(baselines.items()):
        if math.isnan(b):
            continue
        if row.better == "target":
            if floor is None or math.isnan(floor):
                continue
            margin = abs(b - floor) - abs(value - floor)
        else:
            margin = (b - value) if row.better == "lower" else (value - b)
        sm, sb = ses.get("model"), ses.get(name)
        tol = 2.0 * math.hypot(sm, sb) if sm is not None and sb is not None else 0.0
        if margin <= tol:
            not_beaten.append(name + (" (tie within 2 SE)" if 0 < margin <= tol else ""))
    if not_beaten:
        return "⚠ not better than " + ", ".join(not_beaten), True
    return "✓ beats " + " and ".join(sorted(baselines)), False


def model_rows(model: str, metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The table rows of one model: ``{label, value, se, floor, floor_label, baselines, verdict, flag, row}``."""
    out = []
    for row in SPECS[model]:
        if row.key not in metrics:
            continue  # absent, never zero (e.g. entropy keys of a CSV point set)
        value = _num(metrics[row.key])
        if value is None:
            continue
        floor = _floor_value(metrics, row)
        baselines: dict[str, float] = {}
        ses: dict[str, float | None] = {"model": _se(metrics, row.key)}
        if row.baseline:
            for b in BASELINES:
                k = f"baseline_{b}_{row.baseline}"
                if k in metrics and _num(metrics[k]) is not None:
                    baselines[b] = _num(metrics[k])  # type: ignore[assignment]
                    ses[b] = _se(metrics, k)
        verdict, flag = judge(row, value, floor, baselines, ses)
        out.append(
            {
                "row": row,
                "label": row.label,
                "value": value,
                "se": ses["model"],
                "floor": floor,
                "floor_label": row.floor_label if floor is not None else "",
                "baselines": baselines,
                "verdict": verdict,
                "flag": flag,
            }
        )
    return out


def _value_cell(v: float, se: float | None) -> str:
    return fmt(v) + (f" ± {fmt(se)}" if se is not None else "")


def _table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| figure | model | better | floor / reference | Gaussian baseline | KDE baseline | verdict |",
        "| --- | ---: | :---: | --- | ---: | ---: | --- |",
    ]
    arrows = {"lower": "↓", "higher": "↑", "target": "→ floor", "info": ""}
    for r in rows:
        floor = f"{fmt(r['floor'])} ({r['floor_label']})" if r["floor"] is not None else "—"
        base = [fmt(r["baselines"].get(b)) for b in BASELINES]
        value = _value_cell(r["value"], r["se"])
        if r["flag"]:
            value = f"**{value}**"
        lines.append(
            f"| {r['label']} | {value} | {arrows[r['row'].better]} | {floor} | {base[0]} | {base[1]} | {r['verdict']} |"
        )
    return lines


def _train_line(train: Mapping[str, Any] | None) -> str | None:
    if not train:
        return None
    parts = []
    if "epochs_run" in train:
        parts.append(f"{train['epochs_run']} epochs")
    if "best_epoch" in train:
        parts.append(f"best epoch {train['best_epoch']}")
    if train.get("stopped_early"):
        parts.append("stopped early")
    return "Training: " + ", ".join(parts) + "." if parts else None


def render(
    metrics: Mapping[str, Mapping[str, Any] | None],
    train: Mapping[str, Mapping[str, Any] | None] | None = None,
    figures_dir: str = "plots/figures",
) -> str:
    """The Markdown page for ``{model: metrics dict or None (not evaluated)}``."""
    train = train or {}
    out = [
        "# Model comparison",
        "",
        "Generated by `stages/summary.py` from `metrics/<model>.json` (stage `evaluate`). Every figure sits "
        "beside its floor (what a perfect model gets: an independent real draw against the same test set, "
        "or the exact reference) and two naive baselines fitted on the same training data: a full-covariance "
        "Gaussian and a kernel density estimate. **⚠ marks a figure where the model does not beat a naive "
        "baseline** (by more than two standard errors where both report one). ↓ lower is better, ↑ higher is "
        "better, → floor: closest to the floor is best.",
        "",
        "## Overview",
        "",
        "| model | headline figure | model | floor / reference | best baseline | figures not beating a baseline |",
        "| --- | --- | ---: | --- | ---: | --- |",
    ]
    sections: list[str] = []
    for model in MODELS:
        m = metrics.get(model)
        if m is None:
            out.append(f"| {model} | not evaluated yet (no `metrics/{model}.json`) | — | — | — | — |")
            continue
        rows = model_rows(model, m)
        judged = [r for r in rows if r["row"].better != "info" and r["baselines"]]
        flagged = [r for r in judged if r["flag"]]
        head = next((r for r in rows if r["row"].key == HEADLINE[model]), None) or next(iter(judged or rows), None)
        if head is None:
            out.append(f"| {model} | no known figures in `metrics/{model}.json` | — | — | — | — |")
        else:
            best = None
            if head["baselines"]:
                pick = min if head["row"].better == "lower" else max
                best_name = pick(head["baselines"], key=lambda b: head["baselines"][b])
                best = f"{fmt(head['baselines'][best_name])} ({best_name})"
            floor = f"{fmt(head['floor'])} ({head['floor_label']})" if head["floor"] is not None else "—"
            count = f"⚠ {len(flagged)} of {len(judged)}" if flagged else f"0 of {len(judged)}"
            out.append(
                f"| {model} | {head['label']} | {_value_cell(head['value'], head['se'])} | {floor} | {best or '—'} | {count} |"
            )
        sec = [f"## {model}: {TITLES[model]}", ""]
        tl = _train_line(train.get(model))
        if tl:
            sec += [tl, ""]
        sec += _table(rows) if rows else ["No known figures in this metrics file."]
        extra = sorted(k for k in m if k not in {r["row"].key for r in rows} and not k.endswith("_se"))
        extra = [k for k in extra if not k.startswith("baseline_") and not k.endswith("_floor") and k != "true_entropy"]
        if extra:
            shown = ", ".join(f"`{k}` = {fmt(_num(m[k])) if _num(m[k]) is not None else m[k]}" for k in extra)
            sec += ["", f"Also recorded: {shown}."]
        figs = ", ".join(f"`{figures_dir}/{model}/{f}`" for f in FIGURES[model])
        sec += ["", f"Figures: {figs}.", ""]
        sections += sec
    return "\n".join([*out, "", *sections]).rstrip() + "\n"


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` via a temp file in the same folder + ``os.replace`` (no torch import needed:
    this stage stays light and depends on nothing in ``genmodels/``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_metrics(metrics_dir: Path) -> tuple[dict[str, dict[str, Any] | None], dict[str, dict[str, Any] | None]]:
    """``({model: metrics/<model>.json or None}, {model: metrics/train_<model>.json or None})``."""

    def read(p: Path) -> dict[str, Any] | None:
        if not p.is_file():
            return None
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a JSON object of metrics")
        return data

    return (
        {m: read(metrics_dir / f"{m}.json") for m in MODELS},
        {m: read(metrics_dir / f"train_{m}.json") for m in MODELS},
    )


@click.command()
@click.option("--metrics-dir", default="metrics", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", "out_path", default="metrics/SUMMARY.md", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--figures-dir", default="plots/figures", show_default=True, help="where the plot stage writes (for links)"
)
def main(metrics_dir: Path, out_path: Path, figures_dir: str) -> None:
    """Write the comparison page from metrics/*.json."""
    metrics, train = load_metrics(metrics_dir)
    text = render(metrics, train, figures_dir)
    atomic_write_text(text, out_path)
    n = sum(v is not None for v in metrics.values())
    click.echo(f"[summary] wrote {out_path} ({n} of {len(MODELS)} models evaluated)", err=True)


if __name__ == "__main__":
    main()
