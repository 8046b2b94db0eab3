"""Bounded JSON-object reads: every kind of bad file is refused with the caller's error."""

import json
import os
from pathlib import Path

import pytest

from fedge.shared.atomic import read_json_object
from fedge.shared.errors import ConfigError, DataError, SecurityError


def test_a_json_object_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"format": "f/1", "n": [1, 2]}))
    assert read_json_object(path, 1024, DataError, "thing") == {"format": "f/1", "n": [1, 2]}
    assert read_json_object(str(path), 1024, DataError, "thing", fmt="f/1")["n"] == [1, 2]
    # Exactly at the limit is allowed: the bound is "at most limit bytes".
    assert read_json_object(path, path.stat().st_size, DataError, "thing")["format"] == "f/1"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\xff\xfe{}", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (json.dumps({"format": "other/1"}).encode(), "is not a thing .expected format 'f/1'"),
        (b"{}", "is not a thing .expected format 'f/1'"),
        (json.dumps({"x": "y" * 200}).encode(), "is over 100 bytes"),
    ],
)
def test_bad_files_are_refused_with_the_callers_error(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(SecurityError, match=match) as raised:
        read_json_object(path, 100, SecurityError, "thing", fmt="f/1", missing=ConfigError)
    assert type(raised.value) is SecurityError


def test_missing_symlinked_and_non_regular_files_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path in (tmp_path / "absent.json", link, tmp_path, fifo):
        with pytest.raises(ConfigError, match="does not exist or is not a regular file"):
            read_json_object(path, 100, SecurityError, "thing", missing=ConfigError)
        # Without ``missing`` the caller's one error class covers this case too.
        with pytest.raises(DataError, match="does not exist"):
            read_json_object(path, 100, DataError, "thing")


def test_the_callers_hint_replaces_the_default(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{broken")
    with pytest.raises(SecurityError) as raised:
        read_json_object(path, 100, SecurityError, "thing", hint="restore it")
    assert raised.value.hint == "restore it"
    with pytest.raises(SecurityError) as raised:
        read_json_object(path, 100, SecurityError, "thing")
    assert raised.value.hint == SecurityError("x").hint


def test_an_unreadable_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.json"
    path.write_text("{}")

    def failing_open(*_args: object, **_kwargs: object) -> None:
        # What a disk error or a missing permission raises (root ignores chmod 0).
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("fedge.shared.atomic.os.open", failing_open)
    with pytest.raises(SecurityError, match=r"is unreadable \(Permission denied\)"):
        read_json_object(path, 100, SecurityError, "thing")


def test_a_busy_lock_refuses_at_once_and_is_free_again_after_release(
    tmp_path: Path,
) -> None:
    from fedge.edge.device.activation import AgentDir
    from fedge.shared.atomic import exclusive_lock
    from fedge.shared.errors import ConfigError

    with (
        exclusive_lock(tmp_path / "x.lock", "x is busy"),
        pytest.raises(ConfigError, match="x is busy"),
        exclusive_lock(tmp_path / "x.lock", "x is busy"),
    ):
        pass
    with exclusive_lock(tmp_path / "x.lock"):  # released: a waiting lock gets it
        pass
    with (
        AgentDir(tmp_path / "device").exclusive(),
        pytest.raises(ConfigError, match="another fedge agent is already running"),
        AgentDir(tmp_path / "device").exclusive(),
    ):
        pass
