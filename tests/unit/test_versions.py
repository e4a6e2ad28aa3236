"""The compatibility rule of kvbm/versions.py, the node record's protocol,
the version inside the peer hello's MAC, and a disk file of another layout
version. (Hellos between real nodes and engines, and the previous release
built from git: tests/integration/test_wire_versions.py and
test_version_skew.py.)"""

from __future__ import annotations

import logging

import msgpack
import pytest

from discovery.records import NodeRecord
from kvbm.disk_pool import _SUPER, DiskPool, arena_path
from kvbm.versions import PROTOCOL, THIS, UNVERSIONED, Compatibility, VersionRefused
from tests.harness.support import DISK_KEY, GEOMETRY
from transport.errors import AuthError
from transport.frames import MAC_BYTES, FrameCodec, Message
from transport.peer_rpc.wire import CALLS

SECRET = b"s" * 32


def expect_talks(ours: int, theirs: object, speaks: int) -> None:
    assert Compatibility(ours).refusal(theirs, "the engine", "node a") is None
    assert Compatibility(ours).check(theirs, "the engine", "node a") == speaks


def expect_refused(ours: int, theirs: object, *words: str) -> None:
    why = Compatibility(ours).refusal(theirs, "the engine", "node a")
    assert why is not None
    for word in ("the engine", "node a", str(ours), *words):
        assert word in why, (word, why)
    with pytest.raises(VersionRefused, match="the engine"):
        Compatibility(ours).check(theirs, "the engine", "node a")


def test_this_release_talks_to_the_previous_and_the_next_one():
    assert THIS.ours == PROTOCOL == 2
    expect_talks(2, 2, 2)
    expect_talks(2, 1, 1)  # the previous release: the newer side speaks its wire
    expect_talks(2, 3, 2)  # the next release adapts to this one
    # a hello without a version is the previous release's (main before versions)
    assert UNVERSIONED == 1
    expect_talks(2, None, 1)


def test_versions_further_apart_are_refused_naming_both_and_who_to_upgrade():
    expect_refused(2, 4, "protocol 4", "upgrade node a")
    expect_refused(4, None, "protocol 1", "upgrade the engine")  # versionless: 1
    expect_refused(2, 0, "protocol 0", "upgrade the engine")
    expect_refused(3, 1, "protocol 1")


@pytest.mark.parametrize("said", [True, 2.0, "2", [2], {"v": 2}, "x" * 10_000])
def test_a_version_that_is_not_a_whole_number_is_refused(said):
    expect_refused(2, said, "for its kvbm protocol version")
    assert len(THIS.refusal(said, "the engine", "node a") or "") < 200  # shown clipped


def test_the_node_record_carries_its_protocol_and_reads_one_without():
    said = NodeRecord("n1", "10.0.0.1", 7001, protocol=2)
    assert NodeRecord.decode(said.encode()).protocol == 2
    # a record of the previous release: the same map without the field
    old = msgpack.unpackb(said.encode())
    del old["protocol"]
    assert NodeRecord.decode(msgpack.packb(old)).protocol is None
    # which the previous release reads as before: the field is one more it skips
    assert NodeRecord.decode(msgpack.packb({**old, "another": 1})).node_id == "n1"
    for bad in ("2", -1, 2.5, True):
        with pytest.raises(ValueError):
            NodeRecord.decode(msgpack.packb({**old, "protocol": bad}))


def test_a_peer_hellos_version_is_under_its_mac():
    # No version can be put into a hello by one without the secret, nor taken
    # out (a downgrade): the whole payload is under the HMAC.
    codec = FrameCodec(SECRET, CALLS)
    frame = codec.encode(Message("hello", 0, {"node": "b", "protocol": 2}))
    mac, payload = frame[4 : 4 + MAC_BYTES], frame[4 + MAC_BYTES :]
    fields = msgpack.unpackb(payload)
    fields["body"]["protocol"] = 1
    forged = msgpack.packb(fields, use_bin_type=True)
    with pytest.raises(AuthError):
        FrameCodec(SECRET, CALLS).decode(mac + forged)
    del fields["body"]["protocol"]
    with pytest.raises(AuthError):
        FrameCodec(SECRET, CALLS).decode(mac + msgpack.packb(fields, use_bin_type=True))
    assert FrameCodec(SECRET, CALLS).decode(frame[4:]).body["protocol"] == 2


def test_a_disk_file_of_another_layout_version_starts_empty_saying_both(tmp_path, caplog):
    size = 4096 + 4 * (4096 + GEOMETRY.slot_bytes)
    DiskPool(GEOMETRY, str(tmp_path), size, mac_key=DISK_KEY).close()
    path = arena_path(str(tmp_path), GEOMETRY)
    with open(path, "r+b") as f:  # another release's superblock: layout version 9
        fields = list(_SUPER.unpack(f.read(_SUPER.size)))
        fields[1] = 9
        f.seek(0)
        f.write(_SUPER.pack(*fields))
    with caplog.at_level(logging.WARNING, logger="kvbm.disk"):
        pool = DiskPool(GEOMETRY, str(tmp_path), size, mac_key=DISK_KEY)
    pool.close()
    assert "(the file's layout version is 9, this node's 3); starting it empty" in caplog.text
