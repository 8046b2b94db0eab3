"""The web console over HTTP: operators only, CSRF-checked actions, 4xx for bad input."""

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fedge.server.console.sessions import COOKIE
from fedge.server.operators import grant, revoke_user
from fedge.server.registry.api import create_app
from fedge.server.registry.store import Registry
from tests.console_support import Coordinator, make_coordinator

PAGES = ["/console/runs", "/console/sites", "/console/registry", "/console/fleet"]
EVIL = "<script>alert(1)</script>"


@pytest.fixture
def coordinator(tmp_path: Path) -> Coordinator:
    return make_coordinator(tmp_path, ["site-a", EVIL])


@pytest.fixture
def client(coordinator: Coordinator) -> TestClient:
    return TestClient(create_app(coordinator.registry_dir), follow_redirects=False)


def _login(client: TestClient, token: str) -> str:
    """Log in; returns the CSRF token of the new session."""
    response = client.post("/console/login", data={"token": token})
    assert response.status_code == 303, response.text
    return _csrf(client)


def _csrf(client: TestClient) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get("/console/registry").text)
    assert found is not None
    return found.group(1)


def test_pages_need_a_log_in(client: TestClient) -> None:
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"] == "/console/login"
    assert client.get("/console/fleet/live").status_code == 401


def test_device_token_never_opens_the_console(client: TestClient, coordinator: Coordinator) -> None:
    # As a bearer header (how devices call the API) ...
    bearer = {"Authorization": f"Bearer {coordinator.device_token}"}
    assert client.get("/v1/devices/me", headers=bearer).status_code == 200
    assert client.get("/console/registry", headers=bearer).status_code == 303
    # ... and as a log-in token.
    refused = client.post("/console/login", data={"token": coordinator.device_token})
    assert refused.status_code == 401 and COOKIE not in refused.cookies
    assert "not a valid operator token" in refused.text


def test_scientists_are_refused(client: TestClient, coordinator: Coordinator) -> None:
    refused = client.post("/console/login", data={"token": coordinator.scientist_token})
    assert refused.status_code == 403 and COOKIE not in refused.cookies


def test_operator_session_cookie_and_pages(client: TestClient, coordinator: Coordinator) -> None:
    response = client.post("/console/login", data={"token": coordinator.operator_token})
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert coordinator.operator_token not in cookie and "Secure" not in cookie
    over_tls = TestClient(create_app(coordinator.registry_dir), base_url="https://testserver")
    tls_login = over_tls.post(
        "/console/login", data={"token": coordinator.operator_token}, follow_redirects=False
    )
    assert "Secure" in tls_login.headers["set-cookie"]
    for path in PAGES:
        page = client.get(path)
        assert page.status_code == 200, path
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "<script>alert" not in page.text
    runs = client.get("/console/runs").text
    assert "exp1" in runs and "exp2" in runs and "running" in runs and "1 / 4" in runs
    assert 'id="device-cam-1"' in client.get("/console/fleet").text
    sites = client.get("/console/sites").text
    # Enrolled sites with the epsilon each reported in the newest run it trained in (exp2).
    assert re.search(
        r"<td>site-a</td>.*?<td class=\"n\">1 <span class=\"muted\">\(exp2\)", sites, re.DOTALL
    )
    assert "no SuperLink was started" in sites


def test_run_page_plots_and_live_fragment(client: TestClient, coordinator: Coordinator) -> None:
    _login(client, coordinator.operator_token)
    ids = dict(
        (name, rid)
        for rid, name in re.findall(
            r'/console/runs/([0-9a-f]{12})">([^<]+)<', client.get("/console/runs").text
        )
    )
    page = client.get(f"/console/runs/{ids['exp1']}")
    assert page.status_code == 200 and page.text.count('src="data:image/svg+xml') == 5
    assert "&lt;script&gt;" in page.text and EVIL not in page.text
    live = client.get(f"/console/runs/{ids['exp2']}/live")
    assert live.status_code == 200 and live.headers["x-fedge-final"] == "0"
    assert client.get(f"/console/runs/{ids['exp1']}/live").headers["x-fedge-final"] == "1"
    assert client.get("/console/runs/0123456789ab").status_code == 404
    assert client.get("/console/runs/..%2F..%2Fetc").status_code == 404


