"""Sweeps as a user runs them: real ``dvc exp run --queue`` + ``dvc queue start -j 2`` (through
``stages/sweep.py``), then ``dvc exp show --json``, ``dvc metrics diff`` and the MLflow store.

Also unit tests of the sweep helper's parsing (grid, value formatting, ``exp show`` rows, best).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "stages"))

import sweep as sweep_mod  # noqa: E402

# A RealNVP that trains 2 epochs on 512 points in about a second.
TINY_REALNVP = {"n_layers": 2, "n_hidden": 1, "hidden_units": 8, "epochs": 2, "batch_size": 256, "patience": 10}


def add_realnvp2d_stage(proj: Any) -> None:
    """Give a ``dvc_project`` copy the ``train_realnvp2d`` stage (from its dvc.yaml snippet until
    the lead merges it) and tiny ``realnvp2d`` params, then commit."""
    dvc = yaml.safe_load((proj.root / "dvc.yaml").read_text())
    if "train_realnvp2d" not in dvc["stages"]:
        snippet = yaml.safe_load("stages:\n" + (REPO / "docs/snippets/realnvp2d.dvc.yaml").read_text())
        dvc["stages"]["train_realnvp2d"] = snippet["stages"]["train_realnvp2d"]
        (proj.root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    section = yaml.safe_load((REPO / "docs/snippets/realnvp2d.params.yaml").read_text())["realnvp2d"]
    proj.write_params({"realnvp2d": {**section, **TINY_REALNVP}})
    proj.run("git", "rm", "-q", "--cached", "-r", "--ignore-unmatch", "metrics", "plots")
    proj.commit("realnvp2d stage, tiny params")


def mlflow_runs(db: Path, stage: str | None = None) -> list[Any]:
    """All runs of the store at ``db`` (optionally of one ``stage`` tag), via the MLflow client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    flt = f"tags.stage = '{stage}'" if stage else ""
    return list(client.search_runs(exp_ids, filter_string=flt, max_results=1000))


# --------------------------------------------------------------------------- helper unit tests


def test_parse_sweeps_grid_and_shorthand() -> None:
    sweeps = sweep_mod.parse_sweeps(
        {
            "a": {
                "params": {"m.lr": [0.1, 0.2], "m.kind": ["x", "y", "z"]},
                "targets": ["t"],
                "metric": "f:k",
                "mode": "max",
            },
            "b": {"ddpm.parameterization": ["eps", "mean"]},
        }
    )
    grid = sweeps["a"].grid()
    assert len(grid) == 6 and len({json.dumps(g, sort_keys=True) for g in grid}) == 6
    assert {g["m.kind"] for g in grid} == {"x", "y", "z"}
    assert sweeps["a"].exp_names() == [f"a-{i}" for i in range(1, 7)]
    assert sweeps["b"].params == {"ddpm.parameterization": ["eps", "mean"]} and sweeps["b"].targets == []


@pytest.mark.parametrize(
    "raw,msg",
    [
        ({"bad name": {"m.lr": [1]}}, "names use"),
        ({"s": {"lr": [1]}}, "not a dotted"),
        ({"s": {"params": {"m.lr": []}}}, "has no values"),
        ({"s": {"params": {"m.lr": [1]}, "mode": "best"}}, "mode must be"),
        ({"s": {"params": {"m.lr": [1]}, "colour": 1}}, "unknown keys"),
        ([], "expected a mapping"),
    ],
)
def test_parse_sweeps_rejects_bad_definitions(raw: Any, msg: str) -> None:
    with pytest.raises(sweep_mod.SweepError, match=msg):
        sweep_mod.parse_sweeps(raw)


def test_format_value_round_trips_through_yaml() -> None:
    # DVC parses `-S key=value` values as YAML: what we format must parse back to the value.
    for v in [0.001, 3, True, False, None, "eps", [1, 2], 1e-7]:
        assert yaml.safe_load(sweep_mod.format_value(v)) == v


def test_repository_sweeps_file_is_valid() -> None:
    sweeps = sweep_mod.load_sweeps(REPO / "sweeps.yaml")
    assert "ddpm_param" in sweeps
    assert sweeps["ddpm_param"].params["ddpm.parameterization"] == ["eps", "mean", "x0"]


def test_best_row_picks_min_or_max_among_experiments_only() -> None:
    doc = [
        {
            "rev": "workspace", "name": None,
            "data": {"rev": "workspace", "metrics": {"m.json": {"data": {"loss": -99.0}}}, "params": {}},
            "experiments": None,
        },
        {
            "rev": "base1", "name": "main",
            "data": {"rev": "base1", "metrics": {"m.json": {"data": {"loss": 5.0}}}, "params": {}},
            "experiments": [
                {"revs": [{"rev": "e1", "name": "s-1", "data": {"rev": "e1", "metrics": {"m.json": {"data": {"loss": 2.0}}}, "params": {"params.yaml": {"data": {"m": {"lr": 0.1}}}}}}]},
                {"revs": [{"rev": "e2", "name": "s-2", "data": {"rev": "e2", "metrics": {"m.json": {"data": {"loss": 3.0}}}, "params": {"params.yaml": {"data": {"m": {"lr": 0.2}}}}}}]},
                {"revs": [{"rev": "e3", "name": "t-1", "data": {"rev": "e3", "metrics": {"m.json": {"data": {"loss": 1.0}}}, "params": {}}}]},
            ],
        },
    ]  # fmt: skip
    rows = sweep_mod.parse_exp_show(doc)
    assert [r.name for r in rows][1:] == ["main", "s-1", "s-2", "t-1"]
    assert rows[2].params["m.lr"] == 0.1 and rows[2].metrics["m.json:loss"] == 2.0
    assert sweep_mod.best_row(rows, "loss").name == "t-1"  # not the workspace's -99
    assert sweep_mod.best_row(rows, "m.json:loss", prefix="s").name == "s-1"
    assert sweep_mod.best_row(rows, "loss", "max").name == "s-2"
    assert sweep_mod.best_row(rows, "nope") is None


