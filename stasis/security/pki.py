"""The stasis certificate authority: who is who on every gRPC channel.

One CA (an ECDSA P-256 key kept offline or on the controller's machine) issues three kinds of
certificates, and a certificate says everything the servers need to know about its holder:

  subject CN   the name: a host name for agents, a user name for users, "controller"
  subject OU   the kind: controller, agent or user
  subject O    a user's role: viewer, operator or admin (like Kubernetes' groups in O)
  DNS SAN      NAME.agent.stasis / controller.stasis: what clients check when they dial a daemon
  extension    an agent's Ed25519 public key for signing checkpoint manifests (SIGNING_KEY_OID)

A bundle is a folder holding ca.crt, tls.crt, tls.key (and signing.key for agents); daemons and
the CLI read one with --tls DIR. Re-issuing into the same folder rotates it: daemons notice the
new files and use them for new connections without a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stasis.errors import FailedPrecondition, InvalidArgument

KINDS = ("controller", "agent", "user")
ROLES = ("viewer", "operator", "admin")
# A private OID under the UUID arc (2.25, ITU-T X.667): needs no registration and cannot collide.
SIGNING_KEY_OID = x509.ObjectIdentifier("2.25.286569268311560966694919268152661020")
CONTROLLER_SERVER_NAME = "controller.stasis"
HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")     # a DNS label: it goes into a SAN
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
DEFAULT_DAYS = {"controller": 365, "agent": 365, "user": 90}
CLOCK_SKEW = dt.timedelta(minutes=5)


def agent_server_name(host: str) -> str:
    return f"{host}.agent.stasis"


@dataclass(frozen=True)
class Identity:
    kind: str            # controller, agent, user
    name: str
    role: str            # users: viewer/operator/admin; daemons: ""
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str     # sha256 of the DER certificate, hex

    @property
    def issued(self) -> dt.datetime:
        # This CA backdates notBefore by CLOCK_SKEW for hosts whose clocks lag; undo that to compare
        # with a revocation's time.
        return self.not_before + CLOCK_SKEW

    @property
    def principal(self) -> str:
        return f"{self.kind}:{self.name}"

    def describe(self) -> str:
        return f"{self.principal}" + (f" ({self.role})" if self.role else "")


def _attr(name: x509.Name, oid) -> str:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else ""


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity a certificate states; FailedPrecondition if it is not a stasis certificate."""
    name, kind, role = (_attr(cert.subject, oid) for oid in
                        (NameOID.COMMON_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.ORGANIZATION_NAME))
    if kind not in KINDS or not name or (kind == "user" and role not in ROLES):
        raise FailedPrecondition(f"certificate {cert.subject.rfc4514_string()!r} is not a stasis identity "
                                 f"(issue one with 'stasis certs issue')")
    return Identity(kind=kind, name=name, role=role if kind == "user" else "", serial=cert.serial_number,
                    not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
                    fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest())


@lru_cache(maxsize=256)
def identity_of_pem(pem: bytes) -> Identity:
    # Peers present the same certificate on every call: parse each one once.
    return identity_of(x509.load_pem_x509_certificate(pem))


def check_name(kind: str, name: str) -> str:
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    pattern = USER_NAME if kind == "user" else HOST_NAME
    if kind == "controller" and name != "controller":
        raise InvalidArgument("the controller's certificate is named 'controller'")
    if not pattern.match(name):
        raise InvalidArgument(f"{kind} name {name!r} is invalid: use " +
                              ("letters, digits, '_.@-' (at most 64)" if kind == "user"
                               else "lowercase letters, digits and '-' (a DNS label)"))
    return name