def test_promote_and_rollback_need_the_csrf_token(
    client: TestClient, coordinator: Coordinator
) -> None:
    csrf = _login(client, coordinator.operator_token)
    registry = Registry(coordinator.registry_dir)
    forged = client.post("/console/registry/promote", data={"version": "v2", "channel": "stable"})
    assert forged.status_code == 403 and registry.current("stable") == "v1"
    wrong = {"version": "v2", "channel": "stable", "csrf": csrf[:-1] + "x"}
    assert client.post("/console/registry/promote", data=wrong).status_code == 403
    not_ascii = {"version": "v2", "channel": "stable", "csrf": "\u00e9" * len(csrf)}
    assert client.post("/console/registry/promote", data=not_ascii).status_code == 403
    ok = client.post(
        "/console/registry/promote", data={"version": "v2", "channel": "stable", "csrf": csrf}
    )
    assert ok.status_code == 303 and registry.current("stable") == "v2"
    assert "channel stable now serves v2" in client.get("/console/registry").text
    fleet = client.get("/console/fleet").text
    assert "update pending" in fleet
    back = client.post("/console/registry/rollback", data={"channel": "stable", "csrf": csrf})
    assert back.status_code == 303 and registry.current("stable") == "v1"


def test_bad_input_is_a_4xx(client: TestClient, coordinator: Coordinator) -> None:
    csrf = _login(client, coordinator.operator_token)
    cases = [
        ({"version": "nope", "channel": "stable", "csrf": csrf}, 400),
        ({"version": "v2", "channel": "Bad Channel!", "csrf": csrf}, 400),
        ({"version": "v2", "channel": "x" * 5000, "csrf": csrf}, 400),
    ]
    for form, status in cases:
        assert client.post("/console/registry/promote", data=form).status_code == status
    big = client.post("/console/registry/promote", data={"version": "v" * 10000, "csrf": csrf})
    assert big.status_code == 413
    fields = "&".join(f"f{i}=1" for i in range(50)) + f"&csrf={csrf}"
    many = client.post(
        "/console/registry/promote",
        content=fields,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert many.status_code == 400
    binary = client.post(
        "/console/login",
        content=b"token=\xff\xfe",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert binary.status_code == 400
    as_json = client.post("/console/registry/rollback", json={"channel": "stable"})
    assert as_json.status_code == 415
    empty = client.post("/console/registry/rollback", data={"channel": "empty", "csrf": csrf})
    assert empty.status_code == 400 and "no version to roll back" in empty.text
    assert client.post("/console/login", data={"token": "x" * 4000}).status_code == 401


def test_revoking_the_operator_ends_the_session(
    client: TestClient, coordinator: Coordinator
) -> None:
    _login(client, coordinator.operator_token)
    assert client.get("/console/runs").status_code == 200
    revoke_user(coordinator.server_dir, "alice")
    assert client.get("/console/runs").status_code == 303


def test_a_new_token_for_the_operator_ends_sessions_of_the_old_one(
    client: TestClient, coordinator: Coordinator
) -> None:
    """Re-granting after a leaked token must lock out whoever logged in with the leaked one."""
    _login(client, coordinator.operator_token)
    assert client.get("/console/runs").status_code == 200
    fresh = grant(coordinator.server_dir, "alice", role="operator").token
    assert client.get("/console/runs").status_code == 303
    _login(client, fresh)
    assert client.get("/console/runs").status_code == 200


def test_logout_needs_csrf_and_ends_the_session(
    client: TestClient, coordinator: Coordinator
) -> None:
    csrf = _login(client, coordinator.operator_token)
    sid = client.cookies.get(COOKIE)
    client.post("/console/logout", data={})  # no token: the session survives
    client.cookies.set(COOKIE, sid, path="/console")
    assert client.get("/console/runs").status_code == 200
    client.post("/console/logout", data={"csrf": csrf})
    client.cookies.set(COOKIE, sid, path="/console")
    assert client.get("/console/runs").status_code == 303
