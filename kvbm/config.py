"""The one configuration object: defaults < file < environment < overrides.

One name per setting everywhere: the key `host_cache_mb` is the TOML key
`host_cache_mb`, the environment variable `KVBM_HOST_CACHE_MB`, the flag
`--host-cache-mb` and the connector extra-config key `host_cache_mb`. The
reference table in docs/operations.md is generated from the fields below
(`kvbm config --reference`), and a test keeps the two equal.

Settings that take one of a few words are enums (`LogLevel`, `IndexLayout`,
`EngineCopies`; a member equals its word, so `cfg.index_layout == "sharded"`
reads as before). A bad setting raises `ConfigError` (a ValueError) that
names the setting, what it got and what it takes.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import pwd
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from discovery.records import check_namespace
from discovery.tier import Tier
from discovery.tls import EtcdTls
from kvbm.errors import KvbmError
from transport.net_devices import UCX_DEVICES_VAR, pin_ucx_devices
from transport.secret import ENV_VAR as SECRET_VAR

log = logging.getLogger("kvbm.config")
ENV_PREFIX = "KVBM_"
CONFIG_FILE_VAR = "KVBM_CONFIG"  # the engines' configuration file (`kvbm` takes --config)
# KVBM_* variables that are not settings: read where they are used
NOT_SETTINGS = {CONFIG_FILE_VAR, SECRET_VAR}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(KvbmError, ValueError):
    """A setting is unknown, mistyped or out of range; the message names it."""


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class IndexLayout(StrEnum):
    """Where the index keeps block locations (see the setting's doc)."""

    MIRROR = "mirror"
    SHARDED = "sharded"


class EngineCopies(StrEnum):
    """When an engine's copies are committed (see the setting's doc)."""

    AUTO = "auto"
    SYNC = "sync"
    ASYNC = "async"


def _opt(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class KvbmConfig:
    namespace: str = _opt("default", "Index namespace: separates models and tenants.")
    host_cache_mb: int = _opt(1024, "Size of the host tier (G2), a shared-memory arena.")
    host_arena_dir: str = _opt(
        "/dev/shm",
        "Memory file system of the G2 arena, seen by engines too; a tmpfs mounted "
        "huge=always gives it 2 MiB pages (faster peer reads).",
    )
    disk_cache_dir: str = _opt("", "Directory of the disk tier (G3) file; empty: no disk tier.")
    disk_cache_mb: int = _opt(0, "Size of the disk tier file; 0: no disk tier.")
    disk_admit_min_uses: int = _opt(
        2, "A block evicted from G2 goes to disk once used this many times."
    )
    disk_write_ahead_mb: int = _opt(
        256,
        "The coldest this many MB of G2 (at most a quarter of it) are copied to disk "
        "before they are evicted (those the admission filter admits), so a load that "
        "evicts them waits on no disk write; 0: write at eviction.",
    )
    disk_direct_io: bool = _opt(True, "Use O_DIRECT where the file system allows it.")
    disk_preallocate: bool = _opt(
        True, "Reserve the disk tier's blocks at start (off: sparse file)."
    )
    log_level: LogLevel = _opt(LogLevel.WARNING, "One of debug, info, warning, error.")
    node_id: str = _opt("", "This node's name in the index; empty: the host name.")
    listen: str = _opt(
        "127.0.0.1:0",
        "HOST:PORT of the peer RPC (port 0: any free one; peers learn it from the index); "
        "a node without etcd has no peers and opens no peer port.",
    )
    etcd: str = _opt(
        "", "etcd endpoints, comma-separated HOST:PORT; empty: in-memory index, one node."
    )
    etcd_ca_file: str = _opt(
        "", "CA certificate of etcd's server certificate: etcd is then reached in TLS."
    )
    etcd_cert_file: str = _opt(
        "", "This node's client certificate for etcd (its --client-cert-auth); with the key."
    )
    etcd_key_file: str = _opt("", "The key of etcd_cert_file.")
    socket: str = _opt("/tmp/kvbm/node.sock", "Unix socket that engines attach to.")
    metrics_port: int = _opt(0, "Port of /metrics and /healthz on the listen host; 0: off.")
    secret_file: str = _opt(
        "",
        "File holding the fleet's secret (or set KVBM_SECRET), the same on every node; "
        "needed with etcd. Empty without etcd: the node makes its own, beside its socket.",
    )
    lease_ttl: int = _opt(10, "Seconds the index keeps a silent node's entries.")
    index_publish_after_ms: int = _opt(
        0,
        "A block goes to the index once the node has held it this long (what lives "
        "shorter costs no etcd write); 0: at the next flush (every 0.5 s).",
    )
    index_layout: IndexLayout = _opt(
        IndexLayout.MIRROR,
        "mirror: every node mirrors every location from etcd (lookups in microseconds, "
        "most without a call to the node; for fleets up to about 100 nodes); sharded: etcd "
        "holds node records only, each node keeps its share of the locations and lookups "
        "ask their owners over the peer RPC (about 1 ms; for larger fleets, up to about "
        "max_peer_connections nodes). A fleet's nodes all run the same layout.",
    )
    peer_timeout_ms: int = _opt(
        2000, "Longest wait for a pull from a peer; past it the engine recomputes."
    )
    peer_backoff_s: int = _opt(30, "Seconds a peer that timed out or dropped a pull is left alone.")
    max_peer_connections: int = _opt(
        1024,
        "Peers connected to this node at once; one more takes the place of the connection "
        "idle longest (its peer reconnects when it next calls). Each costs a file descriptor "
        "on each side: the node raises its soft limit to fit.",
    )
    shared_group: str = _opt(
        "",
        "Group (name or gid) whose engines may attach: socket and host arena 0660 to it; "
        "empty: the node's own user only (arena 0600).",
    )
    node_user: str = _opt(
        "",
        "User (name or uid) engines expect their node to run as, checked on the socket "
        "(SO_PEERCRED) and the arena's owner; empty: the engine's own user or root.",
    )
    remote_tiers: str = _opt(
        "", "Peer tiers engines may load from: host, disk, both comma-separated; empty: none."
    )
    engine_copies: EngineCopies = _opt(
        EngineCopies.AUTO,
        "How an engine copies between its KV cache and the arena: sync (within the step), "
        "async (loads waited for per layer, saves finished in a later step), auto (async for "
        "a GPU cache, sync for a CPU one).",
    )

    def __post_init__(self) -> None:
        # The one place a foreign ValueError (a namespace's, TLS files') becomes a ConfigError.
        try:
            self._check()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _check(self) -> None:
        for name, kind in CHOICES.items():
            # A word given where an enum is expected becomes the member, once,
            # while the object is built (the enum's members are its words).
            object.__setattr__(self, name, _choice(name, kind, getattr(self, name)))
        check_namespace(self.namespace)
        if self.host_cache_mb < 1:
            raise ConfigError(f"host_cache_mb must be at least 1, got {self.host_cache_mb}")
        if not os.path.isabs(self.host_arena_dir):
            raise ConfigError(
                f"host_arena_dir must be an absolute path, got {self.host_arena_dir!r}"
            )
        if self.disk_cache_mb < 0:
            raise ConfigError(f"disk_cache_mb must be >= 0, got {self.disk_cache_mb}")
        if self.disk_cache_mb and not self.disk_cache_dir:
            raise ConfigError("disk_cache_mb is set but disk_cache_dir is empty")
        if self.disk_write_ahead_mb < 0:
            raise ConfigError(f"disk_write_ahead_mb must be >= 0, got {self.disk_write_ahead_mb}")
        if self.disk_admit_min_uses < 1:
            raise ConfigError(
                f"disk_admit_min_uses must be at least 1, got {self.disk_admit_min_uses}"
            )
        # parsed here, once: the properties below keep what they parse
        _ = self.listen_address, self.etcd_endpoints, self.shared_gid, self.etcd_tls
        _ = self.node_uid, self.remote_tier_list
        if "https://" in self.etcd and not self.etcd_ca_file:
            raise ConfigError("etcd endpoints in https:// need etcd_ca_file (TLS to etcd)")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics_port out of range: {self.metrics_port}")
        if self.lease_ttl < 2:
            raise ConfigError(f"lease_ttl must be at least 2 seconds, got {self.lease_ttl}")
        if self.index_publish_after_ms < 0:
            raise ConfigError(
                f"index_publish_after_ms must be >= 0, got {self.index_publish_after_ms}"
            )
        if self.peer_timeout_ms < 10 or self.peer_backoff_s < 0:
            raise ConfigError(
                "peer_timeout_ms must be at least 10 and peer_backoff_s >= 0, got "
                f"{self.peer_timeout_ms} and {self.peer_backoff_s}"
            )
        if self.max_peer_connections < 1:
            raise ConfigError(
                f"max_peer_connections must be at least 1, got {self.max_peer_connections}"
            )

    # Parsed forms, computed once (a frozen dataclass still caches: the value
    # goes into the instance's __dict__, not through __setattr__).
    @cached_property
    def shared_gid(self) -> int | None:
        return parse_group(self.shared_group)

    @cached_property
    def node_uid(self) -> int | None:
        return parse_user(self.node_user)

    @cached_property
    def own_secret_path(self) -> str:
        """Where a node without the operator's secret keeps the one it made:
        beside its socket, in the directory only its user may write."""
        return os.path.splitext(self.socket)[0] + ".secret"

    @cached_property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @cached_property
    def remote_tier_list(self) -> tuple[Tier, ...]:
        names = [t.strip() for t in self.remote_tiers.split(",") if t.strip()]
        if not set(names) <= {t.value for t in Tier}:
            raise ConfigError(
                f"remote_tiers may name host and disk only, got {self.remote_tiers!r}"
            )
        return tuple(Tier(t) for t in names)

    @cached_property
    def etcd_endpoints(self) -> tuple[str, ...]:
        return tuple(parse_endpoints(self.etcd))

    @cached_property
    def etcd_tls(self) -> EtcdTls | None:
        if not (self.etcd_ca_file or self.etcd_cert_file or self.etcd_key_file):
            return None
        return EtcdTls(self.etcd_ca_file, self.etcd_cert_file, self.etcd_key_file)

    @cached_property
    def node_name(self) -> str:
        """`node_id`, or where it is empty, the host name made a valid node id."""
        if self.node_id:
            return self.node_id
        name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63].strip("-.")
        return name or "node"

    @property
    def disk_enabled(self) -> bool:
        return bool(self.disk_cache_dir and self.disk_cache_mb)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def parse_group(group: str) -> int | None:
    """A group name or gid -> gid (None: no group)."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"shared_group: no group {group!r} on this machine") from None


def parse_user(user: str) -> int | None:
    """A user name or uid -> uid (None: not set)."""
    if not user:
        return None
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ConfigError(f"node_user: no user {user!r} on this machine") from None


def parse_endpoints(text: str) -> list[str]:
    """`HOST:PORT` endpoints (an `http://` in front is accepted and dropped)."""
    out = []
    for item in (e.strip() for e in text.split(",")):
        if not item:
            continue
        item = item.removeprefix("http://").removeprefix("https://").rstrip("/")
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"etcd endpoint must be HOST:PORT, got {item!r}")
        out.append(item)
    return out


# Every setting's field, by name; and the enum of each setting that takes one of a few words.
FIELDS = {f.name: f for f in dataclasses.fields(KvbmConfig)}
CHOICES: dict[str, type[StrEnum]] = {
    "log_level": LogLevel,
    "index_layout": IndexLayout,
    "engine_copies": EngineCopies,
}


def _choice(name: str, kind: type[StrEnum], value: Any) -> StrEnum:
    try:
        return kind(value)
    except ValueError:
        words = ", ".join(m.value for m in kind)  # type: ignore[attr-defined]
        raise ConfigError(f"{name} must be one of {words}, got {value!r}") from None


def _coerce(name: str, value: Any) -> Any:
    """Strings (environment, flags) and TOML values -> the field's type."""
    kind = FIELDS[name].type
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # a list (TOML, connector config) of a comma-separated setting
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if name in CHOICES:
        return _choice(name, CHOICES[name], value)
    return value


def _merge(into: dict[str, Any], source: Mapping[str, Any], where: str) -> None:
    for key, value in source.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {key!r} in {where}; known: {', '.join(FIELDS)}")
        try:
            into[name] = _coerce(name, value)
        except ConfigError as e:
            raise ConfigError(f"{e} (in {where})") from None


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> KvbmConfig:
    """Merge `defaults` (a command's own, over the built-in ones), a TOML file,
    KVBM_* variables and overrides (flags, connector extra config), later
    winning. Raises ConfigError naming the bad setting."""
    values: dict[str, Any] = {}
    _merge(values, defaults or {}, "defaults")
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        _merge(values, data, path)
    environ = os.environ if env is None else env
    from_env = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name in FIELDS:
            from_env[name] = value
        elif var not in NOT_SETTINGS:
            # Other tools may share the prefix: a typo is logged, never fatal.
            log.warning("ignoring unknown environment variable %s", var)
    _merge(values, from_env, "the environment")
    _merge(values, {k: v for k, v in (overrides or {}).items() if v is not None}, "overrides")
    return KvbmConfig(**values)


def engine_config(extra: Mapping[str, Any]) -> KvbmConfig:
    """An engine connector's configuration: defaults < the file named by
    KVBM_CONFIG < KVBM_* < the connector's extra config, where `node` names
    the socket."""
    overrides = dict(extra)
    if "node" in overrides:
        overrides["socket"] = overrides.pop("node")
    return load_config(os.environ.get(CONFIG_FILE_VAR), overrides=overrides)


def quiet_native_logs() -> None:
    """NIXL logs every agent's start at INFO unless its variable says otherwise:
    kvbm's processes set it (where the user has not) before NIXL loads."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")


def child_environment() -> dict[str, str]:
    """The environment of a child that must not hold the node's secrets (its
    NIXL agent process): this one without kvbm's own variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def bind_native_transport(listen_host: str) -> None:
    """Keep UCX (under NIXL) on the interface of the node's listen address,
    unless the user chose its devices (transport/net_devices.py); called
    before NIXL loads."""
    pin_ucx_devices(listen_host, os.environ.get(UCX_DEVICES_VAR))
