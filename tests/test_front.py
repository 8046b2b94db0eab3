"""The front's control-route rules, in process: who may act on which run, and off-loop reads.

The front runs in process (Starlette's TestClient); the SuperLink behind it is a small
ASGI app that answers Flower's protobuf control messages the way Flower 1.42's router
does (one message per body), so these tests check the front's own decisions quickly.
The real SuperLink behind a real front is exercised in tests/test_sovereign_control.py.
"""

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flwr.proto.control_pb2 import (
    ListRunsRequest,
    ListRunsResponse,
    StartRunRequest,
    StartRunResponse,
    StopRunRequest,
    StopRunResponse,
    StreamLogsRequest,
)
from flwr.proto.fab_pb2 import Fab
from starlette.testclient import TestClient

from fedge.server import front, operators
from fedge.server.run_owners import OWNERS_NAME, RunOwners

PROTO = {"content-type": "application/protobuf"}


class _Body(httpx.AsyncByteStream):
    """A response body that is still to be read, as from the network (the front streams it)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> Any:
        yield self.data


class FakeSuperLink:
    """Answers start-run with fresh run ids, list-runs with every run, stop-run with success."""

    def __init__(self) -> None:
        self.next_id = 100
        self.runs: set[int] = set()
        self.stopped: list[int] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        route = request.url.path.rsplit("/", 1)[-1]
        if route == "start-run":
            self.next_id += 1
            self.runs.add(self.next_id)
            body = StartRunResponse(run_id=self.next_id).SerializeToString()
        elif route == "list-runs":
            answer = ListRunsResponse(now="now")
            for run_id in sorted(self.runs):
                answer.run_dict[run_id].run_id = run_id
            body = answer.SerializeToString()
        elif route == "stop-run":
            asked = StopRunRequest()
            asked.ParseFromString(request.content)
            self.stopped.append(asked.run_id)
            body = StopRunResponse(success=True).SerializeToString()
        else:
            body = b""
        return httpx.Response(200, stream=_Body(body), headers=PROTO)


@pytest.fixture
def fedge_fab(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The fedge app as the front would accept it (its hash check is tested elsewhere)."""
    monkeypatch.setattr(front, "foreign_app", lambda headers, body: None)
    return b"fab"


@pytest.fixture
def setup(tmp_path: Path, fedge_fab: bytes) -> Iterator[tuple[TestClient, FakeSuperLink, Path]]:
    link = FakeSuperLink()
    app = front.create_app(tmp_path, "https://superlink", None, httpx.MockTransport(link))
    with TestClient(app) as client:
        yield client, link, tmp_path


def _post(client: TestClient, route: str, message: Any, token: str) -> httpx.Response:
    return client.post(
        f"/v1/control/{route}",
        content=message.SerializeToString(),
        headers={**PROTO, "Authorization": f"Bearer {token}"},
    )


def _start(client: TestClient, token: str) -> int:
    answer = _post(client, "start-run", StartRunRequest(fab=Fab(content=b"fab")), token)
    assert answer.status_code == 200, answer.text
    parsed = StartRunResponse()
    parsed.ParseFromString(answer.content)
    return int(parsed.run_id)


def _listed(answer: httpx.Response) -> set[int]:
    parsed = ListRunsResponse()
    parsed.ParseFromString(answer.content)
    return set(parsed.run_dict)


def test_a_scientist_acts_only_on_their_own_runs(
    setup: tuple[TestClient, FakeSuperLink, Path],
) -> None:
    client, link, data_dir = setup
    alice = operators.grant(data_dir, "alice", "scientist").token
    bob = operators.grant(data_dir, "bob", "scientist").token
    root = operators.grant(data_dir, "root", "operator").token
    mine, theirs, ops = _start(client, alice), _start(client, bob), _start(client, root)
    # The submitter is on disk, so a restarted front still knows.
    assert RunOwners(data_dir).owner(mine) == "alice"
    assert (data_dir / OWNERS_NAME).stat().st_mode & 0o777 == 0o600

    assert _listed(_post(client, "list-runs", ListRunsRequest(), alice)) == {mine}
    assert _listed(_post(client, "list-runs", ListRunsRequest(), root)) == {mine, theirs, ops}
    for route, message in (
        ("list-runs", ListRunsRequest(run_id=theirs)),
        ("stream-logs", StreamLogsRequest(run_id=theirs)),
        ("stop-run", StopRunRequest(run_id=theirs)),
        ("stop-run", StopRunRequest(run_id=ops)),
        ("stop-run", StopRunRequest(run_id=999)),  # a run the front never started
    ):
        refused = _post(client, route, message, alice)
        assert refused.status_code == 403, (route, refused.text)
        assert "only runs they started" in refused.text
    assert link.stopped == []
    assert _post(client, "stop-run", StopRunRequest(run_id=mine), alice).status_code == 200
    assert _post(client, "stop-run", StopRunRequest(run_id=theirs), root).status_code == 200
    assert link.stopped == [mine, theirs]
    # Run series carry no owner: the operator's only.
    assert _post(client, "list-run-series", ListRunsRequest(), alice).status_code == 403
    # A body that is not the route's message is a 400, never a 5xx.
    garbage = client.post(
        "/v1/control/stop-run",
        content=b"\xff\xff\xff",
        headers={**PROTO, "Authorization": f"Bearer {alice}"},
    )
    assert garbage.status_code == 400


def test_the_credential_file_is_read_off_the_event_loop(
    tmp_path: Path, fedge_fab: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = operators.grant(tmp_path, "root", "operator").token
    where: list[bool] = []
    real = operators.authenticate

    def authenticate(folder: Path, presented: str) -> Any:
        try:
            asyncio.get_running_loop()
            where.append(True)  # on the loop: a slow disk would stall every Fleet request
        except RuntimeError:
            where.append(False)
        return real(folder, presented)

    monkeypatch.setattr(operators, "authenticate", authenticate)
    transport = httpx.MockTransport(FakeSuperLink())
    with TestClient(front.create_app(tmp_path, "https://superlink", None, transport)) as client:
        assert _post(client, "list-runs", ListRunsRequest(), token).status_code == 200
    assert where == [False]
