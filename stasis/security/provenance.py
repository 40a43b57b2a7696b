"""Checkpoint provenance: the source agent signs every manifest; restoring agents verify it.

The repository's encryption key is shared by everybody who can read checkpoints; with it one could
write a manifest that points at chunks of one's choosing. The signature closes that: it is made
with an Ed25519 key only the source agent holds, whose public half its CA-issued certificate
carries, over the whole manifest (and so, through the keyed chunk ids, over every byte of the
checkpoint). A restoring agent checks it before it downloads anything.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import os
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from stasis.errors import FailedPrecondition, IntegrityError
from stasis.security.pki import Identity, identity_of, signing_public_key, verify_issued_by
from stasis.security.revocation import DenyList
from stasis.storage.manifest import Manifest

ALG = "ed25519"


class Signer:
    """Signs with the agent bundle's signing.key; re-read per checkpoint, so rotation just works."""

    def __init__(self, folder: str):
        self.folder = folder
        self._load()   # fail at start-up, not at the first checkpoint

    def _load(self) -> tuple[ed25519.Ed25519PrivateKey, bytes]:
        try:
            with open(os.path.join(self.folder, "signing.key"), "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
            with open(os.path.join(self.folder, "tls.crt"), "rb") as f:
                pem = f.read()
        except FileNotFoundError as exc:
            raise FailedPrecondition(f"{exc.filename} is missing: agents sign their checkpoints; issue the "
                                     f"bundle with 'stasis certs issue agent NAME'") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise FailedPrecondition(f"{self.folder}/signing.key is not an Ed25519 key")
        cert = x509.load_pem_x509_certificate(pem)
        public = signing_public_key(cert)
        if public is None or public.public_bytes_raw() != key.public_key().public_bytes_raw():
            raise FailedPrecondition(f"signing.key in {self.folder} does not match the key in tls.crt "
                                     f"(re-issue the agent's bundle)")
        return key, pem

    def sign(self, manifest: Manifest) -> Manifest:
        return dataclasses.replace(manifest, signature=self.sign_bytes(manifest.signed_bytes()))

    def sign_bytes(self, body: bytes) -> dict[str, str]:
        key, pem = self._load()
        return {"alg": ALG, "cert": pem.decode(), "sig": base64.b64encode(key.sign(body)).decode()}


class Verifier:
    """Checks a manifest's signature against the CA and the deny list."""

    def __init__(self, cas: Callable[[], list[x509.Certificate]], deny: DenyList, allow_unsigned: bool = False):
        self.cas = cas          # called per check: a rotated CA bundle applies at once
        self.deny = deny
        self.allow_unsigned = allow_unsigned

    def verify(self, manifest: Manifest) -> Identity | None:
        """The signer's identity; IntegrityError when the manifest must not be trusted."""
        return self.verify_document(manifest.signed_bytes(), manifest.signature, manifest.host, manifest.created,
                                    f"checkpoint {manifest.id}")

    def verify_document(self, body: bytes, sig: dict[str, str] | None, host: str, created: str,
                        where: str) -> Identity | None:
        """Check that agent `host` signed `body` (at `created`) with its certificate's key."""
        if sig is None:
            if self.allow_unsigned:
                return None
            raise IntegrityError(f"{where} is not signed by any agent; refusing to restore it (an agent "
                                 f"started with --allow-unsigned accepts it)")
        try:
            if sig.get("alg") != ALG:
                raise ValueError(f"unknown signature algorithm {sig.get('alg')!r}")
            cert = x509.load_pem_x509_certificate(sig.get("cert", "").encode())
            signed_at = dt.datetime.fromisoformat(created)
            if signed_at.tzinfo is None:
                raise ValueError("creation time has no time zone")
            verify_issued_by(cert, self.cas(), signed_at)
            signer = identity_of(cert)
            if signer.kind != "agent" or signer.name != host:
                raise ValueError(f"signed by {signer.principal}, but it claims to come from agent:{host}")
            revoked = self.deny.denied(signer)
            if revoked is not None:
                raise ValueError(f"signer {signer.principal} is revoked ({revoked.describe()})")
            public = signing_public_key(cert)
            if public is None:
                raise ValueError("the signer's certificate carries no signing key")
            public.verify(base64.b64decode(sig.get("sig", ""), validate=True), body)
        except InvalidSignature:
            raise IntegrityError(f"{where}: the signature does not match its contents: it was modified after "
                                 f"agent {host} wrote it; refusing to restore") from None
        except (ValueError, FailedPrecondition) as exc:
            raise IntegrityError(f"{where}: provenance check failed: {exc}; refusing to restore") from None
        return signer
