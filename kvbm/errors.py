"""One exception root for the block manager; caller mistakes raise ValueError."""


class KvbmError(Exception):
    """Root of every error the block manager raises on purpose."""


class GeometryMismatch(KvbmError, ValueError):
    """Engine tensors, an arena or a disk file do not match the model geometry."""


class ArenaError(KvbmError):
    """A shared-memory arena could not be created, sized or attached."""


class DiskTierError(KvbmError):
    """The disk arena could not be created or opened (path, space, foreign file)."""


class NodeError(KvbmError):
    """The node refused an engine's call (its reason is the message), or
    cannot be reached: the engine recomputes, it never fails."""
