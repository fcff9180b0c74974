"""params.yaml -> typed config: unknown keys, wrong types and out-of-range values fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from genmodels.configs import ConfigError, Params, load_params, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_project_params_validate_and_round_trip() -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(raw)
    assert isinstance(params, Params)
    # to_dict -> load_params is the identity: every key in the file maps to a field.
    assert load_params(to_dict(params)) == params
    for section, body in raw.items():
        assert set(body) <= set(to_dict(getattr(params, section)))


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"ddpm": {"lr": -1e-3}}, "ddpm.lr", "> 0"),
        ({"realnvp2d": {"epoch": 3}}, "realnvp2d.epoch", "Did you mean 'epochs'"),
        ({"data": {"mnist": {"class_index": 10}}}, "data.mnist.class_index", "0 to 9"),
        ({"data": {"points2d": {"name": "swiss_roll"}}}, "data.points2d.name", "'two_moons'"),
        ({"data": {"mnist": {"split": "validation"}}}, "data.mnist.split", "'train', 'test'"),
        ({"common": {"device": "tpu"}}, "common.device", "'auto', 'cpu', 'cuda'"),
        ({"ddpm": {"sampling_precision": "float16"}}, "ddpm.sampling_precision", "'auto', 'float32', 'bfloat16'"),
        ({"ebm": {"epochs": "ten"}}, "ebm.epochs", "an integer"),
        ({"ebm": {"epochs": True}}, "ebm.epochs", "an integer"),
        ({"flow": {"lr": "fast"}}, "flow.lr", "a number"),
        ({"ddpm": {"beta2_start": 0.1, "beta2_end": 0.01}}, "ddpm.beta2_end", "beta2_start"),
        ({"evaluate": {"floor_draws": 1}}, "evaluate.floor_draws", "an integer >= 2"),
        ({"data": {"points2d": {"name": "csv"}}}, "data.points2d.csv_path", "path to a CSV"),
        ({"nonsense": {}}, "nonsense", "is not a known key; the top-level sections are classifier, common"),
        ({"ebm": {"alpah": 1.0}}, "ebm.alpah", "is not a known key; the keys under 'ebm' are activation, alpha"),
        ({"data": {"mnist": {"urls": ["ftp://x"]}}}, "data.mnist.urls[0]", "http(s)"),
    ],
)
def test_bad_params_name_key_value_and_allowed(raw: dict, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_params(raw)
    assert info.value.key == key
    msg = str(info.value)
    assert f"'{key}'" in msg and fragment in msg


def test_numeric_strings_from_yaml_1_1_are_numbers() -> None:
    # PyYAML reads "1e-3" (no dot) as a string; the config accepts it as a float.
    raw = yaml.safe_load("ddpm:\n  lr: 1e-3\n")
    assert isinstance(raw["ddpm"]["lr"], str)
    assert load_params(raw).ddpm.lr == pytest.approx(1e-3)
