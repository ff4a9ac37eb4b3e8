"""Every route x role x method with hostile values answers below 500; every POST without a CSRF token is 400
and changes nothing. The figures are printed; `python bench/web_matrix.py` prints the whole table."""

from __future__ import annotations

import io

import pytest

from appliance.jobs.intake import analyze_paths
from appliance.web import create_app
from tests.web_helpers import make_accounts, web_settings
from tests.web_matrix import METHODS, ROLES, run_matrix


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, synthetic_chest):
    """The matrix over a data directory with one analysed study and one quarantined file."""
    settings = web_settings(tmp_path_factory.mktemp("matrix"))
    analyze_paths([synthetic_chest], settings)
    make_accounts(settings.home_path)
    app = create_app(settings, environ={})
    client = app.test_client()
    from tests.web_helpers import csrf, login

    login(client, "tech")
    client.post("/import/upload", data={"files": [(io.BytesIO(b"not dicom"), "notes.txt")],
                                        "csrf_token": csrf(client, "/import")}, content_type="multipart/form-data")
    return run_matrix(app, settings.home_path)


def test_every_route_role_and_method_with_hostile_values_is_below_500(matrix, capsys):
    with capsys.disabled():
        print("\n" + matrix.summary())
    assert matrix.routes == 37 and {o.role for o in matrix.outcomes} == set(ROLES)
    assert {o.method for o in matrix.outcomes} == set(METHODS)
    assert not matrix.server_errors, [f"{o.method} {o.url[:120]} as {o.role}: {o.status}"
                                      for o in matrix.server_errors[:20]]


def test_every_post_without_a_csrf_token_is_400_and_changes_nothing(matrix):
    assert matrix.csrf_refused and not matrix.csrf_missed, [
        f"POST {o.url} as {o.role}: {o.status}" for o in matrix.csrf_missed]
    assert not matrix.state_changed