# --------------------------------------------------------------------------- real queue


@pytest.mark.slow
def test_queued_sweep_two_experiments_dvc_and_mlflow(dvc_project: Any) -> None:
    proj = dvc_project
    add_realnvp2d_stage(proj)
    # The baseline: prepare + train once, committed, so queued experiments reuse prepare's cache.
    code_rev = proj.run("git", "rev-parse", "HEAD").stdout.strip()
    proj.dvc("repro", "train_realnvp2d")
    proj.commit("baseline results")
    (proj.root / "sweeps.yaml").write_text(
        yaml.safe_dump({"tiny_lr": {"params": {"realnvp2d.lr": [0.002, 0.02]}, "targets": ["train_realnvp2d"],
                                    "metric": "metrics/train_realnvp2d.json:test_nll"}})
    )  # fmt: skip
    proj.commit("tiny sweep")
    head = proj.run("git", "rev-parse", "HEAD").stdout.strip()

    out = proj.python("stages/sweep.py", "run", "tiny_lr", "-j", "2", timeout=1500)
    print(out.stdout, out.stderr)
    assert "tiny_lr-1" in out.stdout and "tiny_lr-2" in out.stdout and "best by" in out.stdout

    # dvc exp show --json, read here independently of the helper's parser.
    doc = json.loads(proj.dvc("exp", "show", "--json", "--no-pager").stdout)
    exps = {}
    for base in doc:
        for e in base.get("experiments") or []:
            for rev in e["revs"]:
                exps[rev["name"]] = (base["rev"], rev)
    assert set(exps) == {"tiny_lr-1", "tiny_lr-2"}
    lrs, nlls = {}, {}
    for name, (base_rev, rev) in exps.items():
        assert base_rev == head
        lrs[name] = rev["data"]["params"]["params.yaml"]["data"]["realnvp2d"]["lr"]
        nlls[name] = rev["data"]["metrics"]["metrics/train_realnvp2d.json"]["data"]["test_nll"]
    assert lrs == {"tiny_lr-1": 0.002, "tiny_lr-2": 0.02}
    assert nlls["tiny_lr-1"] != nlls["tiny_lr-2"]

    # Upstream prepare came from the cache: never re-run in the experiments.
    for name in exps:
        log = proj.dvc("queue", "logs", name).stdout
        assert "Running stage 'train_realnvp2d'" in log
        assert "Running stage 'prepare@points2d'" not in log, log

    # The helper's `best` agrees with the min computed here.
    want = min(nlls, key=nlls.get)
    best = json.loads(
        proj.python(
            "stages/sweep.py", "best", "metrics/train_realnvp2d.json:test_nll", "--sweep", "tiny_lr", "--json"
        ).stdout
    )
    assert best["name"] == want and best["value"] == nlls[want]

    # dvc metrics diff between the baseline and an experiment works as typed.
    diff = proj.dvc("metrics", "diff", "HEAD", "tiny_lr-1", "--json").stdout
    assert "metrics/train_realnvp2d.json" in json.loads(diff)

    # MLflow: one store at the project root; one run per experiment, tagged to line up with DVC.
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{proj.root / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=["genmodels"], filter_string="tags.dvc_exp_name LIKE 'tiny_lr-%'")
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        cols = ["tags.dvc_exp_name", "tags.stage", "status", "params.realnvp2d.lr", "metrics.test_nll", "tags.device"]
        print(df[cols + ["tags.dvc_exp_baseline_rev"]].to_string(index=False))
    assert sorted(df["tags.dvc_exp_name"]) == ["tiny_lr-1", "tiny_lr-2"]
    runs = mlflow_runs(proj.root / "mlflow.db", "train_realnvp2d")
    by_exp = {r.data.tags.get("dvc_exp_name", ""): r for r in runs}
    assert len(runs) == 3, [r.data.tags for r in runs]  # the baseline repro + 2 experiments
    assert set(by_exp) == {"", "tiny_lr-1", "tiny_lr-2"}
    for name in ("tiny_lr-1", "tiny_lr-2"):
        r = by_exp[name]
        assert r.info.status == "FINISHED"
        assert float(r.data.params["realnvp2d.lr"]) == lrs[name]
        assert r.data.tags["dvc_exp_baseline_rev"] == head
        assert re.fullmatch(r"[0-9a-f]{40}", r.data.tags["git_commit"])
        assert r.data.tags["device"] == "cpu" and r.data.tags["stage"] == "train_realnvp2d"
        assert abs(r.data.metrics["test_nll"] - nlls[name]) < 1e-9
        assert Path(r.info.artifact_uri.removeprefix("file://")).is_relative_to(proj.root)
    assert by_exp[""].data.tags["git_commit"] == code_rev  # the commit the baseline repro ran on
    assert not list((proj.root / ".dvc").rglob("mlflow.db"))  # nothing scattered into temp copies
