"""The node's secret: the operator's, from a file (a Kubernetes Secret
mounted in the pod) or the KVBM_SECRET environment variable, or one the node
makes for itself.

Every peer frame is signed with the secret, the index's values too, and the
block hashing key and the disk tier's sums derive from it. So no secret is
shared by default: a node that joins a fleet (etcd set) needs the operator's
secret, the same on every node, and refuses to start without it; a node on
its own (no etcd: it opens no peer port) makes a random one in its private
directory and keeps it there (0600), so its disk tier and its engines' block
keys survive a restart. A secret file that its group or other users may read
is refused: whoever reads it can sign frames as a node of the fleet.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Mapping

from transport.errors import TransportError

log = logging.getLogger("transport.secret")
ENV_VAR = "KVBM_SECRET"
MIN_BYTES = 16
OWN_BYTES = 32  # a made secret: 256 random bits, kept as hex text


class SecretError(TransportError):
    """No usable secret: the node must not start."""


def load_secret(
    secret_file: str,
    fleet: bool,
    own_path: str,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """The operator's secret from `secret_file` or KVBM_SECRET (one of them,
    not both; surrounding whitespace, a trailing newline, is not part of it);
    without one, a node in a `fleet` fails, and a node on its own uses the
    secret it keeps at `own_path` (made on its first start)."""
    configured = operator_secret(secret_file, env)
    if configured is not None:
        return configured
    if fleet:
        raise SecretError(
            f"a node that joins a fleet (etcd set) needs the operator's secret, the same on "
            f"every node: set {ENV_VAR} or secret_file (at least {MIN_BYTES} bytes, e.g. "
            "`openssl rand -hex 32`)"
        )
    return own_secret(own_path)


def operator_secret(secret_file: str, env: Mapping[str, str] | None = None) -> bytes | None:
    """The configured secret, or None when none is configured."""
    environ = os.environ if env is None else env
    from_env = environ.get(ENV_VAR, "")
    if secret_file and from_env:
        raise SecretError(f"both a secret file and {ENV_VAR} are set: keep one")
    if secret_file:
        try:
            fd = os.open(secret_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SecretError(f"cannot read the secret file {secret_file}: {e}") from e
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            secret = f.read().strip()
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(
                f"the secret file {secret_file} is open to its group or to others "
                f"(mode {stat.S_IMODE(mode):04o}): make it 0600 or 0400"
            )
        where = f"the secret file {secret_file}"
    elif from_env:
        secret, where = from_env.strip().encode(), ENV_VAR
    else:
        return None
    if len(secret) < MIN_BYTES:
        raise SecretError(f"the secret in {where} is {len(secret)} bytes; at least {MIN_BYTES}")
    return secret


def without_secret(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (None: this process's environment) without KVBM_SECRET: for a
    child given its secret otherwise (a file), which would refuse both."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k != ENV_VAR}


def own_secret(path: str) -> bytes:
    """The secret kept at `path`, made there (0600) if there is none yet.
    The caller owns the directory (kvbm/owned_dir.py checks it), so nobody
    else can have put a file there; the file's owner and mode are checked
    all the same, through the descriptor read, never a path followed twice."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return _make_secret(path)
    except OSError as e:
        raise SecretError(f"cannot read the node's own secret {path}: {e}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        secret = f.read().strip()
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SecretError(
            f"{path} is not this user's private secret file (owner uid {st.st_uid}, "
            f"mode {stat.S_IMODE(st.st_mode):04o}): remove it"
        )
    if len(secret) < MIN_BYTES:
        raise SecretError(f"{path} holds {len(secret)} bytes; remove it to make a new one")
    return secret


def _make_secret(path: str) -> bytes:
    """Written whole under a temporary name, then linked into place: two
    nodes starting at once both end up with the one that got there first."""
    secret = secrets.token_hex(OWN_BYTES).encode()
    temporary = f"{path}.{secrets.token_hex(8)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secret + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return own_secret(path)
    finally:
        os.unlink(temporary)
    log.info("made this node's own secret path=%s (no fleet: no peer port)", path)
    return secret
