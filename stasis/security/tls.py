"""Mutual TLS for every stasis channel, with certificates that rotate without a restart.

`Transport` is what daemons and the CLI hold: either a bundle folder (ca.crt, tls.crt, tls.key) or
the explicit `--insecure` mode, which is plaintext and only allowed on loopback addresses.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from stasis.errors import CHANNEL_OPTIONS, FailedPrecondition, InvalidArgument
from stasis.security.pki import Identity, identity_of

log = structlog.get_logger("stasis.tls")
FILES = ("ca.crt", "tls.crt", "tls.key")


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Material:
    ca: bytes
    cert: bytes
    key: bytes
    identity: Identity
    stamp: tuple


def _stamp(folder: str) -> tuple:
    return tuple(os.stat(os.path.join(folder, f)).st_mtime_ns for f in FILES)


def read_bundle(folder: str) -> Material:
    """Read and cross-check a bundle; FailedPrecondition names what is wrong and how to fix it."""
    try:
        stamp = _stamp(folder)
        blobs = {}
        for name in FILES:
            with open(os.path.join(folder, name), "rb") as f:
                blobs[name] = f.read()
    except FileNotFoundError as exc:
        raise FailedPrecondition(f"no TLS bundle in {folder} ({os.path.basename(exc.filename or '')} missing): "
                                 f"issue one with 'stasis certs issue', or pass --insecure on loopback") from None
    except PermissionError:
        raise FailedPrecondition(f"cannot read the TLS bundle in {folder}: permission denied") from None
    try:
        cert = x509.load_pem_x509_certificate(blobs["tls.crt"])
        key = serialization.load_pem_private_key(blobs["tls.key"], None)
        x509.load_pem_x509_certificates(blobs["ca.crt"])
    except ValueError:
        raise FailedPrecondition(f"the TLS bundle in {folder} is damaged (a PEM file does not parse)") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise FailedPrecondition(f"tls.key and tls.crt in {folder} do not belong together (half-written rotation?)")
    return Material(blobs["ca.crt"], blobs["tls.crt"], blobs["tls.key"], identity_of(cert), stamp)


class Transport:
    """A bundle folder, or insecure plaintext (loopback only)."""

    def __init__(self, folder: str | None):
        self.folder = folder
        self._lock = threading.Lock()
        self._material = read_bundle(folder) if folder else None

    @classmethod
    def insecure(cls) -> "Transport":
        return cls(None)

    @property
    def secure(self) -> bool:
        return self.folder is not None

    @property
    def identity(self) -> Identity | None:
        return self.material().identity if self.secure else None

    def material(self) -> Material:
        """The bundle as it is on disk now; a damaged or half-rotated bundle keeps the last good one."""
        assert self.folder is not None and self._material is not None
        with self._lock:
            try:
                if _stamp(self.folder) != self._material.stamp:
                    fresh = read_bundle(self.folder)
                    if fresh.cert != self._material.cert:
                        log.info("TLS bundle rotated", folder=self.folder, serial=fresh.identity.serial,
                                 not_after=fresh.identity.not_after.isoformat())
                    self._material = fresh
            except (OSError, FailedPrecondition) as exc:
                log.warning("TLS bundle unreadable; keeping the previous one", folder=self.folder, error=str(exc))
            return self._material

    def ca_certs(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.material().ca) if self.secure else []

    # ------------------------------------------------------------------ servers

    def listen(self, server: grpc.aio.Server, address: str) -> int:
        """Bind `address`: mutual TLS, or plaintext on loopback with --insecure."""
        if not self.secure and not is_loopback(address):
            raise InvalidArgument(f"--insecure serves plaintext and is allowed on loopback only, not {address}: "
                                  f"give a TLS bundle with --tls")
        try:
            if self.secure:
                port = server.add_secure_port(address, self._server_credentials())
            else:
                log.warning("serving WITHOUT TLS or authentication (--insecure); anyone on this machine "
                            "can call every method", address=address)
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise FailedPrecondition(f"cannot listen on {address}: the address is in use or invalid")
        return port

    def _server_credentials(self) -> grpc.ServerCredentials:
        def config(m: Material):
            return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], root_certificates=m.ca)

        current = [self.material()]

        def fetch():
            # gRPC asks before every handshake: new connections get the rotated bundle, live ones
            # keep theirs.
            fresh = self.material()
            if fresh is current[0]:
                return None
            current[0] = fresh
            return config(fresh)

        return grpc.dynamic_ssl_server_credentials(config(current[0]), fetch, require_client_authentication=True)

    # ------------------------------------------------------------------ clients

    def channel_credentials(self) -> grpc.ChannelCredentials:
        m = self.material()
        return grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert)

    def stamp(self) -> tuple:
        return self.material().stamp if self.secure else ()

    def _options(self, server_name: str) -> list:
        # The peer must prove it is `server_name` (e.g. host-a.agent.stasis), whatever address we dial.
        return [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_name),
                ("grpc.default_authority", server_name)]

    def aio_channel(self, address: str, server_name: str) -> grpc.aio.Channel:
        if not self.secure:
            self._check_insecure_target(address)
            return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(address, self.channel_credentials(), options=self._options(server_name))

    def channel(self, address: str, server_name: str) -> grpc.Channel:
        if not self.secure:
            self._check_insecure_target(address)
            return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        return grpc.secure_channel(address, self.channel_credentials(), options=self._options(server_name))

    @staticmethod
    def _check_insecure_target(address: str) -> None:
        if not is_loopback(address):
            raise InvalidArgument(f"--insecure talks plaintext to loopback only, not {address}: give a TLS "
                                  f"bundle with --tls")


def transport_from_args(folder: str | None, insecure: bool, what: str) -> Transport:
    if insecure:
        return Transport.insecure()
    if not folder:
        raise InvalidArgument(f"{what} needs a TLS bundle: --tls DIR (or $STASIS_TLS); --insecure for "
                              f"plaintext on loopback")
    return Transport(folder)

