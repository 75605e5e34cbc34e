"""TLS for the listening ports: one server context per port, its certificate reloadable in place.

A reload (SIGHUP) loads the new certificate chain and key into the same `SSLContext` the listener uses, so the
handshakes that follow present the new certificate while connections already open keep theirs and go on
undisturbed. The pair is first loaded into a throwaway context: a missing file, a bad PEM or a key that does
not match leaves the running certificate in place (a half-loaded live context would fail every handshake).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

log = logging.getLogger(__name__)


def _new_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


class ServerTls:
    """A server `SSLContext` for one port and the PEM files it was loaded from."""

    def __init__(self, name: str, cert: Path, key: Path) -> None:
        self.name = name
        self._cert = cert
        self._key = key
        self.context = _new_context()
        self.context.load_cert_chain(cert, key)

    def reload(self) -> bool:
        """Load the files again for new handshakes; on any error keep serving the current certificate."""
        try:
            _new_context().load_cert_chain(self._cert, self._key)
            self.context.load_cert_chain(self._cert, self._key)
        except (OSError, ssl.SSLError) as error:
            log.error(
                "%s TLS certificate not reloaded, the current one stays: %s",
                self.name,
                getattr(error, "strerror", None) or error,
            )
            return False
        log.info("%s TLS certificate reloaded from %s", self.name, self._cert)
        return True
