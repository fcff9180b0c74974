"""Named hyper-parameter sweeps on top of DVC experiments, and the best experiment by a metric.

A sweep is a grid of ``params.yaml`` values defined in ``sweeps.yaml``::

    ddpm_param:
      params:
        ddpm.parameterization: [eps, mean, x0]
      targets: [train_ddpm]        # optional: only these stages (and what they depend on)
      metric: test_nll             # optional: default metric of `best` for this sweep
      mode: min                    # optional: min | max

(``ddpm_param: {ddpm.parameterization: [eps, mean, x0]}`` is accepted as a shorthand.)

Commands (run from the project root)::

    python stages/sweep.py list
    python stages/sweep.py run ddpm_param [-j 2] [--no-wait]
    python stages/sweep.py show [ddpm_param]
    python stages/sweep.py best test_nll [--max] [--sweep ddpm_param]

``run`` queues one ``dvc exp run --queue -n <sweep>-<i> -S key=value ...`` per grid point,
starts ``dvc queue start -j N``, waits for the queue and prints the results table. Everything
else is plain DVC, so ``dvc exp show``, ``dvc metrics diff`` and ``dvc exp push`` see the same
experiments. Each stage logs its MLflow run tagged ``dvc_exp_name=<sweep>-<i>``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DONE = {"Success", "Failed"}


class SweepError(click.ClickException):
    """A user error in ``sweeps.yaml`` or on the command line (exit code 2)."""

    exit_code = 2


# --------------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class Sweep:
    """One named grid.

    Attributes:
        name: the sweep's name (prefix of its experiment names).
        params: ``{"section.key": [values...]}``; the grid is their Cartesian product.
        targets: stages passed to ``dvc exp run`` (empty = the whole pipeline).
        metric, mode: default metric of ``best`` and whether lower (``min``) is better.
    """

    name: str
    params: dict[str, list[Any]]
    targets: list[str] = field(default_factory=list)
    metric: str | None = None
    mode: str = "min"

    def grid(self) -> list[dict[str, Any]]:
        """All combinations in a fixed order (keys as written, values as listed)."""
        keys = list(self.params)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.params[k] for k in keys))]

    def exp_names(self) -> list[str]:
        return [f"{self.name}-{i + 1}" for i in range(len(self.grid()))]


def parse_sweeps(raw: Any, source: str = "sweeps.yaml") -> dict[str, Sweep]:
    """Validate the YAML document of a sweeps file into :class:`Sweep` objects."""
    if not isinstance(raw, Mapping) or not raw:
        raise SweepError(f"{source}: expected a mapping of sweep names to definitions")
    out: dict[str, Sweep] = {}
    for name, body in raw.items():
        where = f"{source}: sweep '{name}'"
        if not isinstance(name, str) or not _NAME_OK.match(name):
            raise SweepError(f"{where}: names use letters, digits, '_', '-', '.' (they become git refs)")
        if not isinstance(body, Mapping):
            raise SweepError(f"{where}: expected a mapping")
        if "params" in body:
            extra = set(body) - {"params", "targets", "metric", "mode"}
            if extra:
                raise SweepError(f"{where}: unknown keys {sorted(extra)} (allowed: params, targets, metric, mode)")
            params, targets = body["params"], body.get("targets") or []
            metric, mode = body.get("metric"), body.get("mode", "min")
        else:
            params, targets, metric, mode = body, [], None, "min"
        if not isinstance(params, Mapping) or not params:
            raise SweepError(f"{where}: 'params' must map 'section.key' to a list of values")
        grid: dict[str, list[Any]] = {}
        for key, values in params.items():
            if not isinstance(key, str) or "." not in key:
                raise SweepError(f"{where}: '{key}' is not a dotted params.yaml key such as ddpm.lr")
            vals = list(values) if isinstance(values, list) else [values]
            if not vals:
                raise SweepError(f"{where}: '{key}' has no values")
            grid[key] = vals
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise SweepError(f"{where}: 'targets' must be a list of stage names")
        if mode not in ("min", "max"):
            raise SweepError(f"{where}: mode must be 'min' or 'max', not {mode!r}")
        out[name] = Sweep(name, grid, list(targets), metric, mode)
    return out


def load_sweeps(path: Path) -> dict[str, Sweep]:
    if not path.is_file():
        raise SweepError(f"{path}: sweeps file not found (run from the project root or pass --sweeps)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML ({err})") from None
    return parse_sweeps(raw, str(path))


def format_value(value: Any) -> str:
    """A value as DVC's ``-S key=value`` parses it (YAML): strings plain, others as YAML/JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if not math.isfinite(value):
            return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        text = repr(value)
        # YAML 1.1 reads "1e-07" as a string: it wants a dot in the mantissa.
        if "e" in text and "." not in text.split("e")[0]:
            mant, exp = text.split("e")
            text = f"{mant}.0e{exp}"
        return text
    return json.dumps(value)


