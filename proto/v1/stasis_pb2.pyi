from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PhaseTiming(_message.Message):
    __slots__ = ("name", "seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    seconds: float
    def __init__(self, name: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "message", "bytes_done", "bytes_total")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    phase: str
    message: str
    bytes_done: int
    bytes_total: int
    def __init__(self, phase: _Optional[str] = ..., message: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class Container(_message.Message):
    __slots__ = ("id", "name", "image", "image_id", "state", "host", "created", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    image: str
    image_id: str
    state: str
    host: str
    created: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., image: _Optional[str] = ..., image_id: _Optional[str] = ..., state: _Optional[str] = ..., host: _Optional[str] = ..., created: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("name", "agent_version", "kernel", "arch", "runtime", "runtime_version", "criu_version", "criu_features", "cpu_flags", "work_free_bytes", "pre_copy_possible", "engine_api_version", "engine_experimental")
    class CriuFeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    CRIU_VERSION_FIELD_NUMBER: _ClassVar[int]
    CRIU_FEATURES_FIELD_NUMBER: _ClassVar[int]
    CPU_FLAGS_FIELD_NUMBER: _ClassVar[int]
    WORK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRE_COPY_POSSIBLE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_API_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_EXPERIMENTAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    agent_version: str
    kernel: str
    arch: str
    runtime: str
    runtime_version: str
    criu_version: str
    criu_features: _containers.ScalarMap[str, bool]
    cpu_flags: _containers.RepeatedScalarFieldContainer[str]
    work_free_bytes: int
    pre_copy_possible: bool
    engine_api_version: str
    engine_experimental: bool
    def __init__(self, name: _Optional[str] = ..., agent_version: _Optional[str] = ..., kernel: _Optional[str] = ..., arch: _Optional[str] = ..., runtime: _Optional[str] = ..., runtime_version: _Optional[str] = ..., criu_version: _Optional[str] = ..., criu_features: _Optional[_Mapping[str, bool]] = ..., cpu_flags: _Optional[_Iterable[str]] = ..., work_free_bytes: _Optional[int] = ..., pre_copy_possible: _Optional[bool] = ..., engine_api_version: _Optional[str] = ..., engine_experimental: _Optional[bool] = ...) -> None: ...

class CheckpointSummary(_message.Message):
    __slots__ = ("id", "created", "host", "container_name", "container_id", "image", "image_id", "runtime", "criu_version", "size_bytes", "image_bytes", "leave_running", "timings", "tags", "new_bytes")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    CRIU_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEAVE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    NEW_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    created: str
    host: str
    container_name: str
    container_id: str
    image: str
    image_id: str
    runtime: str
    criu_version: str
    size_bytes: int
    image_bytes: int
    leave_running: bool
    timings: _containers.RepeatedCompositeFieldContainer[PhaseTiming]
    tags: _containers.ScalarMap[str, str]
    new_bytes: int
    def __init__(self, id: _Optional[str] = ..., created: _Optional[str] = ..., host: _Optional[str] = ..., container_name: _Optional[str] = ..., container_id: _Optional[str] = ..., image: _Optional[str] = ..., image_id: _Optional[str] = ..., runtime: _Optional[str] = ..., criu_version: _Optional[str] = ..., size_bytes: _Optional[int] = ..., image_bytes: _Optional[int] = ..., leave_running: _Optional[bool] = ..., timings: _Optional[_Iterable[_Union[PhaseTiming, _Mapping]]] = ..., tags: _Optional[_Mapping[str, str]] = ..., new_bytes: _Optional[int] = ...) -> None: ...

class Revocation(_message.Message):
    __slots__ = ("principal", "serial", "before", "reason")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    principal: str
    serial: str
    before: str
    reason: str
    def __init__(self, principal: _Optional[str] = ..., serial: _Optional[str] = ..., before: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PageBytes(_message.Message):
    __slots__ = ("checkpoint_id", "ticket", "data", "end")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    ticket: bytes
    data: bytes
    end: bool
    def __init__(self, checkpoint_id: _Optional[str] = ..., ticket: _Optional[bytes] = ..., data: _Optional[bytes] = ..., end: _Optional[bool] = ...) -> None: ...

class MigrationNeeds(_message.Message):
    __slots__ = ("container", "cpuinfo", "memory_bytes", "pool_pages")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    CPUINFO_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_PAGES_FIELD_NUMBER: _ClassVar[int]
    container: str
    cpuinfo: bytes
    memory_bytes: int
    pool_pages: bool
    def __init__(self, container: _Optional[str] = ..., cpuinfo: _Optional[bytes] = ..., memory_bytes: _Optional[int] = ..., pool_pages: _Optional[bool] = ...) -> None: ...

class CheckMigrationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint_id", "ticket", "zstd", "bulk")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    ZSTD_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    ticket: bytes
    zstd: bool
    bulk: bool
    def __init__(self, checkpoint_id: _Optional[str] = ..., ticket: _Optional[bytes] = ..., zstd: _Optional[bool] = ..., bulk: _Optional[bool] = ...) -> None: ...

class BulkOffer(_message.Message):
    __slots__ = ("port", "token")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    port: int
    token: bytes
    def __init__(self, port: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class DeclineBulkRequest(_message.Message):
    __slots__ = ("checkpoint_id", "ticket", "token", "reason")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    ticket: bytes
    token: bytes
    reason: str
    def __init__(self, checkpoint_id: _Optional[str] = ..., ticket: _Optional[bytes] = ..., token: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class DeclineBulkResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TransferChunk(_message.Message):
    __slots__ = ("offer", "data", "seal", "zdata", "bulk")
    OFFER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    ZDATA_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    offer: bytes
    data: bytes
    seal: bytes
    zdata: bytes
    bulk: BulkOffer
    def __init__(self, offer: _Optional[bytes] = ..., data: _Optional[bytes] = ..., seal: _Optional[bytes] = ..., zdata: _Optional[bytes] = ..., bulk: _Optional[_Union[BulkOffer, _Mapping]] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("container", "argv", "timeout_seconds")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    container: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    timeout_seconds: float
    def __init__(self, container: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class ExecResponse(_message.Message):
    __slots__ = ("exit_code", "output")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    output: str
    def __init__(self, exit_code: _Optional[int] = ..., output: _Optional[str] = ...) -> None: ...

class GetHostInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListContainersRequest(_message.Message):
    __slots__ = ("all",)
    ALL_FIELD_NUMBER: _ClassVar[int]
    all: bool
    def __init__(self, all: _Optional[bool] = ...) -> None: ...

class ListContainersResponse(_message.Message):
    __slots__ = ("containers",)
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[Container]
    def __init__(self, containers: _Optional[_Iterable[_Union[Container, _Mapping]]] = ...) -> None: ...

class InspectContainerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AgentCheckpointRequest(_message.Message):
    __slots__ = ("operation_id", "container", "leave_running", "repository", "checkpoint_id", "tags", "direct", "ignore_volumes", "post_copy")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    LEAVE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    IGNORE_VOLUMES_FIELD_NUMBER: _ClassVar[int]
    POST_COPY_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    container: str
    leave_running: bool
    repository: str
    checkpoint_id: str
    tags: _containers.ScalarMap[str, str]
    direct: bool
    ignore_volumes: bool
    post_copy: bool
    def __init__(self, operation_id: _Optional[str] = ..., container: _Optional[str] = ..., leave_running: _Optional[bool] = ..., repository: _Optional[str] = ..., checkpoint_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., direct: _Optional[bool] = ..., ignore_volumes: _Optional[bool] = ..., post_copy: _Optional[bool] = ...) -> None: ...

class AgentRestoreRequest(_message.Message):
    __slots__ = ("operation_id", "checkpoint_id", "repository", "name", "peer_host", "peer_address", "ticket", "ignore_volumes", "post_copy", "page_ticket")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_HOST_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    IGNORE_VOLUMES_FIELD_NUMBER: _ClassVar[int]
    POST_COPY_FIELD_NUMBER: _ClassVar[int]
    PAGE_TICKET_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    checkpoint_id: str
    repository: str
    name: str
    peer_host: str
    peer_address: str
    ticket: bytes
    ignore_volumes: bool
    post_copy: bool
    page_ticket: bytes
    def __init__(self, operation_id: _Optional[str] = ..., checkpoint_id: _Optional[str] = ..., repository: _Optional[str] = ..., name: _Optional[str] = ..., peer_host: _Optional[str] = ..., peer_address: _Optional[str] = ..., ticket: _Optional[bytes] = ..., ignore_volumes: _Optional[bool] = ..., post_copy: _Optional[bool] = ..., page_ticket: _Optional[bytes] = ...) -> None: ...

class AgentEvent(_message.Message):
    __slots__ = ("progress", "checkpoint", "restored")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    checkpoint: CheckpointSummary
    restored: RestoreResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointSummary, _Mapping]] = ..., restored: _Optional[_Union[RestoreResult, _Mapping]] = ...) -> None: ...

class RestoreResult(_message.Message):
    __slots__ = ("container", "timings")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    container: Container
    timings: _containers.RepeatedCompositeFieldContainer[PhaseTiming]
    def __init__(self, container: _Optional[_Union[Container, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[PhaseTiming, _Mapping]]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveContainerRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WhoAmIResponse(_message.Message):
    __slots__ = ("principal", "role", "serial", "not_after", "tls")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    principal: str
    role: str
    serial: str
    not_after: str
    tls: bool
    def __init__(self, principal: _Optional[str] = ..., role: _Optional[str] = ..., serial: _Optional[str] = ..., not_after: _Optional[str] = ..., tls: _Optional[bool] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("target", "reason")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    target: str
    reason: str
    def __init__(self, target: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListRevocationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRevocationsResponse(_message.Message):
    __slots__ = ("revocations",)
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    revocations: _containers.RepeatedCompositeFieldContainer[Revocation]
    def __init__(self, revocations: _Optional[_Iterable[_Union[Revocation, _Mapping]]] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("since", "principal", "limit")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    since: str
    principal: str
    limit: int
    def __init__(self, since: _Optional[str] = ..., principal: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("time", "principal", "role", "method", "target", "code", "message", "seconds", "job_id")
    class TargetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TIME_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    time: str
    principal: str
    role: str
    method: str
    target: _containers.ScalarMap[str, str]
    code: str
    message: str
    seconds: float
    job_id: str
    def __init__(self, time: _Optional[str] = ..., principal: _Optional[str] = ..., role: _Optional[str] = ..., method: _Optional[str] = ..., target: _Optional[_Mapping[str, str]] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., seconds: _Optional[float] = ..., job_id: _Optional[str] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class RetentionPolicy(_message.Message):
    __slots__ = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_within_seconds")
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    KEEP_HOURLY_FIELD_NUMBER: _ClassVar[int]
    KEEP_DAILY_FIELD_NUMBER: _ClassVar[int]
    KEEP_WEEKLY_FIELD_NUMBER: _ClassVar[int]
    KEEP_MONTHLY_FIELD_NUMBER: _ClassVar[int]
    KEEP_WITHIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    keep_last: int
    keep_hourly: int
    keep_daily: int
    keep_weekly: int
    keep_monthly: int
    keep_within_seconds: float
    def __init__(self, keep_last: _Optional[int] = ..., keep_hourly: _Optional[int] = ..., keep_daily: _Optional[int] = ..., keep_weekly: _Optional[int] = ..., keep_monthly: _Optional[int] = ..., keep_within_seconds: _Optional[float] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("name", "selector", "labels", "every_seconds", "cron", "retention", "pre_hook", "post_hook", "hook_timeout_seconds", "hook_on_error", "paused", "last_run", "next_run", "last_result")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CRON_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    PRE_HOOK_FIELD_NUMBER: _ClassVar[int]
    POST_HOOK_FIELD_NUMBER: _ClassVar[int]
    HOOK_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HOOK_ON_ERROR_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    LAST_RUN_FIELD_NUMBER: _ClassVar[int]
    NEXT_RUN_FIELD_NUMBER: _ClassVar[int]
    LAST_RESULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    selector: str
    labels: _containers.ScalarMap[str, str]
    every_seconds: float
    cron: str
    retention: RetentionPolicy
    pre_hook: str
    post_hook: str
    hook_timeout_seconds: float
    hook_on_error: str
    paused: bool
    last_run: str
    next_run: str
    last_result: str
    def __init__(self, name: _Optional[str] = ..., selector: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., every_seconds: _Optional[float] = ..., cron: _Optional[str] = ..., retention: _Optional[_Union[RetentionPolicy, _Mapping]] = ..., pre_hook: _Optional[str] = ..., post_hook: _Optional[str] = ..., hook_timeout_seconds: _Optional[float] = ..., hook_on_error: _Optional[str] = ..., paused: _Optional[bool] = ..., last_run: _Optional[str] = ..., next_run: _Optional[str] = ..., last_result: _Optional[str] = ...) -> None: ...

class ScheduleName(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListSchedulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSchedulesResponse(_message.Message):
    __slots__ = ("schedules",)
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    schedules: _containers.RepeatedCompositeFieldContainer[Schedule]
    def __init__(self, schedules: _Optional[_Iterable[_Union[Schedule, _Mapping]]] = ...) -> None: ...

class PauseScheduleRequest(_message.Message):
    __slots__ = ("name", "paused")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    paused: bool
    def __init__(self, name: _Optional[str] = ..., paused: _Optional[bool] = ...) -> None: ...

class DeleteScheduleResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunScheduleResponse(_message.Message):
    __slots__ = ("job_ids",)
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("schedule", "container", "policy", "dry_run", "prune")
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    schedule: str
    container: str
    policy: RetentionPolicy
    dry_run: bool
    prune: bool
    def __init__(self, schedule: _Optional[str] = ..., container: _Optional[str] = ..., policy: _Optional[_Union[RetentionPolicy, _Mapping]] = ..., dry_run: _Optional[bool] = ..., prune: _Optional[bool] = ...) -> None: ...

class ForgetResponse(_message.Message):
    __slots__ = ("kept", "forgotten", "reasons", "bytes_freed")
    class ReasonsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEPT_FIELD_NUMBER: _ClassVar[int]
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    kept: _containers.RepeatedScalarFieldContainer[str]
    forgotten: _containers.RepeatedScalarFieldContainer[str]
    reasons: _containers.ScalarMap[str, str]
    bytes_freed: int
    def __init__(self, kept: _Optional[_Iterable[str]] = ..., forgotten: _Optional[_Iterable[str]] = ..., reasons: _Optional[_Mapping[str, str]] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class RegisterAgentRequest(_message.Message):
    __slots__ = ("name", "address", "info")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    info: HostInfo
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., info: _Optional[_Union[HostInfo, _Mapping]] = ...) -> None: ...

class RegisterAgentResponse(_message.Message):
    __slots__ = ("repository", "heartbeat_seconds", "revocations")
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    repository: str
    heartbeat_seconds: float
    revocations: _containers.RepeatedCompositeFieldContainer[Revocation]
    def __init__(self, repository: _Optional[str] = ..., heartbeat_seconds: _Optional[float] = ..., revocations: _Optional[_Iterable[_Union[Revocation, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "revocations")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    revocations: _containers.RepeatedCompositeFieldContainer[Revocation]
    def __init__(self, known: _Optional[bool] = ..., revocations: _Optional[_Iterable[_Union[Revocation, _Mapping]]] = ...) -> None: ...

class Host(_message.Message):
    __slots__ = ("name", "address", "state", "last_seen", "info")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    state: str
    last_seen: str
    info: HostInfo
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., last_seen: _Optional[str] = ..., info: _Optional[_Union[HostInfo, _Mapping]] = ...) -> None: ...

class ListHostsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHostsResponse(_message.Message):
    __slots__ = ("hosts",)
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[Host]
    def __init__(self, hosts: _Optional[_Iterable[_Union[Host, _Mapping]]] = ...) -> None: ...

class ControllerListContainersRequest(_message.Message):
    __slots__ = ("host", "all")
    HOST_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    host: str
    all: bool
    def __init__(self, host: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("request_id", "host", "container", "leave_running")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    LEAVE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    host: str
    container: str
    leave_running: bool
    def __init__(self, request_id: _Optional[str] = ..., host: _Optional[str] = ..., container: _Optional[str] = ..., leave_running: _Optional[bool] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("request_id", "checkpoint_id", "host", "name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    checkpoint_id: str
    host: str
    name: str
    def __init__(self, request_id: _Optional[str] = ..., checkpoint_id: _Optional[str] = ..., host: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("request_id", "host", "container", "to", "transfer", "ignore_volumes", "post_copy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    IGNORE_VOLUMES_FIELD_NUMBER: _ClassVar[int]
    POST_COPY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    host: str
    container: str
    to: str
    transfer: str
    ignore_volumes: bool
    post_copy: bool
    def __init__(self, request_id: _Optional[str] = ..., host: _Optional[str] = ..., container: _Optional[str] = ..., to: _Optional[str] = ..., transfer: _Optional[str] = ..., ignore_volumes: _Optional[bool] = ..., post_copy: _Optional[bool] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("container", "host", "schedule")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    container: str
    host: str
    schedule: str
    def __init__(self, container: _Optional[str] = ..., host: _Optional[str] = ..., schedule: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointSummary]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointSummary, _Mapping]]] = ...) -> None: ...

class GetCheckpointRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "state", "phase", "timings", "error", "params", "result", "created", "updated", "downtime_seconds")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ResultEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    state: str
    phase: str
    timings: _containers.RepeatedCompositeFieldContainer[PhaseTiming]
    error: str
    params: _containers.ScalarMap[str, str]
    result: _containers.ScalarMap[str, str]
    created: str
    updated: str
    downtime_seconds: float
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., phase: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[PhaseTiming, _Mapping]]] = ..., error: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ..., result: _Optional[_Mapping[str, str]] = ..., created: _Optional[str] = ..., updated: _Optional[str] = ..., downtime_seconds: _Optional[float] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job", "progress")
    JOB_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    job: Job
    progress: Progress
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...
