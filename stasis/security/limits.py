"""Input limits for every RPC, applied to each request before any servicer sees it.

Rules go by field name, so a new message gets sensible limits without a line here: names have
the shapes podman and DNS allow, ids are hex, strings, lists and maps have caps, numbers are
finite and not negative. Empty values pass (services decide what is required and say so).
A breach is INVALID_ARGUMENT naming the field, e.g. `MigrateRequest.to`.
"""

from __future__ import annotations

import math
import re

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from stasis.errors import InvalidArgument

CONTAINER = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,127}|[0-9a-f]{12,64})$")
HOST = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SCHEDULE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
HEX_PREFIX = re.compile(r"^[0-9a-f]{1,64}$")
TOKEN = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
ADDRESS = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,255}$")
SELECTOR = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TARGET = re.compile(r"^((controller|agent|user):[A-Za-z0-9_.@-]{1,64}|(0x)?[0-9a-fA-F]{1,40})$")

# (shape, what to say) by field name; "Message.field" entries win over plain field names.
SHAPES: dict[str, tuple[re.Pattern, str]] = {
    "container": (CONTAINER, "a container name or id"),
    "host": (HOST, "a host name (lowercase letters, digits, '-')"),
    "to": (HOST, "a host name (lowercase letters, digits, '-')"),
    "checkpoint_id": (HEX_PREFIX, "a checkpoint id (hex)"),
    "operation_id": (TOKEN, "an id of letters, digits and '_.:@-'"),
    "request_id": (TOKEN, "an id of letters, digits and '_.:@-'"),
    "address": (ADDRESS, "HOST:PORT"),
    "peer_address": (ADDRESS, "HOST:PORT"),
    "peer_host": (HOST, "a host name (lowercase letters, digits, '-')"),
    "transfer": (re.compile(r"^(direct|repository)$"), "direct or repository"),
    "selector": (SELECTOR, "[HOST/]CONTAINER"),
    "schedule": (SCHEDULE, "a schedule name"),
    "target": (TARGET, "KIND:NAME or a certificate serial"),
    "InspectContainerRequest.name": (CONTAINER, "a container name or id"),
    "ResumeRequest.name": (CONTAINER, "a container name or id"),
    "RemoveContainerRequest.name": (CONTAINER, "a container name or id"),
    "RestoreRequest.name": (CONTAINER, "a container name"),
    "AgentRestoreRequest.name": (CONTAINER, "a container name"),
    "RegisterAgentRequest.name": (HOST, "a host name"),
    "HeartbeatRequest.name": (HOST, "a host name"),
    "Schedule.name": (SCHEDULE, "a schedule name"),
    "ScheduleName.name": (SCHEDULE, "a schedule name"),
    "PauseScheduleRequest.name": (SCHEDULE, "a schedule name"),
    "GetCheckpointRequest.id": (HEX_PREFIX, "a checkpoint id (hex)"),
    "GetJobRequest.id": (TOKEN, "a job id"),
}
MAX_STRING = {"pre_hook": 4096, "post_hook": 4096, "repository": 1024, "argv": 4096}
MAX_BYTES = {"ticket": 16384}
DEFAULT_STRING = 1024
MAX_REPEATED = {"argv": 256, "cpu_flags": 512}
DEFAULT_REPEATED = 1024
MAX_MAP = 64
MAX_MAP_KEY, MAX_MAP_VALUE = 128, 1024
MAX_DEPTH = 8
MAX_SECONDS = 10 * 365 * 86400.0
MAX_INT = 1 << 48


def validate(message: Message, path: str = "", depth: int = 0) -> None:
    name = message.DESCRIPTOR.name
    path = path or name
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"{path}: nested too deep")
    for field, value in message.ListFields():
        where = f"{path}.{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _map(value, where)
        elif field.is_repeated:
            cap = MAX_REPEATED.get(field.name, DEFAULT_REPEATED)
            if len(value) > cap:
                raise InvalidArgument(f"{where}: at most {cap} items, got {len(value)}")
            for i, item in enumerate(value):
                _scalar_or_message(name, field, item, f"{where}[{i}]", depth)
        else:
            _scalar_or_message(name, field, value, where, depth)


def _scalar_or_message(owner: str, field: FieldDescriptor, value, where: str, depth: int) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        validate(value, where, depth + 1)
    elif field.type == FieldDescriptor.TYPE_STRING:
        _string(owner, field.name, value, where)
    elif field.type == FieldDescriptor.TYPE_BYTES:
        cap = MAX_BYTES.get(field.name, 1 << 20)
        if len(value) > cap:
            raise InvalidArgument(f"{where}: at most {cap} bytes")
    elif field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if not math.isfinite(value) or value < 0 or value > MAX_SECONDS:
            raise InvalidArgument(f"{where}: must be a finite number between 0 and {MAX_SECONDS:.0f}")
    elif field.type != FieldDescriptor.TYPE_BOOL and field.type != FieldDescriptor.TYPE_ENUM:
        if value < 0 or value > MAX_INT:
            raise InvalidArgument(f"{where}: must be between 0 and {MAX_INT}")


def _string(owner: str, field: str, value: str, where: str) -> None:
    cap = MAX_STRING.get(field, DEFAULT_STRING)
    if len(value) > cap:
        raise InvalidArgument(f"{where}: at most {cap} characters, got {len(value)}")
    if "\x00" in value:
        raise InvalidArgument(f"{where}: must not contain NUL")
    shape = SHAPES.get(f"{owner}.{field}") or SHAPES.get(field)
    if shape and value and not shape[0].match(value):
        raise InvalidArgument(f"{where}: {value[:80]!r} is not {shape[1]}")


def _map(value, where: str) -> None:
    if len(value) > MAX_MAP:
        raise InvalidArgument(f"{where}: at most {MAX_MAP} entries, got {len(value)}")
    for k, v in value.items():
        if isinstance(k, str) and (len(k) > MAX_MAP_KEY or "\x00" in k):
            raise InvalidArgument(f"{where}: key {k[:40]!r}... longer than {MAX_MAP_KEY} characters or has NUL")
        if isinstance(v, str) and (len(v) > MAX_MAP_VALUE or "\x00" in v):
            raise InvalidArgument(f"{where}[{k[:40]!r}]: longer than {MAX_MAP_VALUE} characters or has NUL")
        if isinstance(v, Message):
            validate(v, f"{where}[{k!r}]")
