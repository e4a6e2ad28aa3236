"""Where the peer RPC's secret comes from, and when a node must refuse to start."""

from __future__ import annotations

import os

import pytest

from transport.secret import DEV_SECRET, SecretError, load_secret


def test_a_secret_file_is_read_without_its_trailing_newline(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"0123456789abcdef-fleet\n")
    os.chmod(path, 0o600)
    assert load_secret(str(path), "10.0.0.5", env={}) == b"0123456789abcdef-fleet"


def test_the_environment_variable_serves_too():
    env = {"KVBM_SECRET": "fedcba9876543210-fleet"}
    assert load_secret("", "0.0.0.0", env=env) == b"fedcba9876543210-fleet"


def test_both_sources_at_once_is_an_error(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 32)
    with pytest.raises(SecretError, match="keep one"):
        load_secret(str(path), "0.0.0.0", env={"KVBM_SECRET": "y" * 32})


def test_short_or_missing_secrets_are_refused(tmp_path):
    with pytest.raises(SecretError, match="at least 16"):
        load_secret("", "0.0.0.0", env={"KVBM_SECRET": "short"})
    with pytest.raises(SecretError, match="cannot read"):
        load_secret(str(tmp_path / "absent"), "0.0.0.0", env={})


def test_a_networked_node_without_a_secret_refuses_to_start():
    for host in ("0.0.0.0", "10.1.2.3", "node-7.cluster.local", "::"):
        with pytest.raises(SecretError, match="needs a shared secret"):
            load_secret("", host, env={})


def test_loopback_and_declared_dev_setups_run_on_the_dev_secret(caplog):
    for host in ("127.0.0.2", "::1", "localhost"):
        assert load_secret("", host, env={}) == DEV_SECRET
    assert load_secret("", "0.0.0.0", dev=True, env={}) == DEV_SECRET
    assert "dev secret" in caplog.text
