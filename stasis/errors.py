"""The error model shared by agent, controller, storage and CLI.

Every failure a user can meet is a StasisError with a one-line message that names the problem and,
where there is one, the fix. Servicers translate these to gRPC status codes here and nowhere else;
clients translate status codes back, so the CLI prints the same line the agent wrote.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import grpc
import structlog

log = structlog.get_logger("stasis.errors")


class StasisError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(StasisError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(StasisError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(StasisError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(StasisError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(StasisError):
    code = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(StasisError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(StasisError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(StasisError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class IntegrityError(StasisError):
    """Data read back from storage or the network failed verification."""

    code = grpc.StatusCode.DATA_LOSS


class RuntimeFailure(StasisError):
    """podman, CRIU or another tool failed; the message carries the tail of its log."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[StasisError]] = {
    cls.code: cls
    for cls in (NotFound, InvalidArgument, AlreadyExists, FailedPrecondition, Unavailable,
                PermissionDenied, Unauthenticated, DeadlineExceeded, IntegrityError, RuntimeFailure)
}


def from_rpc_error(err: grpc.RpcError, peer: str = "") -> StasisError:
    """Turn a failed call into the StasisError the server raised (or a clear transport error)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE and peer and not _is_ours(err):
        if any(s in (details or "") for s in _TLS_TROUBLE):
            return Unavailable(f"TLS handshake with {peer} failed ({_first_line(details)}): both sides need "
                               f"current certificates from the same stasis CA (see 'stasis certs show')")
        return Unavailable(f"{peer} is unreachable ({_first_line(details)}); is it running?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not _is_ours(err):
        return DeadlineExceeded(f"{peer or 'the server'} did not answer in time")
    return _BY_CODE.get(code, StasisError)(details or code.name.lower())


# What gRPC says when a TLS handshake fails: the server closes a connection whose certificate it
# refuses, the client reports a failed verification of the server's.
_TLS_TROUBLE = ("Socket closed", "ssl", "SSL", "handshake", "Handshake", "certificate", "Hostname Verification")


def _is_ours(err: grpc.RpcError) -> bool:
    md = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return any(k == "stasis-error" for k, _ in (md or ()))


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, StasisError):
        code, message = exc.code, exc.message
    else:
        # A bug, not a user error: keep the traceback in the server log, give the caller one line.
        log.error("unhandled error", method=method, exc_info=exc)
        code, message = grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}"
    context.set_trailing_metadata((("stasis-error", type(exc).__name__),))
    await context.abort(code, message)


def rpc_errors(servicer_cls: type) -> type:
    """Class decorator: every public coroutine / async-generator method maps errors to status codes."""
    for name, fn in list(vars(servicer_cls).items()):
        if name.startswith("_") or not callable(fn):
            continue
        setattr(servicer_cls, name, _wrap(fn, f"{servicer_cls.__name__}.{name}"))
    return servicer_cls


def _wrap(fn: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def gen_wrapper(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the one place errors become statuses
                await _abort(context, exc, method)
        return gen_wrapper

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, method)
    return wrapper


# gRPC's default reconnect backoff grows to two minutes: a daemon that was down for a while would
# stay unreachable long after it is back. Peers here are on a LAN or loopback: retry every 2 s.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                   ("grpc.max_reconnect_backoff_ms", 2000)]


# Requests are small (checkpoint bytes never travel in messages): refuse big ones early.
SERVER_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 << 20)]
