"""What can go wrong in getting a response from the upstream; each also a builtin error where one fits."""


class UpstreamError(Exception):
    """Base of every failure to get a response from the upstream."""


class UpstreamConnectError(UpstreamError, ConnectionError):
    """No connection could be opened (refused, unreachable, DNS or TLS failure)."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream was silent for longer than a timeout allows."""


class UpstreamConnectTimeout(UpstreamConnectError, UpstreamTimeout):
    """Opening a connection took longer than `connect_timeout`."""


class UpstreamConnectionError(UpstreamError, ConnectionError):
    """The connection died before the response head arrived."""

    nothing_received = False  # no byte of any response arrived: the request may not have been seen


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer was not valid HTTP/1.1, was unsolicited, or its head was too large."""


class UpstreamBodyError(UpstreamError, ConnectionError):
    """The response body broke off before its end."""


class UpstreamResponseTooLarge(UpstreamError):
    """`read_all` met more bytes than its limit."""
