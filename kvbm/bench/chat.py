"""`kvbm bench chat`: LMCache's multi-round QA shape, across two vLLM
OpenAI servers on two nodes behind a router that is not sticky.

The workload: `users` users; every prompt starts with one system prompt
they all share, then the user's own context, then the conversation so far;
each round adds a question and the model's answer (greedy, a fixed length).
Requests leave at a set rate (`qps`), a user's next round once its last one
is answered, and request k goes to server k mod 2: a user's consecutive
rounds land on different servers, so only a cache the two nodes share turns
round 2 into a hit.

Each load level runs twice in the same invocation on the same two servers'
configuration: with kvbm (each server's engine on its own node, nodes A and
B on 127.0.0.2 and 127.0.0.3, remote host tier on, one etcd) and without
(vLLM alone). vLLM's own prefix cache is on in both, as users run it: that
is the reference the kvbm figures are ratios to. Each level has users of
its own (fresh contexts; the system prompt is shared, and warm from the
first level on). Reported per level and round: TTFT p50 and p90 with and
without kvbm (time to the first streamed token), the prompt tokens vLLM
counted cached (`usage.prompt_tokens_details.cached_tokens`: its own prefix
hit and the connector's), and how many answers were the same token for
token with and without kvbm.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from discovery.etcd_server import EtcdServer
from kvbm.node_process import NodeProcess, fleet_secret
from kvbm.random_llama import build_llama

if TYPE_CHECKING:
    from aiohttp import ClientSession

LAYERS, HIDDEN, HEADS, KV_HEADS, BLOCK, VOCAB = 4, 512, 8, 8, 32, 4096
SYSTEM, CONTEXT, QUESTION, ANSWER = 512, 256, 32, 32  # tokens
HOSTS = ("127.0.0.2", "127.0.0.3")
PORT = 8199
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


@dataclass
class Turn:
    """One request's outcome."""

    user: int
    round: int
    server: int
    prompt_tokens: int
    ttft_s: float
    cached_tokens: int
    answer: list[int]


@dataclass
class User:
    """A user's conversation: its prompt so far, and its turns."""

    index: int
    tokens: list[int]
    turns: list[Turn] = field(default_factory=list)


