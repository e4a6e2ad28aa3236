"""One exception root for the index; etcd client errors are translated here."""


class DiscoveryError(Exception):
    """Root of every error the index raises on purpose."""


class IndexUnavailable(DiscoveryError):
    """etcd cannot be reached (the node keeps serving from its mirror)."""
