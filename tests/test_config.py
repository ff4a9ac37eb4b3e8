from pathlib import Path

import pytest

from appliance import config

REPO = Path(__file__).resolve().parents[1]


def test_every_setting_has_help_and_is_documented():
    docs = (REPO / "docs" / "settings.md").read_text()
    for setting in config.SETTINGS:
        assert setting.help.strip().endswith("."), setting.name
        assert f"`{setting.name}`" in docs, f"{setting.name} missing from docs/settings.md"
    assert docs == config.markdown_table(), "docs/settings.md is stale: appliance settings --markdown > docs/settings.md"


def test_settings_table_has_unique_names():
    names = [s.name for s in config.SETTINGS]
    assert len(names) == len(set(names))


def test_environment_overrides_toml_which_overrides_default(tmp_path):
    (tmp_path / "appliance.toml").write_text('min_slices = 20\nsite_name = "Clinic A"\n')
    env = {"APPLIANCE_HOME": str(tmp_path), "APPLIANCE_MIN_SLICES": "30"}
    s = config.load(environ=env)
    assert s.min_slices == 30
    assert s.site_name == "Clinic A"
    assert s.max_gantry_tilt_deg == 30.0
    assert s.home_path == tmp_path.resolve()


def test_boolean_and_float_values_are_parsed():
    s = config.load(environ={"APPLIANCE_GANTRY_TILT_CORRECTION": "no", "APPLIANCE_MAX_GANTRY_TILT_DEG": "12.5"})
    assert s.gantry_tilt_correction is False
    assert s.max_gantry_tilt_deg == 12.5


def test_wrong_type_and_unknown_names_are_refused(tmp_path):
    with pytest.raises(config.SettingsError, match="min_slices"):
        config.load(environ={"APPLIANCE_MIN_SLICES": "many"})
    (tmp_path / "appliance.toml").write_text("no_such_setting = 1\n")
    with pytest.raises(config.SettingsError, match="no_such_setting"):
        config.load(environ={"APPLIANCE_HOME": str(tmp_path)})