class Server:
    """A vLLM OpenAI server in a process of its own on `host`, kvbm's
    connector on `node` (None: vLLM alone), its log in `log_path`; each
    bound to a core of its own."""

    def __init__(self, model: str, host: str, core: int, node: str | None, log_path: str) -> None:
        self.url = f"http://{host}:{PORT}"
        # env(1) adds the variables to what this process inherited (unread here)
        settings = {**ENV, "VLLM_CPU_OMP_THREADS_BIND": str(core)}
        args = ["env", *(f"{k}={v}" for k, v in settings.items()), sys.executable, "-m"]
        args += ["vllm.entrypoints.openai.api_server", "--model", model]
        args += ["--host", host, "--port", str(PORT), "--dtype", "float32", "--seed", "0"]
        args += ["--block-size", str(BLOCK), "--max-model-len", "2048", "--enforce-eager"]
        args += ["--enable-prefix-caching", "--enable-prompt-tokens-details"]
        args += ["--uvicorn-log-level", "warning"]
        if node is not None:
            from kvbm.connector.vllm.engine_setup import kv_transfer_config

            extra = {"node": node, "remote_tiers": ["host"]}
            made = kv_transfer_config(extra)
            fields = ("kv_connector", "kv_connector_module_path", "kv_role")
            fields += ("kv_load_failure_policy", "kv_connector_extra_config")
            args += ["--kv-transfer-config", json.dumps({f: getattr(made, f) for f in fields})]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    async def ready(self, session: ClientSession, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited: {self.tail()}")
            with contextlib.suppress(Exception):
                async with session.get(f"{self.url}/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(1.0)
        raise RuntimeError(f"vLLM's server was not ready in {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def ask(
    session: ClientSession, server: Server, prompt: list[int]
) -> tuple[float, list[int], int]:
    """One streamed greedy completion: (seconds to the first token, the
    answer's token ids, prompt tokens vLLM counted cached)."""
    body = {
        "model": "",
        "prompt": prompt,
        "max_tokens": ANSWER,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, answer, cached = None, [], 0
    async with session.post(f"{server.url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"vLLM answered {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                if choice.get("token_ids"):
                    first = first or time.perf_counter()
                    answer += choice["token_ids"]
            usage = chunk.get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or cached
    if first is None or len(answer) != ANSWER:
        raise RuntimeError(f"vLLM's stream carried {len(answer)} of {ANSWER} tokens")
    return first - t0, answer, cached


async def conversations(
    servers: list[Server], users: list[User], rounds: int, qps: float
) -> list[Turn]:
    """Every user's rounds, a request every 1/qps seconds (or as soon as a
    user is ready, when none was), round-robin over the servers."""
    import aiohttp

    turns: list[Turn] = []
    ready: asyncio.Queue[User] = asyncio.Queue()
    for user in users:
        ready.put_nowait(user)
    total = len(users) * rounds
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(user: User, k: int) -> None:
            server = k % len(servers)
            round_ = len(user.turns)
            question = [
                4 + (user.index * 97 + round_ * 31 + i * 7) % (VOCAB - 4) for i in range(QUESTION)
            ]
            prompt = user.tokens + question
            ttft, answer, cached = await ask(session, servers[server], prompt)
            turn = Turn(user.index, round_, server, len(prompt), ttft, cached, answer)
            user.turns.append(turn)
            turns.append(turn)
            user.tokens = prompt + answer
            if len(user.turns) < rounds:
                ready.put_nowait(user)

        start, tasks = time.perf_counter(), []
        for k in range(total):
            await asyncio.sleep(max(0.0, start + k / qps - time.perf_counter()))
            user = await ready.get()
            tasks.append(asyncio.create_task(one(user, k)))
        await asyncio.gather(*tasks)
    return turns


def new_users(seed: int, count: int, system: list[int]) -> list[User]:
    rng = random.Random(seed)
    return [
        User(i, system + [rng.randrange(4, VOCAB) for _ in range(CONTEXT)]) for i in range(count)
    ]


async def _serve(
    model: str,
    nodes: list[str | None],
    d: str,
    levels: list[float],
    users: int,
    rounds: int,
    system: list[int],
) -> tuple[list[float], dict[float, list[Turn]]]:
    """Two servers (on `nodes`, or vLLM alone): each one's warm-up TTFT in
    ms, and every level's turns."""
    import aiohttp

    label = "kvbm" if nodes[0] else "alone"
    servers = [
        Server(model, host, core, node, os.path.join(d, f"vllm-{label}-{i}.log"))
        for i, (host, core, node) in enumerate(zip(HOSTS, (0, 1), nodes, strict=True))
    ]
    try:
        warmup = []
        async with aiohttp.ClientSession() as session:
            for i, server in enumerate(servers):
                await server.ready(session)
                # each server's first request pays its start-up (kvbm's attach
                # to its node among it): a prompt of its own, timed apart
                rng = random.Random(1000 + i)
                first = [rng.randrange(4, VOCAB) for _ in range(SYSTEM)]
                warmup.append((await ask(session, server, first))[0])
        turns = {}
        for at, qps in enumerate(levels):
            turns[qps] = await conversations(
                servers, new_users(100 + at, users, system), rounds, qps
            )
        return [round(t * 1e3, 1) for t in warmup], turns
    finally:
        for server in servers:
            server.stop()


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    at = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return round(values[at] * 1e3, 1)


def _summary(turns: list[Turn]) -> dict:
    ttft = [t.ttft_s for t in turns]
    return {
        "requests": len(turns),
        "ttft_p50_ms": _percentile(ttft, 0.5),
        "ttft_p90_ms": _percentile(ttft, 0.9),
        "prompt_tokens": sum(t.prompt_tokens for t in turns),
        "cached_tokens": sum(t.cached_tokens for t in turns),
    }


def run(
    users: int = 5,
    rounds: int = 3,
    levels: tuple[float, ...] = (0.5, 2.0),
    workdir: str | None = None,
) -> dict:
    rng = random.Random(0)
    system = [rng.randrange(4, VOCAB) for _ in range(SYSTEM)]
    out: dict = {
        "bench": "chat",
        "machine": {"cpus": os.cpu_count()},
        "model": {"layers": LAYERS, "hidden": HIDDEN, "kv_heads": KV_HEADS, "dtype": "float32"},
        "shape": {
            "users": users,
            "rounds": rounds,
            "system_tokens": SYSTEM,
            "context_tokens": CONTEXT,
            "question_tokens": QUESTION,
            "answer_tokens": ANSWER,
            "servers": len(HOSTS),
            "routing": "round-robin by request",
        },
    }
    with (
        tempfile.TemporaryDirectory(prefix="kvbm-bench-chat-", dir=workdir) as d,
        EtcdServer() as etcd,
    ):
        model = build_llama(os.path.join(d, "model"), LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB)
        out["warmup_ttft_ms_without"], alone = asyncio.run(
            _serve(model, [None, None], d, list(levels), users, rounds, system)
        )
        flags = ["--etcd", etcd.endpoint, *fleet_secret(d), "--host-cache-mb", "512"]
        nodes = []
        try:
            for name, host in zip(("node-a", "node-b"), HOSTS, strict=True):
                nodes.append(NodeProcess(d, name, host, *flags))
            sockets = [n.socket for n in nodes]
            out["warmup_ttft_ms_with_kvbm"], kvbm = asyncio.run(
                _serve(model, sockets, d, list(levels), users, rounds, system)
            )
        finally:
            for node in nodes:
                node.stop()
    out["levels"] = []
    for qps in levels:
        level: dict = {"qps": qps}
        for part, pick in (
            ("round_1", lambda t: t.round == 0),
            ("rounds_2_plus", lambda t: t.round > 0),
        ):
            with_ = _summary([t for t in kvbm[qps] if pick(t)])
            without = _summary([t for t in alone[qps] if pick(t)])
            level[part] = {
                "with_kvbm": with_,
                "without": without,
                "ttft_p50_vs_without": round(with_["ttft_p50_ms"] / without["ttft_p50_ms"], 3),
                "ttft_p90_vs_without": round(with_["ttft_p90_ms"] / without["ttft_p90_ms"], 3),
                "prefill_tokens_saved": with_["cached_tokens"] - without["cached_tokens"],
            }
        answers = {(t.user, t.round): t.answer for t in alone[qps]}
        same = sum(answers.get((t.user, t.round)) == t.answer for t in kvbm[qps])
        level["answers_equal"] = f"{same}/{len(kvbm[qps])}"
        out["levels"].append(level)
    return out
