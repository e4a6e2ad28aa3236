"""kvbm.shm_arena with real second processes: a child writes through an arena it
attached by name, and an arena whose creator was SIGKILLed is swept. (One
process: tests/unit/test_shm_arena.py.)"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import secrets

from kvbm.shm_arena import SHM_DIR, SharedArena

SIZE = 4 * 4096


def write_from_child(name: str, size: int, offset: int, payload: bytes) -> None:
    """Runs in a spawned process: attach by name, write, close."""
    arena = SharedArena.attach(name, size=size)
    try:
        arena.array[offset : offset + len(payload)] = list(payload)
    finally:
        arena.close()


def test_second_process_writes_and_parent_sees_it():
    name = f"kvbm-test-{os.getpid()}-{secrets.token_hex(6)}"
    arena = SharedArena.create(name, SIZE)
    payload = secrets.token_bytes(64)
    offset = SIZE - 4096 + 100  # inside the last page
    child = multiprocessing.get_context("spawn").Process(
        target=write_from_child, args=(name, SIZE, offset, payload)
    )
    child.start()
    try:
        child.join(timeout=60)
        assert child.exitcode == 0
        assert arena.array[offset : offset + 64].tobytes() == payload
        # nothing else was written, and the child's close left the name in place
        assert not arena.array[:offset].any() and not arena.array[offset + 64 :].any()
        assert os.path.exists(os.path.join(SHM_DIR, name))
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        arena.close()


def _create_and_die(name: str) -> None:
    SharedArena.create(name, 4096)
    os.kill(os.getpid(), 9)


def test_an_orphaned_arena_is_swept_and_a_live_one_is_not():
    prefix = f"kvbm-sweeptest-{secrets.token_hex(3)}-"
    orphan, live = f"{prefix}dead", f"{prefix}alive"
    # a creator killed with SIGKILL leaves its arena's name behind ...
    child = multiprocessing.get_context("spawn").Process(target=_create_and_die, args=(orphan,))
    child.start()
    child.join(60)
    assert child.exitcode == -9
    assert os.path.exists(f"{SHM_DIR}/{orphan}")
    arena = SharedArena.create(live, 4096)
    try:
        # ... which the next sweep removes, while a live owner's arena stays
        assert SharedArena.sweep_stale(prefix) == [orphan]
        assert not os.path.exists(f"{SHM_DIR}/{orphan}")
        assert os.path.exists(f"{SHM_DIR}/{live}")
    finally:
        arena.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{SHM_DIR}/{orphan}")
