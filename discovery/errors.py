"""One exception root for the index; etcd client errors are translated here."""


class DiscoveryError(Exception):
    """Root of every error the index raises on purpose."""


class IndexUnavailable(DiscoveryError):
    """etcd cannot be reached (the node keeps serving from its mirror)."""


class DuplicateNode(DiscoveryError):
    """A live node holds this node's id already: two nodes must not share one."""
