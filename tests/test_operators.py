"""Operator and data-scientist credentials: grant, authenticate, revoke, file discipline."""

import json
import stat

import pytest

from fedge.server import operators
from fedge.shared.errors import ConfigError


def test_grant_authenticate_revoke(tmp_path):
    g = operators.grant(tmp_path, "alice", "scientist")
    o = operators.grant(tmp_path, "root", role="operator")
    assert g.token.startswith(operators.TOKEN_PREFIX) and g.token != o.token
    assert operators.authenticate(tmp_path, g.token) == operators.Operator("alice", "scientist")
    assert operators.authenticate(tmp_path, o.token).role == "operator"
    assert operators.authenticate(tmp_path, g.token + "x") is None
    assert operators.authenticate(tmp_path, "") is None
    assert operators.authenticate(tmp_path, "x" * 10_000) is None
    path = tmp_path / operators.OPERATORS_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert g.token not in text and o.token not in text  # only hashes on disk
    assert [u.name for u in operators.list_users(tmp_path)] == ["alice", "root"]
    operators.revoke_user(tmp_path, "alice")
    assert operators.authenticate(tmp_path, g.token) is None
    assert operators.authenticate(tmp_path, o.token) is not None
    with pytest.raises(ConfigError):
        operators.revoke_user(tmp_path, "alice")


def test_regrant_replaces_old_token(tmp_path):
    first = operators.grant(tmp_path, "bob")
    second = operators.grant(tmp_path, "bob", "operator")
    assert operators.authenticate(tmp_path, first.token) is None
    assert operators.authenticate(tmp_path, second.token).role == "operator"
    assert len(operators.list_users(tmp_path)) == 1


def test_bad_names_roles_and_corrupt_file(tmp_path):
    with pytest.raises(ConfigError):
        operators.grant(tmp_path, "../evil")
    with pytest.raises(ConfigError):
        operators.grant(tmp_path, "ok", role="admin")
    g = operators.grant(tmp_path, "carol")
    (tmp_path / operators.OPERATORS_NAME).write_text("{not json")
    assert operators.authenticate(tmp_path, g.token) is None  # fails closed
    (tmp_path / operators.OPERATORS_NAME).write_text(json.dumps({"format": "x"}))
    assert operators.authenticate(tmp_path, g.token) is None
