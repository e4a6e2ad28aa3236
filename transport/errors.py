"""One exception root for the transport."""


class TransportError(Exception):
    """Root of every error the transport raises on purpose."""


class ProtocolError(TransportError):
    """A frame that is not ours: the connection that sent it is closed."""


class AuthError(ProtocolError):
    """A frame whose HMAC, timestamp or nonce does not check out."""


class VersionError(TransportError):
    """A peer whose protocol version this side does not talk to, or that
    does not talk to ours (the peer said so, proving the secret); the
    message names both versions."""
