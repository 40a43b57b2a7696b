"""Checkpoint manifests: what a checkpoint is made of, parsed strictly.

A manifest is read back from storage, so it is untrusted: every field is type-checked and every
object it names is a well-formed chunk id before anything uses it. See docs/repository-format.md.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import zstandard

from stasis.errors import IntegrityError

FORMAT = "stasis-checkpoint"
VERSION = 2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHECKPOINT_ID = re.compile(r"^[0-9a-f]{16}$")
ID_BYTES = 32


@dataclass(frozen=True)
class Artifact:
    """One file (the runtime's checkpoint archive, an image archive) as its ordered chunks.

    Chunk ids are kept packed (32 bytes each) and sizes run-length encoded: a 1 GiB archive in
    4 KiB chunks has 262 144 of them.
    """

    size: int
    ids: bytes                                   # concatenated 32-byte keyed BLAKE3 ids
    sizes: tuple[tuple[int, int], ...]           # runs of (chunk size, count)
    media_type: str = "application/x-tar"

    @classmethod
    def build(cls, chunks: Iterable[tuple[bytes, int]], media_type: str = "application/x-tar") -> "Artifact":
        """From (id, size) pairs, consumed as they come (a generator keeps only ids and runs)."""
        ids = bytearray()
        runs: list[list[int]] = []
        total = 0
        for chunk_id, size in chunks:
            ids += chunk_id
            total += size
            if runs and runs[-1][0] == size:
                runs[-1][1] += 1
            else:
                runs.append([size, 1])
        return cls(total, bytes(ids), tuple((s, n) for s, n in runs), media_type)

    @property
    def count(self) -> int:
        return len(self.ids) // ID_BYTES

    def chunks(self) -> Iterator[tuple[bytes, int]]:
        i = 0
        for size, n in self.sizes:
            for _ in range(n):
                yield self.ids[i:i + ID_BYTES], size
                i += ID_BYTES

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "media_type": self.media_type,
                "ids": base64.b64encode(self.ids).decode(), "sizes": [list(r) for r in self.sizes]}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Artifact":
        _expect(isinstance(data, dict), where, "must be an object")
        size = _int(data.get("size"), f"{where}.size")
        media = data.get("media_type", "application/x-tar")
        _expect(isinstance(media, str), f"{where}.media_type", "must be a string")
        try:
            ids = base64.b64decode(data.get("ids"), validate=True)
        except (TypeError, ValueError):
            ids = None
        _expect(ids is not None and len(ids) % ID_BYTES == 0, f"{where}.ids", "are malformed")
        runs = data.get("sizes")
        _expect(isinstance(runs, list), f"{where}.sizes", "must be a list")
        sizes = []
        for i, run in enumerate(runs):
            _expect(isinstance(run, list) and len(run) == 2, f"{where}.sizes[{i}]", "must be [size, count]")
            sizes.append((_int(run[0], f"{where}.sizes[{i}]"), _int(run[1], f"{where}.sizes[{i}]")))
        _expect(sum(n for _, n in sizes) * ID_BYTES == len(ids), f"{where}.sizes", "do not match the ids")
        _expect(sum(s * n for s, n in sizes) == size, f"{where}.size", "differs from the sum of its chunks")
        return cls(size, ids, tuple(sizes), media)


@dataclass(frozen=True)
class ContainerRef:
    id: str
    name: str
    image: str
    image_id: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    id: str
    created: str
    host: str
    runtime: str
    runtime_version: str
    criu_version: str
    container: ContainerRef
    leave_running: bool
    checkpoint: Artifact
    image: Artifact | None
    timings: dict[str, float]
    criu_stats: dict[str, int]
    operation_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)   # e.g. schedule=nightly
    new_bytes: int = 0                                     # stored bytes this checkpoint added
    # The source agent's provenance signature over signed_bytes(): {"alg", "cert", "sig"}.
    signature: dict[str, str] | None = None
    # As read back: the exact bytes the signature must cover (set by from_bytes, not compared).
    parsed_body: bytes = field(default=b"", compare=False, repr=False)

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "id": self.id, "created": self.created,
            "host": self.host, "runtime": self.runtime, "runtime_version": self.runtime_version,
            "criu_version": self.criu_version, "operation_id": self.operation_id,
            "container": asdict(self.container), "leave_running": self.leave_running,
            "artifacts": {"checkpoint": self.checkpoint.to_json(),
                          "image": self.image.to_json() if self.image else None},
            "timings": self.timings, "criu_stats": self.criu_stats, "tags": self.tags,
            "new_bytes": self.new_bytes,
        }

    def signed_bytes(self) -> bytes:
        """What the provenance signature covers: every field but the signature, canonical JSON.

        Read back, it is re-derived from the parsed JSON itself, not from the fields, so a signature
        never depends on how this version of stasis normalises a value.
        """
        return self.parsed_body or _canonical(self.body())

    def to_bytes(self) -> bytes:
        """The manifest's JSON; the repository seals it (docs/repository-format.md)."""
        body = self.body()
        if self.signature is not None:
            body["signature"] = self.signature
        # Compressed: the chunk list of a large checkpoint is megabytes of JSON.
        return zstandard.ZstdCompressor().compress(_canonical(body))

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "manifest") -> "Manifest":
        try:
            data = json.loads(zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 30))
        except (ValueError, UnicodeDecodeError, zstandard.ZstdError):
            raise IntegrityError(f"{where} is not valid JSON: the repository is damaged") from None
        _expect(isinstance(data, dict), where, "must be an object")
        _expect(data.get("format") == FORMAT, f"{where}.format", f"is not {FORMAT!r}")
        _expect(data.get("version") == VERSION, f"{where}.version",
                f"is {data.get('version')!r}; this stasis reads version {VERSION}: upgrade stasis")
        ident = _str(data.get("id"), f"{where}.id")
        _expect(bool(CHECKPOINT_ID.match(ident)), f"{where}.id", "is malformed")
        c = data.get("container")
        _expect(isinstance(c, dict), f"{where}.container", "must be an object")
        labels = c.get("labels") or {}
        _expect(isinstance(labels, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in labels.items()),
                f"{where}.container.labels", "must map strings to strings")
        container = ContainerRef(*(_str(c.get(k), f"{where}.container.{k}")
                                   for k in ("id", "name", "image", "image_id")), labels=labels)
        # Ids are handed to podman as arguments: only the shape podman itself produces is accepted.
        for k in ("id", "image_id"):
            _expect(bool(_SHA256.match(getattr(container, k))), f"{where}.container.{k}", "is not a 64-hex id")
        arts = data.get("artifacts")
        _expect(isinstance(arts, dict), f"{where}.artifacts", "must be an object")
        image = arts.get("image")
        signature = data.pop("signature", None)
        _expect(signature is None or (isinstance(signature, dict) and len(signature) <= 8 and all(
            isinstance(k, str) and isinstance(v, str) and len(v) < 16384 for k, v in signature.items())),
            f"{where}.signature", "must map a few names to strings")
        return cls(
            id=ident, created=_str(data.get("created"), f"{where}.created"),
            host=_str(data.get("host"), f"{where}.host"),
            runtime=_str(data.get("runtime"), f"{where}.runtime"),
            runtime_version=_str(data.get("runtime_version"), f"{where}.runtime_version"),
            criu_version=_str(data.get("criu_version"), f"{where}.criu_version"),
            operation_id=_str(data.get("operation_id", ""), f"{where}.operation_id"),
            container=container, leave_running=bool(data.get("leave_running")),
            checkpoint=Artifact.from_json(arts.get("checkpoint"), f"{where}.artifacts.checkpoint"),
            image=None if image is None else Artifact.from_json(image, f"{where}.artifacts.image"),
            timings=_numbers(data.get("timings", {}), f"{where}.timings", float),
            criu_stats=_numbers(data.get("criu_stats", {}), f"{where}.criu_stats", int),
            tags=_tags(data.get("tags", {}), f"{where}.tags"),
            new_bytes=_int(data.get("new_bytes", 0), f"{where}.new_bytes"),
            signature=signature, parsed_body=_canonical(data),
        )


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def _expect(ok: bool, where: str, problem: str) -> None:
    if not ok:
        raise IntegrityError(f"{where} {problem}: the repository is damaged or was written by something else")


def _str(value: Any, where: str) -> str:
    _expect(isinstance(value, str) and len(value) < 4096, where, "must be a short string")
    return value


def _int(value: Any, where: str) -> int:
    _expect(isinstance(value, int) and not isinstance(value, bool) and value >= 0, where,
            "must be a non-negative integer")
    return value


def _tags(value: Any, where: str) -> dict[str, str]:
    _expect(isinstance(value, dict) and len(value) <= 32 and all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 128 and len(v) <= 256 for k, v in value.items()),
        where, "must map at most 32 short strings to strings")
    return dict(value)


def _numbers(value: Any, where: str, kind: type) -> dict:
    _expect(isinstance(value, dict), where, "must be an object")
    out = {}
    for k, v in value.items():
        _expect(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool),
                f"{where}.{k}", "must be a number")
        out[k] = kind(v)
    return out
