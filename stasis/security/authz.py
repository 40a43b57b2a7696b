"""Who may call what: one server interceptor in front of every servicer.

For each call it takes the identity from the peer's verified certificate, refuses revoked ones
(UNAUTHENTICATED), checks the method's rule (PERMISSION_DENIED), checks the request's input limits
(INVALID_ARGUMENT), and reports the outcome to an audit sink. A method without a rule is refused:
a new RPC must be classified before anybody can call it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import structlog

from stasis.errors import FailedPrecondition, InvalidArgument
from stasis.security import limits
from stasis.security.pki import ROLES, Identity, identity_of_pem
from stasis.security.revocation import DenyList

log = structlog.get_logger("stasis.authz")

#: The identity of the call being served (servicers read it, e.g. to bind an agent to its name).
CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("stasis_caller", default=None)
# --insecure mode: there is no certificate, so there is nobody to tell apart.
ANONYMOUS = Identity(kind="user", name="insecure", role="admin", serial=0, not_before=None, not_after=None,  # type: ignore[arg-type]
                     fingerprint="")
# Who a refused call is recorded as when its certificate could not be read at all.
UNIDENTIFIED = Identity(kind="user", name="unidentified", role="", serial=0, not_before=None,  # type: ignore[arg-type]
                        not_after=None, fingerprint="")


@dataclass(frozen=True)
class Rule:
    kinds: frozenset[str] = frozenset()       # daemons allowed: "controller", "agent"
    role: str = ""                            # users allowed: this role or a higher one
    # A stricter rule for some requests, e.g. Forget with prune=True needs admin.
    escalate: Callable[[Any], str] | None = field(default=None, compare=False)

    def admits(self, ident: Identity, request) -> str | None:
        """None when `ident` may make this call, else why not."""
        if ident.kind != "user":
            return None if ident.kind in self.kinds else f"{ident.describe()} may not call this method"
        need = self.role
        if self.escalate is not None:
            need = max(need, self.escalate(request) or need, key=_rank) if need else ""
        if not need:
            return f"users may not call this method (only {', '.join(sorted(self.kinds)) or 'nobody'})"
        if _rank(ident.role) < _rank(need):
            return f"{ident.describe()} lacks role {need}"
        return None


def _rank(role: str) -> int:
    return ROLES.index(role) + 1 if role in ROLES else 0


def viewer() -> Rule:
    return Rule(role="viewer")


def operator(escalate: Callable[[Any], str] | None = None) -> Rule:
    return Rule(role="operator", escalate=escalate)


def admin() -> Rule:
    return Rule(role="admin")


def daemon(*kinds: str) -> Rule:
    return Rule(kinds=frozenset(kinds))


#: audit(identity, method, request, last response (or None), status code, message, seconds)
AuditSink = Callable[[Identity, str, Any, Any, grpc.StatusCode, str, float], None]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, rules: dict[str, Rule], deny: DenyList, secure: bool, audit: AuditSink | None = None):
        self.rules = rules
        self.deny = deny
        self.secure = secure
        self.audit = audit

    def identify(self, context: grpc.aio.ServicerContext) -> Identity:
        if not self.secure:
            return ANONYMOUS
        certs = context.auth_context().get("x509_pem_cert") or []
        if len(certs) != 1:   # the TLS layer demands a certificate; this is defence in depth
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, "no client certificate: connect with --tls DIR")
        try:
            return identity_of_pem(certs[0])
        except (FailedPrecondition, ValueError) as exc:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None

    def check(self, method: str, ident: Identity, request) -> None:
        if self.secure and self.deny.denied(ident) is not None:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED,
                           f"certificate of {ident.principal} (serial {ident.serial:x}) is revoked: "
                           f"ask an admin for a new one")
        rule = self.rules.get(method)
        if rule is None:
            raise _Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to anybody")
        if self.secure:
            why = rule.admits(ident, request)
            if why:
                raise _Refusal(grpc.StatusCode.PERMISSION_DENIED, f"permission denied: {why} ({_short(method)})")
        try:
            limits.validate(request)
        except InvalidArgument as exc:
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, exc.message) from None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream), handler.request_deserializer,
                handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._bidi(method, handler.stream_stream, handler.request_deserializer(b"")),
                handler.request_deserializer, handler.response_serializer)
        return None   # client-streaming methods do not exist: never serve one unguarded

    def _unary(self, method: str, inner):
        async def call(request, context):
            async with self._guard(method, request, context) as guarded:
                guarded.response = await inner(request, context)
                return guarded.response
        return call

    def _stream(self, method: str, inner):
        async def call(request, context):
            async with self._guard(method, request, context) as guarded:
                async for item in inner(request, context):
                    guarded.response = item   # the last one (a job's final state) goes to the audit
                    yield item
        return call

    def _bidi(self, method: str, inner, empty):
        """A relay: the rule is checked on the stream, the limits on every message that arrives."""
        async def call(requests, context):
            async def checked():
                async for item in requests:
                    try:
                        limits.validate(item)
                    except InvalidArgument as exc:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
                    yield item
            async with self._guard(method, empty, context):
                async for item in inner(checked(), context):
                    yield item
        return call

    @contextlib.asynccontextmanager
    async def _guard(self, method: str, request, context):
        """Admit the call (or abort it), make the caller visible to the servicer, audit the end."""
        guarded = _Guarded(UNIDENTIFIED, None, time.monotonic())
        try:
            try:
                guarded.ident = self.identify(context)
                self.check(method, guarded.ident, request)
            except _Refusal as refusal:
                await self._refuse(context, guarded.ident, method, refusal)
            CALLER.set(guarded.ident)
            yield guarded
        finally:
            self._record(guarded.ident, method, request, guarded.response, context, guarded.started)

    async def _refuse(self, context, ident: Identity, method: str, refusal: "_Refusal") -> None:
        log.warning("call refused", method=_short(method), caller=ident.principal, code=refusal.code.name,
                    reason=refusal.message)
        context.set_trailing_metadata((("stasis-error", refusal.code.name),))
        await context.abort(refusal.code, refusal.message)

    def _record(self, ident: Identity, method: str, request, response, context, started: float) -> None:
        if self.audit is None:
            return
        code = context.code() or (grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.OK)
        if isinstance(code, int):
            code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        details = context.details() or ""
        if isinstance(details, bytes):
            details = details.decode(errors="replace")
        try:
            self.audit(ident, method, request, response, code, details, time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - a failing audit sink must not hide the call's own result
            log.error("audit record failed", method=_short(method), error=str(exc))


@dataclass
class _Guarded:
    ident: Identity
    response: Any
    started: float


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def service_methods(service_descriptor) -> list[str]:
    return [f"/{service_descriptor.full_name}/{m.name}" for m in service_descriptor.methods]
