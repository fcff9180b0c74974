"""The hosted-CI workflow (.github/workflows/ci.yml): schema-valid, and doing what the README says.

The linter is check-jsonschema (pinned in requirements.lock) with its vendored copy of
SchemaStore's GitHub-workflow schema, so the check runs offline. actionlint, the other common
choice, is only published on PyPI as an sdist that downloads a binary from GitHub at install
time, which these machines cannot reach.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")
    assert exe is not None, "check-jsonschema is missing: it is pinned in requirements.lock; reinstall the venv"
    return subprocess.run(
        [exe, "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_workflow_passes_the_linter() -> None:
    result = _lint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validation done" in result.stdout


@pytest.mark.parametrize(
    "mutate, needle",
    [
        # A step with neither `run` nor `uses` is not a step.
        (lambda wf: wf["jobs"]["test-and-smoke"]["steps"].append({"name": "typo", "rnu": "echo"}), "steps"),
        # A job without `runs-on` cannot be scheduled.
        (lambda wf: wf["jobs"]["test-and-smoke"].pop("runs-on"), "runs-on"),
        # Misspelled trigger.
        (lambda wf: wf.__setitem__(True, {"pull_requets": None}), "pull_requets"),
    ],
    ids=["step-without-run-or-uses", "job-without-runs-on", "unknown-event"],
)
def test_linter_rejects_a_broken_workflow(tmp_path: Path, mutate, needle: str) -> None:
    """The lint test above could only fail if the linter really checks: broken copies must fail."""
    wf = yaml.safe_load(WORKFLOW.read_text())  # YAML 1.1 reads the key `on` as True
    mutate(wf)
    broken = tmp_path / "ci.yml"
    broken.write_text(yaml.safe_dump({("on" if k is True else k): v for k, v in wf.items()}, sort_keys=False))
    result = _lint(broken)
    assert result.returncode != 0, f"linter accepted a broken workflow ({needle})"
    assert "Schema validation errors" in result.stdout + result.stderr


def _run_lines(wf: dict) -> list[str]:
    return [step["run"] for job in wf["jobs"].values() for step in job["steps"] if "run" in step]


def test_workflow_runs_the_readme_test_command_and_the_smoke_pipeline() -> None:
    wf = yaml.safe_load(WORKFLOW.read_text())
    readme_block = ROOT.joinpath("README.md").read_text().split("```")[1]
    readme_cmds = [line.split("#")[0].strip() for line in readme_block.splitlines()[1:] if line.strip()]
    assert readme_cmds == ["bash scripts/run.sh repro", "bash scripts/run.sh test"]
    runs = _run_lines(wf)
    assert any(r.strip() == readme_cmds[1] for r in runs), runs
    assert any("scripts/smoke.py" in r for r in runs), runs
    # The job summary reports metrics and params against main on pull requests.
    report = [r for r in runs if "dvc metrics diff" in r]
    assert report and "dvc params diff" in report[0] and "GITHUB_STEP_SUMMARY" in report[0]
    # The venv cache is keyed by the lock file, like scripts/run.sh's venv directory.
    keys = [s["with"]["key"] for j in wf["jobs"].values() for s in j["steps"] if "cache" in s.get("uses", "")]
    assert any("hashFiles('requirements.lock')" in k for k in keys), keys
    # .ci/run runs the same test command and nothing weaker.
    assert ROOT.joinpath(".ci/run").read_text().rstrip().splitlines()[-1] == readme_cmds[1]
