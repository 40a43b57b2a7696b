"""Sealing objects (AES-256-GCM, or nothing for an unencrypted repository) and keyed chunk ids.

Every object except the config envelope, key files and locks is sealed; see
docs/repository-format.md. A failed authentication is an IntegrityError, never a crash.
"""

from __future__ import annotations

import os

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stasis.errors import IntegrityError

NONCE = 12


class Sealer:
    """Unencrypted: sealing is the identity; ids are still keyed (with a key stored in the config)."""

    encrypted = False
    scheme = "none"

    def __init__(self, id_key: bytes):
        if len(id_key) != 32:
            raise ValueError("id key must be 32 bytes")
        self._id_key = id_key
        self._keyed = blake3.blake3(key=id_key)   # copying a keyed state is cheaper than keying anew

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        h = self._keyed.copy()
        h.update(data)
        return h.digest()

    def name_of(self, text: str) -> str:
        """A keyed name for a public identifier (image ids), so keys reveal nothing."""
        return blake3.blake3(text.encode(), key=self._id_key).hexdigest()

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return bytes(plaintext)

    def open(self, blob: bytes, aad: bytes, what: str) -> bytes:
        return bytes(blob)


class AeadSealer(Sealer):
    encrypted = True
    scheme = "aes-256-gcm"

    def __init__(self, encryption_key: bytes, id_key: bytes):
        super().__init__(id_key)
        self._aead = AESGCM(encryption_key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        # Random 96-bit nonces: safe for far more objects than a repository will ever hold.
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes, what: str) -> bytes:
        if len(blob) < NONCE + 16:
            raise IntegrityError(f"{what} is truncated")
        try:
            return self._aead.decrypt(bytes(blob[:NONCE]), bytes(blob[NONCE:]), aad)
        except InvalidTag:
            raise IntegrityError(f"{what} failed authentication: it was damaged or tampered with") from None


def content_hash(data: bytes | memoryview) -> str:
    """Unkeyed BLAKE3 of stored bytes (ciphertext): the name of packs and index files."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) > (4 << 20) else 1).hexdigest()
