"""The master key, wrapped under passphrases in key files (several per repository)."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from stasis.errors import FailedPrecondition, IntegrityError, InvalidArgument, PermissionDenied

# scrypt cost: 64 MiB and ~0.2 s per unwrap here; STASIS_SCRYPT_N lowers it for tests only.
SCRYPT_N = int(os.environ.get("STASIS_SCRYPT_N", str(1 << 16)))
_AAD = b"stasis-key"


@dataclass(frozen=True)
class MasterKey:
    encryption_key: bytes
    id_key: bytes

    @classmethod
    def generate(cls) -> "MasterKey":
        return cls(os.urandom(32), os.urandom(32))

    def __repr__(self) -> str:  # never print key material, even in a traceback
        return "MasterKey(<redacted>)"


def _kek(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password.encode())


def wrap(master: MasterKey, password: str, created: str) -> bytes:
    if not password:
        raise InvalidArgument("the password is empty")
    salt, nonce = os.urandom(16), os.urandom(12)
    n, r, p = SCRYPT_N, 8, 1
    data = nonce + AESGCM(_kek(password, salt, n, r, p)).encrypt(
        nonce, master.encryption_key + master.id_key, _AAD)
    doc = {"kdf": "scrypt", "n": n, "r": r, "p": p, "salt": base64.b64encode(salt).decode(),
           "data": base64.b64encode(data).decode(), "created": created, "host": socket.gethostname()}
    return json.dumps(doc, indent=1).encode()


def unwrap(raw: bytes, password: str, where: str) -> MasterKey:
    """The master key from one key file; PermissionDenied when the password does not open it."""
    try:
        doc = json.loads(raw)
        n, r, p = int(doc["n"]), int(doc["r"]), int(doc["p"])
        salt, data = base64.b64decode(doc["salt"]), base64.b64decode(doc["data"])
        # Bounds keep a hostile key file from making us allocate gigabytes or work for minutes.
        ok = (doc["kdf"] == "scrypt" and 1 << 10 <= n <= 1 << 17 and n & (n - 1) == 0 and 1 <= r <= 8
              and 1 <= p <= 2 and len(salt) >= 16 and len(data) == 12 + 64 + 16)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        ok = False
    if not ok:
        raise IntegrityError(f"{where} is not a valid key file")
    try:
        plain = AESGCM(_kek(password, salt, n, r, p)).decrypt(data[:12], data[12:], _AAD)
    except InvalidTag:
        raise PermissionDenied("wrong password for this repository") from None
    return MasterKey(plain[:32], plain[32:])


def read_password(password_file: str | None = None, env: str = "STASIS_PASSWORD",
                  prompt: bool = False, confirm: bool = False) -> str | None:
    """--password-file, else $STASIS_PASSWORD, else (interactive only) a prompt; None if nothing."""
    if password_file:
        try:
            with open(password_file) as f:
                password = f.read().rstrip("\n")
        except OSError as exc:
            raise FailedPrecondition(f"cannot read password file {password_file}: {exc.strerror}") from None
        if not password:
            raise InvalidArgument(f"password file {password_file} is empty")
        return password
    if os.environ.get(env):
        return os.environ[env]
    if prompt and sys.stdin.isatty():
        import getpass

        password = getpass.getpass("repository password: ")
        if confirm and getpass.getpass("repeat password: ") != password:
            raise InvalidArgument("the passwords differ")
        return password
    return None
