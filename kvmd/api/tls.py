"""Server TLS credentials that follow their files: edited or replaced certificates are
picked up at the next handshake, without a restart (SIGHUP forces a re-read)."""

from __future__ import annotations

import logging
import os
import threading

import grpc

log = logging.getLogger(__name__)


class TlsFiles:
    """The server certificate, key and optional client CA, re-read when they change."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._forced = False

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(os.stat(p).st_mtime_ns if p else 0 for p in
                     (self.cert, self.key, self.client_ca))

    def _config(self) -> grpc.ServerCertificateConfiguration:
        def read(path: str) -> bytes:
            with open(path, "rb") as fh:
                return fh.read()
        ca = read(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_certificate_configuration(
            [(read(self.key), read(self.cert))], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before each handshake: a new configuration when files changed."""
        with self._lock:
            try:
                stamp = self._mtimes()
            except OSError as exc:
                log.error("cannot stat TLS files; keeping the current ones",
                          extra={"error": str(exc)})
                return None
            if stamp == self._stamp and not self._forced:
                return None
            try:
                config = self._config()
            except OSError as exc:
                log.error("cannot read TLS files; keeping the current ones",
                          extra={"error": str(exc)})
                return None
            self._stamp, self._forced = stamp, False
            log.info("TLS certificates reloaded", extra={"cert": self.cert})
            return config

    def force_reload(self) -> None:
        with self._lock:
            self._forced = True

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config(), self._fetch,  # type: ignore[arg-type]  # None = unchanged
            require_client_authentication=bool(self.client_ca))
