"""Settings saved on the admin pages apply at once in every process: the web UI at its next request, the
worker at its next loop, the DICOM receiver by restarting itself; an APPLIANCE_* variable still wins, and
the settings page says so. Real peers: pynetdicom Verification SCPs, a real SQLite file."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from appliance import config
from appliance.export import keys
from appliance.ingest import dicom_server
from appliance.ingest.importer import import_paths
from appliance.jobs.worker import Worker
from appliance.web import create_app
from tests.web_helpers import csrf, login, make_accounts, web_settings

VERIFICATION = "1.2.840.10008.1.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo(port: int, called: str = "ANY-SCP") -> bool:
    """A real C-ECHO to 127.0.0.1:``port``; whether it succeeded."""
    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


@pytest.fixture
def storage_scp():
    """A pynetdicom Storage SCP (every storage SOP class) that keeps what it receives: (port, received)."""
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    received: list[str] = []

    def handle_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="STORE-SCP")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(VERIFICATION)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    yield port, received
    server.shutdown()


@pytest.fixture
def admin_client(tmp_path):
    settings = web_settings(tmp_path)
    app = create_app(settings, environ={})
    make_accounts(settings.home_path)
    client = app.test_client()
    login(client, "admin")
    return settings, client


def test_a_saved_pacs_destination_gets_its_echo_button_without_restart(admin_client, storage_scp):
    _, client = admin_client
    port, _ = storage_scp
    assert "Test (C-ECHO)" not in client.get("/admin/dicom").get_data(as_text=True)
    form = {"dicom_ae_title": "APPLIANCE", "dicom_port": "11112", "dicom_allowed_callers": "*@127.0.0.1",
            "pacs_destinations": f"STORE-SCP@127.0.0.1:{port}", "csrf_token": csrf(client, "/admin/dicom")}
    saved = client.post("/admin/dicom", data=form, follow_redirects=True).get_data(as_text=True)
    assert "in force now" in saved
    assert f"STORE-SCP@127.0.0.1:{port}" in saved and "Test (C-ECHO)" in saved
    answer = client.post("/admin/dicom/echo", data={"destination": f"STORE-SCP@127.0.0.1:{port}",
                                                    "csrf_token": csrf(client, "/admin/dicom")},
                         follow_redirects=True).get_data(as_text=True)
    assert f"C-ECHO to STORE-SCP@127.0.0.1:{port} succeeded." in answer


def test_a_saved_hub_key_is_used_by_the_export_without_restart(admin_client, tmp_path):
    settings, client = admin_client
    keys.init_site_keys(settings.home_path)
    before = client.post("/admin/export", data={"month": "2026-11", "csrf_token": csrf(client, "/admin/")},
                         follow_redirects=True).get_data(as_text=True)
    assert "NO_HUB_KEY" in before
    hub_key = keys.encode_public(keys.init_hub_keys(tmp_path / "hub"))
    client.post("/admin/settings", data={"name": "hub_public_key", "value": hub_key,
                                         "csrf_token": csrf(client, "/admin/settings")})
    after = client.post("/admin/export", data={"month": "2026-11", "csrf_token": csrf(client, "/admin/")},
                        follow_redirects=True).get_data(as_text=True)
    assert "NO_HUB_KEY" not in after and "written and verified" in after
    assert list((settings.home_path / "exports").glob("*-2026-11-r*.ctx"))


def test_an_environment_variable_wins_over_the_saved_value_and_the_page_says_so(tmp_path):
    environ = {"APPLIANCE_SITE_NAME": "Site from the environment"}
    settings = config.load(environ=environ, home=str(tmp_path / "home"))
    app = create_app(settings, environ=environ)
    make_accounts(settings.home_path)
    client = app.test_client()
    login(client, "admin")
    page = client.post("/admin/settings", data={"name": "site_name", "value": "Saved site",
                                                "csrf_token": csrf(client, "/admin/settings")},
                       follow_redirects=True).get_data(as_text=True)
    assert "APPLIANCE_SITE_NAME is set in the environment: the saved value is not used" in page
    assert "set by APPLIANCE_SITE_NAME in the environment; the saved value is not used" in page
    assert "Site from the environment" in page and "Saved site" in page  # in force, and the saved value
    assert config.saved_values(settings.home_path / "appliance.toml")["site_name"] == "Saved site"
    # a setting a running process cannot take: said so, with the process that must restart
    page = client.post("/admin/settings", data={"name": "web_port", "value": "8181",
                                                "csrf_token": csrf(client, "/admin/settings")},
                       follow_redirects=True).get_data(as_text=True)
    assert "takes effect when the web UI restarts" in page
    assert re.search(r"saved; takes effect when the web UI restarts", page)
    # one that applies at once: in force from the next request
    page = client.post("/admin/settings", data={"name": "disk_low_watermark_mb", "value": "777",
                                                "csrf_token": csrf(client, "/admin/settings")},
                       follow_redirects=True).get_data(as_text=True)
    assert "; in force now." in page
    assert "new images are refused below 0.8 GiB free" in client.get("/admin/").get_data(as_text=True)


def test_the_worker_takes_up_changed_pacs_destinations_without_restart(tmp_path, synthetic_chest, storage_scp):
    port, received = storage_scp
    settings = config.load(environ={}, home=str(tmp_path / "home"), quiet_period_seconds=0.0, demonstration=True)
    worker = Worker(settings, config.LiveSettings.following(settings, {}))
    try:
        assert worker.runner.destinations == ()
        config.save_overrides({"pacs_destinations": f"STORE-SCP@127.0.0.1:{port}"},
                              settings.home_path / "appliance.toml")
        import_paths(worker.store, [synthetic_chest], settings)
        assert worker.run_once()  # analysed and published to the destination saved since the worker started
        rows = worker.store.db.execute("SELECT destination, sop_instance_uid FROM outbox").fetchall()
        assert rows and {d for d, _ in rows} == {f"STORE-SCP@127.0.0.1:{port}"}
        worker.forward()
        assert sorted(received) == sorted(uid for _, uid in rows)
    finally:
        worker.runner.close()


def test_the_receiver_restarts_itself_on_a_changed_port(tmp_path):
    first, second = free_port(), free_port()
    (tmp_path / "home").mkdir()
    config.save_overrides({"dicom_port": first}, tmp_path / "home" / "appliance.toml")
    settings = config.load(environ={}, home=str(tmp_path / "home"), dicom_bind_address="127.0.0.1")
    live = config.LiveSettings.following(settings, {})
    stop = threading.Event()
    started: list[tuple[int, object]] = []
    thread = threading.Thread(target=dicom_server.serve_receiver, args=(live, stop),
                              kwargs={"poll_seconds": 0.2, "started": lambda s, p: started.append((s.dicom_port, p))})
    thread.start()
    try:
        assert _wait(lambda: echo(first, "APPLIANCE"))
        config.save_overrides({"dicom_port": second, "dicom_ae_title": "RENAMED"},
                              settings.home_path / "appliance.toml")
        assert _wait(lambda: echo(second, "RENAMED"))
        assert not echo(first, "APPLIANCE") and not echo(second, "APPLIANCE")  # old port closed, new AE title
        assert started == [(first, None), (second, None)]
    finally:
        stop.set()
        thread.join(timeout=30)


def _wait(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False
