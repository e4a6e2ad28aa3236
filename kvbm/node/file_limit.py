"""The node's limit on open files, raised to what its peers need."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("kvbm.node")
FILES_BESIDES_PEERS = 1024  # engines, etcd, metrics, the arenas and the disk tier


def fit_file_limit(max_peer_connections: int) -> int:
    """Raise the soft limit on open files to what the node's peers need (a
    socket each way per peer, and room for the rest), as far as the hard
    limit allows: a common soft limit of 1024 would fail accepts past a few
    hundred peers. Returns the soft limit now."""
    want = 2 * max_peer_connections + FILES_BESIDES_PEERS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError) as e:  # a sandbox that forbids it: run as we are
            log.warning("cannot raise the limit on open files: %s", e)
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "open files are limited to %d, under the %d that max_peer_connections=%d needs: "
            "raise the hard limit (ulimit -Hn) or lower max_peer_connections",
            soft,
            want,
            max_peer_connections,
        )
    return soft
