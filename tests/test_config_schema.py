"""One schema per configuration: defaults, files and --set overrides validated, shown and exported."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeinspect.cli import main
from edgeinspect.config import (
    config_names,
    default_config,
    default_text,
    load_config,
    preset_names,
    schema_for,
    validate,
)
from edgeinspect.errors import ConfigError
from edgeinspect.schema import Section, family_config, integer, real

KEY_LINE = re.compile(r"^  (\w+):")


@pytest.mark.parametrize("name", config_names())
def test_defaults_match_their_schema_key_for_key_and_every_key_is_commented(name: str) -> None:
    defaults = default_config(name)
    assert validate(name, defaults) == defaults  # the documented defaults are valid as written
    schema = schema_for(name).model_json_schema()
    for section, values in defaults.items():
        ref = schema["properties"][section]["$ref"].rsplit("/", 1)[-1]
        assert set(schema["$defs"][ref]["properties"]) == set(values), section
    assert set(schema["properties"]) == set(defaults)
    for line in default_text(name).splitlines():
        if KEY_LINE.match(line):
            assert "#" in line, f"configs/{name}.yaml: no comment on {line!r}"


def test_every_family_goes_through_the_one_schema() -> None:
    from edgeinspect.train.models import MODELS, SCHEMAS_BY_TASK

    assert SCHEMAS_BY_TASK["anomaly_map"] is family_config
    for family, cls in MODELS.items():
        schema = schema_for(family)
        assert schema is SCHEMAS_BY_TASK[cls.task](cls.config_section)
        assert set(schema.model_fields) == {"model", "preprocess", "train", "decision"}


def test_a_new_family_declares_only_its_model_section() -> None:
    class ToySection(Section):
        depth: integer(1, 8)
        gain: real(0.0, 2.0, lo_open=True)

    schema = family_config(ToySection)
    good = {"model": {"depth": 3, "gain": 1.0}, **{k: v for k, v in default_config("padim").items() if k != "model"}}
    assert schema.model_validate(good).model.depth == 3
    from pydantic import ValidationError

    from edgeinspect.schema import validation_errors

    bad = {**good, "model": {"depth": 0, "gain": 1.0, "colour": "red"}, "train": {**good["train"], "batch_size": 0}}
    with pytest.raises(ValidationError) as info:
        schema.model_validate(bad)
    lines = validation_errors(info.value, schema)
    assert "model.depth: 0 is not in [1, 8]" in lines
    assert "model: unknown key 'colour'; known keys: ['depth', 'gain']" in lines
    assert "train.batch_size: 0 is not in [1, 1024]" in lines


def test_every_error_at_once_with_key_value_allowed_and_origin(tmp_path) -> None:
    user = tmp_path / "line3.yaml"
    user.write_text("model:\n  coreset_ratio: 0\ndecision:\n  threshold_margin: .inf\n")
    with pytest.raises(ConfigError) as info:
        load_config("patchcore", user, ["train.batch_size=0", "preprocess.interpolation=bicubic"])
    message = str(info.value)
    assert "\n" not in message
    for part in (f"model.coreset_ratio: 0 is not in (0, 1] ({user})",
                 f"decision.threshold_margin: inf is not a finite number in (0, 100] ({user})",
                 "train.batch_size: 0 is not in [1, 1024] (--set train.batch_size=0)",
                 "preprocess.interpolation: 'bicubic' is not one of area, linear, cubic, nearest"):
        assert part in message


def test_config_show_prints_the_effective_values_with_the_comments(tmp_path) -> None:
    result = CliRunner().invoke(main, ["config", "show", "patchcore", "--set", "model.coreset_ratio=0.25",
                                       "--set", "preprocess.input_size=[256, 256]"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == load_config(
        "patchcore", overrides=["model.coreset_ratio=0.25", "preprocess.input_size=[256, 256]"])
    line = next(ln for ln in result.output.splitlines() if ln.strip().startswith("coreset_ratio:"))
    assert line.startswith("  coreset_ratio: 0.25") and "# fraction of the training patches" in line
    defaults = default_text("patchcore").splitlines()
    shown = result.output.splitlines()
    assert len(shown) == len(defaults)
    assert [ln for ln in shown if ln.lstrip().startswith("#")] == [ln for ln in defaults if ln.lstrip().startswith("#")]
    export = CliRunner().invoke(main, ["config", "show", "export"])
    assert export.exit_code == 0 and yaml.safe_load(export.output) == load_config("export")


@pytest.mark.parametrize("name", config_names())
def test_config_schema_prints_json_schema_with_ranges(name: str) -> None:
    result = CliRunner().invoke(main, ["config", "schema", name])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert schema == schema_for(name).model_json_schema()
    assert all(schema["$defs"][d].get("additionalProperties") is False for d in schema["$defs"]
               if "properties" in schema["$defs"][d])


def test_coreset_ratio_range_is_in_the_json_schema() -> None:
    schema = schema_for("patchcore").model_json_schema()
    prop = schema["$defs"]["PatchCoreSection"]["properties"]["coreset_ratio"]
    assert prop["exclusiveMinimum"] == 0 and prop["maximum"] == 1


def test_unknown_configuration_name() -> None:
    result = CliRunner().invoke(main, ["config", "show", "no_such_family"])
    assert result.exit_code == 1
    assert "Error: no configuration named 'no_such_family'; choose one of" in result.output


ANOMALY_FAMILIES = ["patchcore", "padim", "autoencoder", "glass", "cam"]


@pytest.mark.parametrize("preset", preset_names())
@pytest.mark.parametrize("family", ANOMALY_FAMILIES)
def test_every_preset_gives_every_anomaly_family_the_parts_aspect_at_about_its_default_pixels(
        preset: str, family: str) -> None:
    """The shape presets keep their principle for each family: the part's aspect (2.4:1, tall or wide) at about
    the pixels of the family's own default input, valid under the family's schema."""
    default_h, default_w = default_config(family)["preprocess"]["input_size"]
    config = load_config(family, preset=preset)
    h, w = config["preprocess"]["input_size"]
    assert {"tall": h / w, "wide": w / h}[preset] == pytest.approx(2.4)
    assert 0.9 <= h * w / (default_h * default_w) <= 1.25
    # only what the preset names changes
    defaults = load_config(family)
    assert {**config, "preprocess": defaults["preprocess"]} == defaults
    assert {k: v for k, v in config["preprocess"].items() if k != "input_size"} == \
        {k: v for k, v in defaults["preprocess"].items() if k != "input_size"}


def test_config_file_and_set_apply_over_a_preset_and_bad_presets_are_named(tmp_path) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text("preprocess:\n  input_size: [320, 128]\n")
    assert load_config("padim", user, preset="tall")["preprocess"]["input_size"] == [320, 128]
    overridden = load_config("padim", user, ["preprocess.input_size=[96, 64]"], "tall")
    assert overridden["preprocess"]["input_size"] == [96, 64]
    with pytest.raises(ConfigError) as info:
        load_config("padim", preset="elongated")
    assert str(info.value) == f"no preset named 'elongated'; choose one of {preset_names()} (configs/presets/)"
    with pytest.raises(ConfigError, match="presets are for the anomaly-map families .*not ssd; use --set"):
        load_config("ssd", preset="tall")
    result = CliRunner().invoke(main, ["config", "show", "glass", "--preset", "wide"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == load_config("glass", preset="wide")
    result = CliRunner().invoke(main, ["config", "show", "glass", "--preset", "no_such"])
    assert result.exit_code == 1 and f"no preset named 'no_such'; choose one of {preset_names()}" in result.output


# ------------------------------------------------------------------------ property-based
_keys = st.sampled_from(["model", "preprocess", "train", "decision", "coreset_ratio", "input_size", "x", "_"])
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4), max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(overrides=st.lists(st.text(max_size=40), max_size=4))
def test_any_override_strings_give_a_config_or_a_clean_error(overrides: list[str]) -> None:
    try:
        config = load_config("patchcore", overrides=overrides)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert validate("patchcore", config) == config


@settings(max_examples=200, deadline=None)
@given(user=_values, name=st.sampled_from(["patchcore", "padim", "export"]))
def test_any_yaml_document_gives_a_config_or_a_clean_error(tmp_path_factory, user: object, name: str) -> None:
    path = tmp_path_factory.mktemp("cfg") / "user.yaml"
    path.write_text(yaml.safe_dump(user))
    try:
        load_config(name, path)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=100, deadline=None)
@given(text=st.binary(max_size=300))
def test_any_bytes_as_config_file_give_a_config_or_a_clean_error(tmp_path_factory, text: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "user.yaml"
    path.write_bytes(text)
    try:
        load_config("padim", path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) or "configuration" in str(exc)
