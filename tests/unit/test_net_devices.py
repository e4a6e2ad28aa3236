"""transport.net_devices: UCX kept on the interface of the node's listen
address, unless the user chose its devices."""

from __future__ import annotations

import os

from transport.net_devices import UCX_DEVICES_VAR, interface_of, pin_ucx_devices


def without_devices(monkeypatch) -> None:
    """No devices chosen, restored after the test. `delenv` of a variable that
    is not set records nothing to undo, and the pin below would then leave
    UCX_NET_DEVICES=lo in this process for every later test's children (a
    node in a network namespace could then reach no peer)."""
    monkeypatch.setenv(UCX_DEVICES_VAR, "unset-after-the-test")
    monkeypatch.delenv(UCX_DEVICES_VAR)


def test_an_address_names_its_interface():
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("127.0.0.2") == "lo"  # all of 127/8 is loopback's
    assert interface_of("0.0.0.0") is None  # a wildcard: every interface
    assert interface_of("192.0.2.1") is None  # TEST-NET-1: on no interface here
    assert interface_of("node-a.example") is None  # not an address


def test_ucx_is_pinned_to_the_listen_interface(monkeypatch):
    without_devices(monkeypatch)
    assert pin_ucx_devices("127.0.0.1", None) == "lo"
    assert os.environ[UCX_DEVICES_VAR] == "lo"


def test_the_users_choice_of_devices_stands(monkeypatch):
    monkeypatch.setenv(UCX_DEVICES_VAR, "eth1")
    assert pin_ucx_devices("127.0.0.1", "eth1") == "eth1"
    assert os.environ[UCX_DEVICES_VAR] == "eth1"


def test_a_wildcard_leaves_ucx_its_own_choice(monkeypatch):
    without_devices(monkeypatch)
    assert pin_ucx_devices("0.0.0.0", None) is None
    assert UCX_DEVICES_VAR not in os.environ
