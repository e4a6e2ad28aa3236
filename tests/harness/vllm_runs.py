"""vLLM engine processes as the system tests run them
(`tests/harness/vllm_engine.py`, forked by `tests/harness/engine_forks.py`):
one batch of prompts and the answer, or a live engine the test talks to
between batches."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import threading

from tests.harness.engine_forks import EngineForks

ENGINE = "tests.harness.vllm_engine"
BLOCK = 32  # the engines' block size, in tokens
# vLLM's engine core in the engine's own process (half the start-up of vLLM's
# default on CPU, which spawns the core as a fresh interpreter)
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def prompt(seed: int, n: int = 3 * BLOCK + 4) -> list[int]:
    return [4 + (seed * 131 + i * 37) % 500 for i in range(n)]


class Engines:
    """Starts the tests' vLLM engines; owns the fork server they come from."""

    def __init__(self) -> None:
        self.forks = EngineForks()

    def close(self) -> None:
        self.forks.close()

    def answer(
        self,
        model: str,
        prompts: list,
        socket: str = "",
        remote: str = "",
        max_tokens: int = 16,
        prefix_caching: bool = False,
        kv_blocks: int = 0,
        env: dict | None = None,
    ) -> dict:
        """One engine's answer line for `prompts`, and its stderr. No `socket`:
        vLLM alone (no connector to prove across processes, so its engine core
        runs in-process); with one, vLLM's default, scheduler and worker in
        processes of their own, unless `env` says otherwise. `kv_blocks`: a KV
        cache that small, the prompts all at once."""
        node = [socket, remote] if socket else []
        out = self.forks.run(
            ENGINE,
            [model, json.dumps(prompts), *node],
            {
                **os.environ,
                "TEST_MAX_TOKENS": str(max_tokens),
                "TEST_PREFIX_CACHING": "1" if prefix_caching else "0",
                "TEST_KV_BLOCKS": str(kv_blocks),
                **({} if socket else IN_PROCESS),
                **(env or {}),
            },
            timeout=400,
        )
        assert out.returncode == 0, out.stderr[-4000:]
        lines = [line for line in out.stdout.splitlines() if line.startswith('{"outputs"')]
        assert lines, out.stdout[-2000:] + out.stderr[-2000:]
        return {**json.loads(lines[-1]), "stderr": out.stderr}

    def outputs(self, model: str, prompts: list, *args, **kwargs) -> list:
        return self.answer(model, prompts, *args, **kwargs)["outputs"]

    def live(
        self, model: str, socket: str, remote: str, log_path, env: dict | None = None
    ) -> LiveEngine:
        return LiveEngine(self.forks, model, socket, remote, log_path, env)


class LiveEngine:
    """An engine process the test talks to between batches of prompts."""

    def __init__(
        self,
        forks: EngineForks,
        model: str,
        socket: str,
        remote: str,
        log_path,
        env: dict | None = None,
    ) -> None:
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in close())
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        try:
            self.proc = forks.start(
                ENGINE,
                [model, "-", socket, remote],
                {**os.environ, **(env or {})},
                stdin_read,
                stdout_write,
                self.log.fileno(),
            )
        finally:
            os.close(stdin_read)
            os.close(stdout_write)
        self.stdin = os.fdopen(stdin_write, "w")
        self.stdout = os.fdopen(stdout_read)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._answer("ready", 300)

    def _pump(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # closed under it
            for line in self.stdout:
                if line.startswith("{"):
                    self.lines.put(line)

    def _answer(self, key: str, timeout: float) -> object:
        try:
            return json.loads(self.lines.get(timeout=timeout))[key]
        except queue.Empty:
            raise AssertionError(f"engine gave no {key} in {timeout} s") from None

    def run(self, prompts: list) -> list:
        self.stdin.write(json.dumps(prompts) + "\n")
        self.stdin.flush()
        return self._answer("outputs", 120)  # type: ignore[return-value]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
        with contextlib.suppress(OSError):
            self.stdout.close()
