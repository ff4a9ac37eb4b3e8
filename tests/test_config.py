import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import config, tomlfile

REPO = Path(__file__).resolve().parents[1]


def test_every_setting_has_help_and_is_documented():
    docs = (REPO / "docs" / "settings.md").read_text()
    for setting in config.SETTINGS:
        assert setting.help.strip().endswith("."), setting.name
        assert f"`{setting.name}`" in docs, f"{setting.name} missing from docs/settings.md"
    assert docs == config.markdown_table(), (
        "docs/settings.md is stale: appliance settings --markdown > docs/settings.md")


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


def test_settings_fields_are_the_table_and_defaults_have_their_declared_type():
    fields = dataclasses.fields(config.Settings)
    assert [f.name for f in fields] == [s.name for s in config.SETTINGS]
    for setting in config.SETTINGS:
        assert type(setting.default) is setting.type, setting.name
        assert getattr(config.Settings(), setting.name) == setting.default


def test_replace_checks_names_and_converts_values():
    s = config.load(environ={})
    changed = s.replace(min_slices="12", max_gantry_tilt_deg=20)
    assert changed.min_slices == 12 and changed.max_gantry_tilt_deg == 20.0
    assert isinstance(changed.max_gantry_tilt_deg, float) and s.min_slices == 10
    with pytest.raises(config.SettingsError, match="no_such_setting"):
        s.replace(no_such_setting=1)
    with pytest.raises(config.SettingsError, match="min_slices"):
        s.replace(min_slices=True)


def test_values_is_a_read_only_view_by_name():
    s = config.load(environ={})
    values = s.values
    assert values["min_slices"] == 10 and set(values) == {x.name for x in config.SETTINGS}
    values["min_slices"] = 99
    assert s.values["min_slices"] == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.min_slices = 99  # type: ignore[misc]


def _bad_toml_in_cwd_var(tmp_path, monkeypatch) -> Path:
    cwd = tmp_path / "cwd"
    (cwd / "var").mkdir(parents=True)
    (cwd / "var" / "appliance.toml").write_text('min_slices = "many"\n')
    monkeypatch.chdir(cwd)
    home = tmp_path / "home"
    home.mkdir()
    return home


def test_default_data_directory_is_var_in_the_working_directory(tmp_path, monkeypatch):
    _bad_toml_in_cwd_var(tmp_path, monkeypatch)
    with pytest.raises(config.SettingsError, match="min_slices"):
        config.load(environ={})


def test_a_chosen_data_directory_never_reads_var_in_the_working_directory(tmp_path, monkeypatch):
    home = _bad_toml_in_cwd_var(tmp_path, monkeypatch)
    (home / "appliance.toml").write_text("min_slices = 20\n")
    by_override = config.load(environ={}, home=str(home))
    by_environment = config.load(environ={"APPLIANCE_HOME": str(home)})
    assert by_override.min_slices == by_environment.min_slices == 20
    assert by_override.home_path == by_environment.home_path == home.resolve()
    # an override wins over the environment for the data directory, and so for the file read
    assert config.load(environ={"APPLIANCE_HOME": str(tmp_path / "cwd" / "var")}, home=str(home)).min_slices == 20


def test_the_settings_file_cannot_move_the_data_directory(tmp_path):
    (tmp_path / "appliance.toml").write_text(f'home = "{tmp_path / "elsewhere"}"\n')
    with pytest.raises(config.SettingsError, match="home"):
        config.load(environ={"APPLIANCE_HOME": str(tmp_path)})


def test_a_settings_file_that_is_not_toml_is_a_settings_error(tmp_path):
    (tmp_path / "appliance.toml").write_text("min_slices = \n")
    with pytest.raises(config.SettingsError, match="not valid TOML"):
        config.load(environ={"APPLIANCE_HOME": str(tmp_path)})


def test_saved_overrides_keep_other_entries_and_are_read_back(tmp_path):
    path = tmp_path / "appliance.toml"
    path.write_text('site_name = "Clinic A"\n')
    config.save_overrides({"min_slices": "15", "web_secure_cookies": True}, path)
    assert path.read_text() == 'min_slices = 15\nsite_name = "Clinic A"\nweb_secure_cookies = true\n'
    s = config.load(environ={"APPLIANCE_HOME": str(tmp_path)})
    assert (s.min_slices, s.site_name, s.web_secure_cookies) == (15, "Clinic A", True)
    assert config.saved_values(path)["min_slices"] == 15
    with pytest.raises(config.SettingsError, match="home"):
        config.save_overrides({"home": str(tmp_path)}, path)


def test_mypy_catches_a_misspelt_setting_name(tmp_path):
    good = tmp_path / "settings_good.py"
    good.write_text("from appliance import config\n\ns = config.load(environ={})\n"
                    "slices: int = s.min_slices\ntilt: float = s.max_gantry_tilt_deg\n"
                    "name: str = s.values['site_name']\n")
    bad = tmp_path / "settings_bad.py"
    bad.write_text("from appliance import config\n\ns = config.load(environ={})\nprint(s.min_slice)\n"
                   "name: str = s.min_slices\n")
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", str(good), str(bad)],
                         capture_output=True, text=True, cwd=REPO)
    assert "settings_good.py" not in run.stdout, run.stdout + run.stderr
    assert 'settings_bad.py:4: error: "Settings" has no attribute "min_slice"' in run.stdout, run.stdout + run.stderr
    assert "settings_bad.py:5: error: Incompatible types in assignment" in run.stdout, run.stdout + run.stderr


def test_toml_writer_round_trips_what_settings_and_manifests_hold(tmp_path):
    data = {"name": 'quoted "x"', "flag": False, "count": 3, "ratio": 0.25, "sizes": [1, 2],
            "files": {"model.onnx": "ab" * 32, "odd name.txt": "cd"}, "runs": [{"a": 1}, {"a": 2, "b": {"c": "d"}}]}
    text = tomlfile.dumps(data)
    assert tomlfile.loads(text) == data
    assert text.startswith('name = "quoted \\"x\\""\nflag = false\ncount = 3\nratio = 0.25\n'
                           'sizes = [1, 2]\n\n[files]\n')
    tomlfile.dump_durably(data, tmp_path / "sub" / "x.toml")
    assert tomlfile.load(tmp_path / "sub" / "x.toml") == data
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.toml"]
    with pytest.raises(TypeError):
        tomlfile.dumps({"when": None})
