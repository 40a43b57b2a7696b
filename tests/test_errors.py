"""Errors cross gRPC as status codes and come back as the same one-line StasisError."""

from __future__ import annotations

import grpc
import pytest

from stasis.errors import (DeadlineExceeded, IntegrityError, NotFound, StasisError, Unavailable,
                           from_rpc_error, rpc_errors)
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.proto.v1 import stasis_pb2_grpc as pb_grpc
from stasis.testbed.ports import free_port


@rpc_errors
class Failing(pb_grpc.AgentServicer):
    async def InspectContainer(self, request, context):
        if request.name == "missing":
            raise NotFound("no container 'missing' on host-a")
        if request.name == "bug":
            raise ZeroDivisionError("oops")
        return pb.Container(name=request.name)

    async def Restore(self, request, context):
        yield pb.AgentEvent(progress=pb.Progress(phase="download"))
        raise IntegrityError("object abc is corrupted")


@pytest.fixture
async def stub():
    server = grpc.aio.server()
    pb_grpc.add_AgentServicer_to_server(Failing(), server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.AgentStub(channel)
    await channel.close()
    await server.stop(0)


async def test_unary_error_keeps_class_and_message(stub):
    with pytest.raises(grpc.RpcError) as info:
        await stub.InspectContainer(pb.InspectContainerRequest(name="missing"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    err = from_rpc_error(info.value, "agent host-a")
    assert isinstance(err, NotFound) and err.message == "no container 'missing' on host-a"


async def test_streaming_error_after_progress(stub):
    events = []
    with pytest.raises(grpc.RpcError) as info:
        async for e in stub.Restore(pb.AgentRestoreRequest()):
            events.append(e)
    assert len(events) == 1
    assert isinstance(from_rpc_error(info.value), IntegrityError)


async def test_bug_becomes_internal_with_one_line(stub):
    with pytest.raises(grpc.RpcError) as info:
        await stub.InspectContainer(pb.InspectContainerRequest(name="bug"))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError: oops" in info.value.details()
    assert "\n" not in info.value.details()


async def test_unreachable_peer_is_named():
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}")
    with pytest.raises(grpc.RpcError) as info:
        await pb_grpc.AgentStub(channel).InspectContainer(pb.InspectContainerRequest(name="x"), timeout=5)
    await channel.close()
    err = from_rpc_error(info.value, "agent host-b at 127.0.0.1:1")
    assert isinstance(err, (Unavailable, DeadlineExceeded))
    assert "agent host-b at 127.0.0.1:1" in err.message


def test_plain_stasis_error_is_internal():
    assert StasisError("x").code == grpc.StatusCode.INTERNAL
