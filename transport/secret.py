"""The peer RPC's shared secret, from a file (a Kubernetes Secret mounted in
the pod) or the KVBM_SECRET environment variable.

Every frame is signed with it, so a node that can be reached from the
network must not run on a secret anyone knows: without one it refuses to
start, unless it listens on loopback only or is told it is a dev setup (then
it uses a well-known dev secret and says so in the log). A secret file that
its group or other users may read is refused: whoever reads it can sign
frames as a node of the fleet.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from collections.abc import Mapping

from transport.errors import TransportError

log = logging.getLogger("transport.secret")
ENV_VAR = "KVBM_SECRET"
MIN_BYTES = 16
DEV_SECRET = b"kvbm-dev-secret-never-deploy-this"


class SecretError(TransportError):
    """No usable secret: the node must not start."""


def load_secret(
    secret_file: str,
    listen_host: str,
    dev: bool = False,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """The secret from `secret_file` or KVBM_SECRET (one of them, not both);
    surrounding whitespace (a trailing newline) is not part of it."""
    environ = os.environ if env is None else env
    from_env = environ.get(ENV_VAR, "")
    if secret_file and from_env:
        raise SecretError(f"both a secret file and {ENV_VAR} are set: keep one")
    if secret_file:
        try:
            with open(secret_file, "rb") as f:
                secret = f.read().strip()
                mode = os.fstat(f.fileno()).st_mode
        except OSError as e:
            raise SecretError(f"cannot read the secret file {secret_file}: {e}") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(
                f"the secret file {secret_file} is open to its group or to others "
                f"(mode {stat.S_IMODE(mode):04o}): make it 0600 or 0400"
            )
        where = f"the secret file {secret_file}"
    elif from_env:
        secret, where = from_env.strip().encode(), ENV_VAR
    elif dev or _loopback(listen_host):
        log.warning("no secret set: using the well-known dev secret (dev setups only)")
        return DEV_SECRET
    else:
        raise SecretError(
            f"a node listening on {listen_host} needs a shared secret: set {ENV_VAR} "
            "or a secret file (the same on every node), or declare a dev setup"
        )
    if len(secret) < MIN_BYTES:
        raise SecretError(f"the secret in {where} is {len(secret)} bytes; at least {MIN_BYTES}")
    return secret


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may well resolve beyond this machine
