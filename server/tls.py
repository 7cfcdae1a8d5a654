"""TLS for the listeners: one certificate and key for HTTP and gRPC (and, if asked, metrics),
and mutual TLS when a client CA is given (clients must then present a certificate it signed)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key, and optionally the client CA."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        """Raise ValueError naming a file that cannot be read or a pair that does not load."""
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key),
                           ("--tls-client-ca", self.client_ca)):  # fmt: skip
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(self.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"TLS files do not load: {exc}") from None

    def uvicorn_options(self) -> dict:
        """uvicorn.Config keywords serving HTTPS (and requiring client certificates for mTLS)."""
        options = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            options |= {"ssl_ca_certs": str(self.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options

    def grpc_context(self) -> ssl.SSLContext:
        """The gRPC listener's TLS: these files, HTTP/2 negotiated by ALPN (gRPC clients insist
        on it), client certificates required when a client CA is given."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        context.set_alpn_protocols(["h2"])
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context
