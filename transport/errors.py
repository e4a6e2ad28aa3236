"""One exception root for the transport."""


class TransportError(Exception):
    """Root of every error the transport raises on purpose."""


class ProtocolError(TransportError):
    """A frame that is not ours: the connection that sent it is closed."""


class AuthError(ProtocolError):
    """A frame whose HMAC, timestamp or nonce does not check out."""
