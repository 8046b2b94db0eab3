"""Property-based fuzzing of the registry's device API from its own OpenAPI (schemathesis).

Every operation is called with generated paths, headers and bodies, with a valid
device token and without one; no answer may be a 5xx. Examples are bounded and
derandomized so the suite stays fast and repeatable. (The schemathesis pytest
plugin is not used: its fixture loader does not work with this pytest.)
"""

from pathlib import Path

import schemathesis
from deploy_support import make_bundle, make_keys
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from fedge.server.registry.api import create_app
from fedge.server.registry.devices import DeviceStore
from fedge.server.registry.publish import publish_bundle
from fedge.server.registry.store import Registry


def test_no_operation_answers_a_server_error(tmp_path: Path) -> None:
    private, public = make_keys(tmp_path / "keys")
    data = tmp_path / "registry"
    publish_bundle(Registry(data), make_bundle(tmp_path / "b1", private, "v1"), public, "stable")
    token = DeviceStore(data).add("fuzzer")
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(data))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/channels/{channel}/current",
        "/v1/bundles/{version}/bundle.tar",
        "/v1/devices/me/status",
    }
    calls: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            for headers in ({"Authorization": f"Bearer {token}"}, {}):
                response = case.call(headers=headers)
                calls.append(response.status_code)
                assert response.status_code < 500, (case.path, case.body, response.text)
                case.validate_response(response, checks=[not_a_server_error])

        check()
    assert len(calls) >= 2 * len(operations) and {200, 401, 422} <= set(calls)
