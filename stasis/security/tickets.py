"""Migration tickets: the controller's signed, short-lived, single-use permission for one agent to
fetch one checkpoint from another.

Agents serve only the controller, with one exception: during a direct migration the destination
agent fetches the checkpoint from the source agent itself. The source lets it do so only with a
ticket that the controller signed with its TLS key for exactly that job, checkpoint, source and
destination, that has not expired, and that was not used before.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
import time
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stasis.errors import PermissionDenied
from stasis.security.pki import verify_issued_by, identity_of
from stasis.security.revocation import DenyList
from stasis.security.tls import Transport

TTL = 300.0   # seconds: long enough for a large dump to finish before the fetch starts


def mint(transport: Transport, job: str, checkpoint: str, source: str, destination: str,
         ttl: float = TTL) -> bytes:
    """A ticket signed with the controller's key (empty without TLS: --insecure checks nothing)."""
    if not transport.secure:
        return b""
    material = transport.material()
    key = serialization.load_pem_private_key(material.key, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    body = json.dumps({"job": job, "checkpoint": checkpoint, "source": source, "destination": destination,
                       "expires": time.time() + ttl, "nonce": os.urandom(16).hex()}, sort_keys=True).encode()
    sig = key.sign(body, ec.ECDSA(hashes.SHA256()))
    return json.dumps({"body": base64.b64encode(body).decode(), "sig": base64.b64encode(sig).decode(),
                       "cert": material.cert.decode()}).encode()


class TicketChecker:
    """The source agent's side: verify, then remember the nonce so the ticket works once."""

    def __init__(self, cas: Callable[[], list[x509.Certificate]], deny: DenyList, host: str):
        self.cas = cas
        self.deny = deny
        self.host = host
        self._used: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, ticket: bytes, checkpoint: str, caller: str, spend: bool = True) -> dict:
        """`caller` is the peer agent's host name from its certificate. A ticket opens one transfer:
        its nonce is spent; `spend=False` checks it without spending it, for a call about the transfer
        it opened (the fetcher declining the bulk channel)."""
        try:
            outer = json.loads(ticket)
            body = base64.b64decode(outer["body"], validate=True)
            sig = base64.b64decode(outer["sig"], validate=True)
            cert = x509.load_pem_x509_certificate(outer["cert"].encode())
            verify_issued_by(cert, self.cas(), dt.datetime.now(dt.timezone.utc))
            signer = identity_of(cert)
            if signer.kind != "controller" or self.deny.denied(signer) is not None:
                raise ValueError(f"signed by {signer.principal}, not by a valid controller")
            public = cert.public_key()
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise ValueError("the controller's key is not an EC key")
            public.verify(sig, body, ec.ECDSA(hashes.SHA256()))
            claims = json.loads(body)
            if not isinstance(claims, dict):
                raise ValueError("malformed claims")
        except InvalidSignature:
            raise PermissionDenied("migration ticket refused: its signature does not verify") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PermissionDenied(f"migration ticket refused: {exc}") from None
        expected = {"checkpoint": checkpoint, "source": self.host, "destination": caller}
        for field, value in expected.items():
            if claims.get(field) != value:
                raise PermissionDenied(f"migration ticket refused: it is for {field} {claims.get(field)!r}, "
                                       f"not {value!r}")
        now = time.time()
        if not isinstance(claims.get("expires"), (int, float)) or claims["expires"] < now:
            raise PermissionDenied("migration ticket refused: it has expired")
        if not spend:
            return claims
        nonce = str(claims.get("nonce", ""))
        with self._lock:
            self._used = {n: t for n, t in self._used.items() if t > now}   # forget expired ones
            if not nonce or nonce in self._used:
                raise PermissionDenied("migration ticket refused: it was used before (a replay)")
            self._used[nonce] = float(claims["expires"])
        return claims