# --------------------------------------------------------------------------- dvc exp show --json


@dataclass
class ExpRow:
    """One experiment (or the workspace / baseline commit) from ``dvc exp show --json``."""

    name: str
    rev: str
    baseline: str
    params: dict[str, Any]
    metrics: dict[str, Any]


def _flat(prefix: str, data: Any, out: dict[str, Any]) -> None:
    if isinstance(data, Mapping):
        for k, v in data.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = data


def _files(section: Any) -> dict[str, Any]:
    """``{"file": {"data": {...}}}`` -> flat ``{"key.sub": value}`` and ``{"file:key.sub": value}``."""
    out: dict[str, Any] = {}
    if not isinstance(section, Mapping):
        return out
    for fname, content in section.items():
        flat: dict[str, Any] = {}
        _flat("", (content or {}).get("data", {}) if isinstance(content, Mapping) else {}, flat)
        for k, v in flat.items():
            out[f"{fname}:{k}"] = v
            out.setdefault(k, v)
    return out


def _row(entry: Mapping[str, Any], baseline: str) -> ExpRow:
    data = entry.get("data") or {}
    rev = str(entry.get("rev") or data.get("rev") or "")
    name = entry.get("name") or data.get("name") or rev[:7]
    return ExpRow(str(name), rev, baseline, _files(data.get("params")), _files(data.get("metrics")))


def parse_exp_show(doc: Any) -> list[ExpRow]:
    """Rows of ``dvc exp show --json`` (DVC 3 layout): workspace, baselines and their experiments."""
    rows: list[ExpRow] = []
    if not isinstance(doc, list):
        return rows
    for base in doc:
        if not isinstance(base, Mapping):
            continue
        baseline = str(base.get("rev", ""))
        rows.append(_row(base, baseline))
        for exp in base.get("experiments") or []:
            for rev in (exp or {}).get("revs") or []:
                rows.append(_row(rev, baseline))
    return rows


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def best_row(rows: Iterable[ExpRow], metric: str, mode: str = "min", prefix: str | None = None) -> ExpRow | None:
    """The experiment with the lowest (``min``) or highest (``max``) finite ``metric``.

    Only real experiments are candidates (not the workspace); with ``prefix`` only those whose
    name starts with ``<prefix>-``. Ties go to the first row.
    """
    cands = [
        r
        for r in rows
        if r.name != "workspace" and r.rev != r.baseline and _is_number(r.metrics.get(metric))
        and (prefix is None or r.name.startswith(f"{prefix}-"))
    ]  # fmt: skip
    if not cands:
        return None
    key = (lambda r: float(r.metrics[metric])) if mode == "min" else (lambda r: -float(r.metrics[metric]))
    return min(cands, key=key)


