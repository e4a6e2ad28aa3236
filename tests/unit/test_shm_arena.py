"""kvbm.shm_arena: a named POSIX shared-memory region, created by the node and attached by name
from other processes (those: tests/integration/test_shm_arena_processes.py)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

import pytest

from kvbm.errors import ArenaError, KvbmError
from kvbm.shm_arena import SHM_DIR, SharedArena

SIZE = 4 * 4096


@pytest.fixture
def name():
    """A fresh arena name; its /dev/shm file is removed after the test whatever happened."""
    arena_name = f"kvbm-test-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        yield arena_name
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, arena_name))


@pytest.fixture
def opened():
    """Collects every arena a test opens and closes them all afterwards."""
    arenas: list[SharedArena] = []
    try:
        yield arenas
    finally:
        for arena in arenas:
            arena.close()


def shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def expect_arena_error(fn, *args, match: str, **kwargs) -> None:
    with pytest.raises(ArenaError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, KvbmError)


# --- create / attach / close ----------------------------------------------------------------


def test_create_maps_a_zeroed_region(name, opened):
    arena = SharedArena.create(name, SIZE)
    opened.append(arena)
    assert arena.name == name and arena.size == SIZE and arena.owner
    assert os.path.getsize(shm_path(name)) == SIZE
    assert arena.array.shape == (SIZE,)
    assert not arena.array.any()
    # the numpy array and the torch tensor are the same memory
    arena.array[10] = 7
    assert arena.array[10] == 7


def test_attach_sees_the_creators_bytes(name, opened):
    creator = SharedArena.create(name, SIZE)
    opened.append(creator)
    # attach without a size -> the file's size; with the right size -> fine too
    a = SharedArena.attach(name)
    b = SharedArena.attach(name, size=SIZE)
    opened += [a, b]
    assert not a.owner and a.size == SIZE
    creator.array[:4] = [1, 2, 3, 4]
    assert a.array[:4].tolist() == [1, 2, 3, 4]
    # writes go both ways
    b.array[SIZE - 1] = 99
    assert creator.array[SIZE - 1] == 99


def test_attacher_close_does_not_unlink(name, opened):
    creator = SharedArena.create(name, SIZE)
    opened.append(creator)
    with SharedArena.attach(name) as attached:
        attached.array[0] = 5
    assert os.path.exists(shm_path(name))
    assert creator.array[0] == 5
    # a later attach still works
    again = SharedArena.attach(name)
    opened.append(again)
    assert again.array[0] == 5


def test_creator_close_unlinks(name):
    arena = SharedArena.create(name, SIZE)
    try:
        assert os.path.exists(shm_path(name))
    finally:
        arena.close()
    assert not os.path.exists(shm_path(name))
    expect_arena_error(SharedArena.attach, name, match="cannot open")


def test_close_twice_is_safe(name):
    arena = SharedArena.create(name, SIZE)
    try:
        attached = SharedArena.attach(name)
        attached.close()
        attached.close()
    finally:
        arena.close()
    arena.close()
    assert arena.array.size == 0
    assert not os.path.exists(shm_path(name))


def test_context_manager_closes_and_unlinks(name):
    with SharedArena.create(name, SIZE) as arena:
        arena.array[:] = 1
    assert arena.array.size == 0
    assert not os.path.exists(shm_path(name))


def test_close_while_a_caller_still_holds_a_view(name):
    arena = SharedArena.create(name, SIZE)
    try:
        view = arena.array[:8]
        view[:] = 3
    finally:
        # the mapping outlives close() as long as the view does; close must not raise
        arena.close()
    assert not os.path.exists(shm_path(name))
    assert view.tolist() == [3] * 8
    del view


def test_a_size_that_is_not_a_page_multiple(name, opened):
    arena = SharedArena.create(name, 100)
    opened.append(arena)
    attached = SharedArena.attach(name)
    opened.append(attached)
    assert arena.size == attached.size == 100


# --- errors ---------------------------------------------------------------------------------


def test_create_existing_name_raises_arena_error(name, opened):
    first = SharedArena.create(name, SIZE)
    opened.append(first)
    first.array[0] = 42
    expect_arena_error(SharedArena.create, name, SIZE, match="already exists")
    # the failed create left the first arena alone
    assert os.path.exists(shm_path(name))
    assert first.array[0] == 42


def test_attach_missing_name_raises_arena_error(name):
    expect_arena_error(SharedArena.attach, name, match="cannot open")


def test_attach_with_wrong_size_raises_arena_error(name, opened):
    opened.append(SharedArena.create(name, SIZE))
    expect_arena_error(SharedArena.attach, name, size=SIZE * 2, match="expected")
    expect_arena_error(SharedArena.attach, name, size=SIZE - 1, match="expected")


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "../etc", "with space", "x" * 201, "caf\u00e9", "star*"],
    ids=["empty", "slash", "dotdot-slash", "space", "too-long", "non-ascii", "star"],
)
def test_bad_names_raise_value_error(bad):
    with pytest.raises(ValueError, match="arena name"):
        SharedArena.create(bad, SIZE)
    with pytest.raises(ValueError, match="arena name"):
        SharedArena.attach(bad)
    with pytest.raises(ValueError, match="arena name"):
        SharedArena.path_of(bad)


def test_longest_name_is_accepted(opened):
    long_name = f"kvbm-test-{secrets.token_hex(6)}".ljust(200, "x")
    try:
        opened.append(SharedArena.create(long_name, SIZE))
        assert os.path.exists(shm_path(long_name))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm_path(long_name))


@pytest.mark.parametrize("size", [0, -4096])
def test_non_positive_size_raises_value_error(name, size):
    with pytest.raises(ValueError, match="size"):
        SharedArena.create(name, size)
    assert not os.path.exists(shm_path(name))


# --- permissions ----------------------------------------------------------------------------


def file_mode(name: str) -> int:
    return stat.S_IMODE(os.stat(shm_path(name)).st_mode)


def test_default_mode_is_owner_only(name, opened):
    opened.append(SharedArena.create(name, SIZE))
    assert file_mode(name) == 0o600


def test_mode_is_honoured_despite_umask(name, opened):
    # a restrictive umask must not narrow the 0o660 we asked for
    old = os.umask(0o077)
    try:
        opened.append(SharedArena.create(name, SIZE, mode=0o660))
    finally:
        os.umask(old)
    assert file_mode(name) == 0o660


@pytest.mark.parametrize("name", [".", "..", "x\n", "-leading-dash"])
def test_names_that_are_not_plain_files_are_refused(name):
    with pytest.raises(ValueError):
        SharedArena.path_of(name)


def test_attaching_an_empty_file_is_an_arena_error():
    name = f"kvbm-test-empty-{secrets.token_hex(4)}"
    path = f"/dev/shm/{name}"
    open(path, "wb").close()
    try:
        with pytest.raises(ArenaError):
            SharedArena.attach(name)
    finally:
        os.unlink(path)
