"""Where the node's secret comes from, and when a node must refuse to start."""

from __future__ import annotations

import os
import stat

import pytest

from transport.secret import SecretError, load_secret


def test_a_secret_file_is_read_without_its_trailing_newline(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"0123456789abcdef-fleet\n")
    os.chmod(path, 0o600)
    got = load_secret(str(path), True, str(tmp_path / "own"), env={})
    assert got == b"0123456789abcdef-fleet"


def test_the_environment_variable_serves_too(tmp_path):
    env = {"KVBM_SECRET": "fedcba9876543210-fleet"}
    assert load_secret("", True, str(tmp_path / "own"), env=env) == b"fedcba9876543210-fleet"


def test_both_sources_at_once_is_an_error(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 32)
    with pytest.raises(SecretError, match="keep one"):
        load_secret(str(path), True, "", env={"KVBM_SECRET": "y" * 32})


def test_short_or_missing_secrets_are_refused(tmp_path):
    with pytest.raises(SecretError, match="at least 16"):
        load_secret("", True, "", env={"KVBM_SECRET": "short"})
    with pytest.raises(SecretError, match="cannot read"):
        load_secret(str(tmp_path / "absent"), True, "", env={})


def test_a_secret_file_open_to_others_is_refused(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 32)
    os.chmod(path, 0o640)
    with pytest.raises(SecretError, match="open to its group"):
        load_secret(str(path), True, "", env={})


def test_a_fleet_node_without_the_operators_secret_refuses_to_start(tmp_path):
    with pytest.raises(SecretError, match="needs the operator's secret"):
        load_secret("", True, str(tmp_path / "own"), env={})
    assert not (tmp_path / "own").exists()  # a fleet never runs on a made secret


def test_a_node_on_its_own_makes_a_private_secret_and_keeps_it(tmp_path):
    own = tmp_path / "node.secret"
    first = load_secret("", False, str(own), env={})
    assert len(first) >= 32
    assert stat.S_IMODE(own.stat().st_mode) == 0o600 and own.stat().st_uid == os.getuid()
    assert load_secret("", False, str(own), env={}) == first  # a restart: the same
    other = load_secret("", False, str(tmp_path / "other.secret"), env={})
    assert other != first  # no two nodes share one by default
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.secret", "other.secret"]


def test_a_kept_secret_open_to_others_or_a_link_is_refused(tmp_path):
    own = tmp_path / "node.secret"
    load_secret("", False, str(own), env={})
    os.chmod(own, 0o644)
    with pytest.raises(SecretError, match="not this user's private secret"):
        load_secret("", False, str(own), env={})
    link = tmp_path / "link.secret"
    link.symlink_to(own)
    with pytest.raises(SecretError, match="cannot read"):
        load_secret("", False, str(link), env={})