def table(rows: Sequence[ExpRow], params: Sequence[str], metrics: Sequence[str]) -> str:
    """A plain-text table: name, the given params and metrics (missing values as '-')."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    head = ["experiment", *params, *metrics]
    body = [[r.name, *(fmt(r.params.get(p)) for p in params), *(fmt(r.metrics.get(m)) for m in metrics)] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# --------------------------------------------------------------------------- dvc calls


def _dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SweepError(
            f"`dvc {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def exp_show() -> list[ExpRow]:
    doc = json.loads(_dvc("exp", "show", "--json", "--no-pager").stdout or "[]")
    return parse_exp_show(doc)


def queue_states() -> dict[str, str]:
    """``{experiment name: status}`` from ``dvc queue status`` (Queued, Running, Success, Failed)."""
    out: dict[str, str] = {}
    for line in _dvc("queue", "status").stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[-1] in {"Queued", "Running", "Success", "Failed"}:
            out[parts[1]] = parts[-1]
    return out


def wait_for(names: Sequence[str], timeout_s: float, poll_s: float = 5.0) -> dict[str, str]:
    """Block until every name in ``names`` is Success or Failed in the queue (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        states = queue_states()
        mine = {n: states.get(n, "?") for n in names}
        summary = ", ".join(f"{s}: {sum(v == s for v in mine.values())}" for s in sorted(set(mine.values())))
        if summary != last:
            click.echo(f"[sweep] {summary}", err=True)
            last = summary
        if all(v in _DONE for v in mine.values()):
            return mine
        if time.monotonic() > deadline:
            raise SweepError(f"timed out after {timeout_s:.0f}s waiting for {mine}; see `dvc queue status`")
        time.sleep(poll_s)


# --------------------------------------------------------------------------- CLI


@click.group()
@click.option("--sweeps", "sweeps_path", default="sweeps.yaml", show_default=True, type=click.Path(path_type=Path))
@click.pass_context
def cli(ctx: click.Context, sweeps_path: Path) -> None:
    """Named DVC experiment sweeps (sweeps.yaml) and the best experiment by a metric."""
    ctx.obj = sweeps_path


@cli.command("list")
@click.pass_obj
def list_cmd(sweeps_path: Path) -> None:
    """List the sweeps and their grid sizes."""
    for s in load_sweeps(sweeps_path).values():
        grid = " x ".join(f"{k}={s.params[k]}" for k in s.params)
        click.echo(f"{s.name}: {len(s.grid())} experiments ({grid})" + (f"; targets {s.targets}" if s.targets else ""))


@cli.command()
@click.argument("name")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1), help="parallel queue workers")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait for the queue and print the results")
@click.option("--timeout", "timeout_s", default=24 * 3600.0, show_default=True, help="seconds to wait")
@click.pass_obj
def run(sweeps_path: Path, name: str, jobs: int, wait: bool, timeout_s: float) -> None:
    """Queue sweep NAME as DVC experiments <NAME>-1..n and run them with `dvc queue start -j JOBS`."""
    sweeps = load_sweeps(sweeps_path)
    if name not in sweeps:
        raise SweepError(f"no sweep '{name}' in {sweeps_path} (have: {', '.join(sweeps)})")
    sweep = sweeps[name]
    _check_keys(sweep, Path("params.yaml"))
    names = sweep.exp_names()
    existing = {r.name for r in exp_show()}
    clash = sorted(set(names) & existing)
    if clash:
        raise SweepError(f"experiments {clash} already exist; remove them with `dvc exp remove {' '.join(clash)}`")
    for exp_name, point in zip(names, sweep.grid(), strict=True):
        sets = [a for k, v in point.items() for a in ("-S", f"{k}={format_value(v)}")]
        _dvc("exp", "run", "--queue", "-n", exp_name, *sets, *sweep.targets)
        click.echo(
            f"[sweep] queued {exp_name}: " + " ".join(f"{k}={format_value(v)}" for k, v in point.items()), err=True
        )
    _dvc("queue", "start", "-j", str(jobs))
    click.echo(f"[sweep] started {jobs} worker(s); follow with `dvc queue status` / `dvc queue logs <name>`", err=True)
    if not wait:
        return
    states = wait_for(names, timeout_s)
    _print_results(sweep, exp_show())
    failed = [n for n, s in states.items() if s != "Success"]
    if failed:
        raise SweepError(f"{len(failed)} experiment(s) failed: {failed}; see `dvc queue logs {failed[0]}`")


