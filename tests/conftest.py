"""Shared fixtures: a throw-away data directory per test and the real data in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from appliance.store import datadir
from appliance.store.instances import InstanceStore, open_store
from appliance.synth.writer import SynthOptions, write_series

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CT = DATA / "ct"


def need_data(*parts: str) -> Path:
    """The path of real test data, or skip the test with a clear message when it is absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (it lives in ../shared/data beside the repository)")
    return path


@pytest.fixture
def settings(tmp_path: Path) -> config.Settings:
    """Settings of a fresh data directory in demonstration mode, as `make run` starts the appliance, so every
    pack's output is exercised; tests/test_model_switches.py covers a real deployment's defaults."""
    return config.load(environ={}, home=str(tmp_path / "home"), demonstration=True)


@pytest.fixture
def store(settings: config.Settings) -> InstanceStore:
    return open_store(settings)


@pytest.fixture(autouse=True)
def _release_writer_locks():
    """Each test's data directory gives its writer lock back when the test ends."""
    yield
    for home in list(datadir._held):
        datadir.release_writer_lock(datadir.DataDirectory(home))


@pytest.fixture
def app_settings(tmp_path: Path) -> config.Settings:
    """A data directory with one account per role (tests/web_helpers.py), for the web tests."""
    from tests.web_helpers import make_accounts, web_settings

    settings = web_settings(tmp_path)
    make_accounts(settings.home_path)
    return settings


@pytest.fixture(scope="session")
def synthetic_chest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic chest-abdomen series (40 slices, 128 x 128), made once per run."""
    out = tmp_path_factory.mktemp("synth") / "chest"
    write_series(out, SynthOptions(slices=40, size=128, seed=3))
    return out


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright (skipped where it is not installed)."""
    from tests.web_helpers import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()
