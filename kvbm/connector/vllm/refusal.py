"""A connector that turns itself off says so once per engine, and tells the
node why, so that an operator finds the engine in `kvbm status`.

vLLM makes one connector per role and process: the scheduler (one per
engine) and a worker per rank (stage and tensor-parallel rank), each with the same setup and
so the same reason to be off. The scheduler speaks for the engine: it logs
the reason at error and tells the node; the workers log it at debug only.
"""

from __future__ import annotations

import logging
from typing import Any

from kvbm.connector.attach import NodeError, Refusal, report_refusal
from kvbm.connector.vllm.engine_setup import EngineSetup

log = logging.getLogger("kvbm.connector.vllm")
REPORT_TIMEOUT_S = 2.0  # an engine's start waits at most this long on a node that hangs


def announce_off(setup: EngineSetup, model_config: Any, speaks_for_engine: bool) -> None:
    """Log why the connector is off (when it is on, only a failure policy
    that fails requests: once per engine too), and, from the scheduler,
    tell the node when the reason is the engine's model (not an unreachable
    node) and a node is named. With no node named no private
    node is started just to be told: the log line is all there is. A node
    that cannot be told (away, or older than this call) changes nothing:
    the engine runs without kvbm either way."""
    if setup.off is None:
        if speaks_for_engine and not setup.promise_hits:
            log.warning(
                'kv_load_failure_policy is not "recompute": a failed load fails its request'
            )
        return
    if not speaks_for_engine:
        log.debug("kvbm connector off in this worker: %s", setup.off)
        return
    log.error("kvbm connector off, the engine runs without it: %s", setup.off)
    if setup.refusal is None:
        return
    refusal = Refusal.clipped(served_name(model_config), setup.off, setup.refusal)
    try:
        report_refusal(setup.socket, refusal, REPORT_TIMEOUT_S, setup.cfg.node_uid)
    except (NodeError, OSError) as e:
        log.info("the kvbm node at %s was not told why: %s", setup.socket, e)


def served_name(model_config: Any) -> str:
    """The name the engine serves its model under (what operators know it
    by), else the model's path or hub name."""
    return str(getattr(model_config, "served_model_name", None) or model_config.model)