def signing_public_key(cert: x509.Certificate) -> ed25519.Ed25519PublicKey | None:
    try:
        ext = cert.extensions.get_extension_for_oid(SIGNING_KEY_OID)
    except x509.ExtensionNotFound:
        return None
    raw = ext.value.value
    if len(raw) != 32:
        return None
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def verify_issued_by(cert: x509.Certificate, cas: list[x509.Certificate], at: dt.datetime) -> None:
    """Check that one of `cas` signed `cert` and that `cert` was valid at `at` (ValueError if not)."""
    if not cert.not_valid_before_utc - CLOCK_SKEW <= at <= cert.not_valid_after_utc:
        raise ValueError(f"certificate of {cert.subject.rfc4514_string()} was not valid at {at.isoformat()}")
    for ca in cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise ValueError(f"certificate of {cert.subject.rfc4514_string()} was not issued by this stasis CA")


def load_certs(path: str) -> list[x509.Certificate]:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())


def _write(path: str, data: bytes, mode: int) -> None:
    # Written beside and renamed: a daemon reloading the bundle never reads half a key.
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Authority:
    """The CA folder: ca.crt and ca.key (mode 0600)."""

    def __init__(self, folder: str):
        self.folder = folder
        try:
            self.cert = load_certs(os.path.join(folder, "ca.crt"))[0]
            with open(os.path.join(folder, "ca.key"), "rb") as f:
                self.key = serialization.load_pem_private_key(f.read(), None)
        except FileNotFoundError:
            raise FailedPrecondition(f"no stasis CA in {folder}: create one with 'stasis certs init --dir {folder}'") \
                from None
        except (ValueError, IndexError):
            raise FailedPrecondition(f"the CA in {folder} is damaged (ca.crt or ca.key unreadable)") from None

    @classmethod
    def init(cls, folder: str, days: int = 3650, force: bool = False) -> "Authority":
        if os.path.exists(os.path.join(folder, "ca.key")) and not force:
            raise FailedPrecondition(f"{folder} already holds a CA; every certificate it issued depends on it "
                                     f"(remove it yourself to start over)")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stasis CA"),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stasis")])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        _write(os.path.join(folder, "ca.key"), _pem_key(key), 0o600)
        _write(os.path.join(folder, "ca.crt"), _pem_cert(cert), 0o644)
        return cls(folder)

    def bundle_path(self, kind: str, name: str) -> str:
        return os.path.join(self.folder, "controller" if kind == "controller" else f"{kind}s/{name}")

    def issue(self, kind: str, name: str, role: str = "", out: str | None = None, days: int | None = None,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> tuple[str, Identity]:
        """Write a bundle for `kind`/`name` into `out` (default: a folder under the CA's)."""
        check_name(kind, name)
        if kind == "user" and role not in ROLES:
            raise InvalidArgument(f"a user needs --role {'|'.join(ROLES)}")
        if kind != "user" and role:
            raise InvalidArgument("only users have roles")
        now = dt.datetime.now(dt.timezone.utc)
        not_before = not_before or now - CLOCK_SKEW
        not_after = not_after or now + dt.timedelta(days=days or DEFAULT_DAYS[kind])
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name),
                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind)]
        if role:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, role))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([] if kind == "user" else [ExtendedKeyUsageOID.SERVER_AUTH])
        builder = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()),
                                  critical=False))
        if kind != "user":
            server_name = CONTROLLER_SERVER_NAME if kind == "controller" else agent_server_name(name)
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]),
                                            critical=False)
        signing = None
        if kind == "agent":
            signing = ed25519.Ed25519PrivateKey.generate()
            raw = signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            builder = builder.add_extension(x509.UnrecognizedExtension(SIGNING_KEY_OID, raw), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())

        out = out or self.bundle_path(kind, name)
        os.makedirs(out, mode=0o700, exist_ok=True)
        # Keys first, certificate last: a reloading daemon sees a new certificate only with its key.
        if signing is not None:
            _write(os.path.join(out, "signing.key"), _pem_key(signing), 0o600)
        _write(os.path.join(out, "tls.key"), _pem_key(key), 0o600)
        _write(os.path.join(out, "ca.crt"), _pem_cert(self.cert), 0o644)
        _write(os.path.join(out, "tls.crt"), _pem_cert(cert), 0o644)
        return out, identity_of(cert)