def _check_keys(sweep: Sweep, params_path: Path) -> None:
    """Every swept key must already exist in params.yaml: ``dvc exp run -S`` only overrides."""
    if not params_path.is_file():
        raise SweepError(f"{params_path}: not found (run from the project root)")
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    for key in sweep.params:
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise SweepError(f"sweep '{sweep.name}': '{key}' is not in {params_path} (add it there first)")
            node = node[part]


def _print_results(sweep: Sweep, rows: list[ExpRow]) -> None:
    def index(r: ExpRow) -> int:
        tail = r.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    mine = sorted((r for r in rows if r.name.startswith(f"{sweep.name}-")), key=index)
    metric_keys = sorted({k for r in mine for k in r.metrics if ":" not in k and _is_number(r.metrics[k])})
    if len(mine) > 1:
        # Only what differs between the experiments (the data summaries upstream do not).
        metric_keys = [k for k in metric_keys if len({repr(r.metrics.get(k)) for r in mine}) > 1]
    click.echo(table(mine, list(sweep.params), metric_keys))
    if sweep.metric:
        b = best_row(mine, sweep.metric, sweep.mode)
        if b is not None:
            click.echo(f"best by {sweep.metric} ({sweep.mode}): {b.name} = {b.metrics[sweep.metric]:.6g}")


@cli.command()
@click.argument("name", required=False)
@click.pass_obj
def show(sweeps_path: Path, name: str | None) -> None:
    """Results of sweep NAME (or of all experiments) from `dvc exp show --json`."""
    rows = exp_show()
    if name is not None:
        sweeps = load_sweeps(sweeps_path)
        if name not in sweeps:
            raise SweepError(f"no sweep '{name}' in {sweeps_path} (have: {', '.join(sweeps)})")
        _print_results(sweeps[name], rows)
        return
    params = sorted({k for r in rows for k in r.params if ":" not in k})
    varying = [p for p in params if len({json.dumps(r.params.get(p), default=str) for r in rows}) > 1]
    metrics = sorted({k for r in rows for k in r.metrics if ":" not in k and _is_number(r.metrics[k])})
    click.echo(table(rows, varying, metrics))


@cli.command()
@click.argument("metric")
@click.option("--max", "maximize", is_flag=True, help="higher is better (default: lower)")
@click.option("--sweep", "prefix", default=None, help="only experiments of this sweep")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def best(metric: str, maximize: bool, prefix: str | None, as_json: bool) -> None:
    """Print the best experiment by METRIC (a key of a metrics file, e.g. test_nll or
    metrics/train_ddpm.json:test_nll)."""
    rows = exp_show()
    b = best_row(rows, metric, "max" if maximize else "min", prefix)
    if b is None:
        known = sorted({k for r in rows for k in r.metrics if ":" not in k})
        raise SweepError(
            f"no experiment has a numeric metric '{metric}'" + (f" (known: {', '.join(known)})" if known else "")
        )
    if as_json:
        click.echo(json.dumps({"name": b.name, "rev": b.rev, "metric": metric, "value": b.metrics[metric]}))
        return
    base = next((r for r in rows if r.rev == b.baseline), None)
    changed = {k: v for k, v in b.params.items() if ":" not in k and (base is None or base.params.get(k) != v)}
    click.echo(
        f"best by {metric} ({'max' if maximize else 'min'}): {b.name} ({b.rev[:7]}) {metric} = {b.metrics[metric]:.6g}"
    )
    for k, v in sorted(changed.items()):
        click.echo(f"  {k} = {v}")
    click.echo(f"apply it with: dvc exp apply {b.name}")


if __name__ == "__main__":
    cli()
