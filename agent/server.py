"""The agent's gRPC face: a thin servicer over AgentService, plus registration with the controller."""

from __future__ import annotations

import asyncio
import os

import grpc
import structlog

from stasis.agent import bulk
from stasis.agent.service import DIRECT_TAG, AgentService, Peer
from stasis.errors import SERVER_OPTIONS, from_rpc_error, rpc_errors
from stasis.proto import convert
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.proto.v1 import stasis_pb2_grpc as pb_grpc
from stasis.security.authz import AuthInterceptor, daemon, service_methods
from stasis.security.pki import CONTROLLER_SERVER_NAME
from stasis.security.tls import Transport

log = structlog.get_logger("stasis.agent")
_DONE = object()


async def _stream(work, queue: asyncio.Queue):
    """Run `work` while yielding the progress it puts on `queue`; the last item is its result."""
    task = asyncio.ensure_future(work)
    # If the caller goes away the work goes on; a retry with the same operation id finds it.
    task.add_done_callback(lambda _t: queue.put_nowait(_DONE))
    while True:
        item = await queue.get()
        if item is _DONE:
            break
        yield item
    yield task.result()


def _emitter(queue: asyncio.Queue):
    loop = asyncio.get_running_loop()
    last: dict[str, int] = {}

    def emit(phase: str, message: str, done: int, total: int) -> None:
        # Called from worker threads too; send at most one event per 1% of progress.
        step = max(total // 100, 1) if total else 64 << 20   # unknown total: every 64 MiB
        if not message and done // step == last.get(phase, -1) and done != total:
            return
        last[phase] = done // step
        event = pb.AgentEvent(progress=pb.Progress(phase=phase, message=message, bytes_done=done,
                                                   bytes_total=total))
        loop.call_soon_threadsafe(queue.put_nowait, event)
    return emit


@rpc_errors
class AgentServicer(pb_grpc.AgentServicer):
    def __init__(self, service: AgentService):
        self.service = service

    async def GetHostInfo(self, request, context):
        return convert.host_info_pb(await self.service.host_info())

    async def ListContainers(self, request, context):
        items = await self.service.list(request.all)
        return pb.ListContainersResponse(containers=[convert.container_pb(c, self.service.host_name)
                                                     for c in items])

    async def InspectContainer(self, request, context):
        return convert.container_pb(await self.service.inspect(request.name), self.service.host_name)

    async def Checkpoint(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        work = self.service.checkpoint(request.operation_id, request.container, request.leave_running,
                                       request.repository, request.checkpoint_id, _emitter(queue),
                                       dict(request.tags), request.direct, request.ignore_volumes,
                                       request.post_copy)
        async for item in _stream(work, queue):
            if isinstance(item, pb.AgentEvent):
                yield item
                continue
            summary = convert.checkpoint_pb(item)
            if request.direct:
                summary.size_bytes = int(item.tags.get(DIRECT_TAG, 0))
            yield pb.AgentEvent(checkpoint=summary)

    async def Restore(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        peer = Peer(request.peer_host, request.peer_address, request.ticket, request.post_copy,
                    request.page_ticket) if request.peer_host else None
        work = self.service.restore(request.operation_id, request.checkpoint_id, request.repository,
                                    request.name, _emitter(queue), peer, request.ignore_volumes)
        async for item in _stream(work, queue):
            yield item if isinstance(item, pb.AgentEvent) else pb.AgentEvent(restored=pb.RestoreResult(
                container=convert.container_pb(item.container, self.service.host_name),
                timings=convert.timings_pb(item.timings)))

    async def Resume(self, request, context):
        return convert.container_pb(await self.service.resume(request.name), self.service.host_name)

    async def Exec(self, request, context):
        code, output = await self.service.exec(request.container, list(request.argv), request.timeout_seconds or 60)
        return pb.ExecResponse(exit_code=code, output=output)

    async def RemoveContainer(self, request, context):
        await self.service.remove(request.name, request.force)
        return pb.RemoveContainerResponse()

    async def DescribeForMigration(self, request, context):
        cpuinfo, memory = await self.service.describe_for_migration(request.name)
        return pb.MigrationNeeds(container=request.name, cpuinfo=cpuinfo, memory_bytes=memory)

    async def CheckMigration(self, request, context):
        await self.service.check_migration(request.cpuinfo, request.memory_bytes, request.pool_pages)
        return pb.CheckMigrationResponse()

    async def FetchCheckpoint(self, request, context):
        async for chunk in self.service.fetch(request.checkpoint_id, request.ticket, request.zstd, request.bulk):
            yield chunk

    async def RelayPages(self, request_iterator, context):
        async for msg in self.service.relay_pages(request_iterator):
            yield msg

    async def DeclineBulk(self, request, context):
        await self.service.decline_bulk(request.checkpoint_id, request.ticket, request.token, request.reason)
        return pb.DeclineBulkResponse()


# Agents serve the controller only; a peer agent may fetch a checkpoint held for a direct migration
# (and decline its bulk channel, or relay its pages), and AgentService lets it only with the
# controller's ticket for exactly that transfer.
RULES = {method: daemon("controller") for method in service_methods(pb.DESCRIPTOR.services_by_name["Agent"])}
RULES["/stasis.v1.Agent/FetchCheckpoint"] = daemon("agent")
RULES["/stasis.v1.Agent/RelayPages"] = daemon("agent")
RULES["/stasis.v1.Agent/DeclineBulk"] = daemon("agent")


async def _register_loop(service: AgentService, controller: str, advertise: str, transport: Transport) -> None:
    """Register with the controller, then heartbeat; re-register whenever it forgets us."""
    registered = False
    delay = 1.0
    channel, stamp = None, None
    try:
        while True:
            if transport.stamp() != stamp:   # a rotated bundle: new connections present the new certificate
                if channel is not None:
                    asyncio.ensure_future(channel.close(grace=5))
                stamp = transport.stamp()
                channel = transport.aio_channel(controller, CONTROLLER_SERVER_NAME)
                stub = pb_grpc.ControllerStub(channel)
            try:
                if not registered:
                    info = convert.host_info_pb(await service.host_info())
                    reply = await stub.RegisterAgent(pb.RegisterAgentRequest(
                        name=service.host_name, address=advertise, info=info), timeout=10)
                    registered, delay = True, max(reply.heartbeat_seconds, 0.5)
                    service.learn_repository(reply.repository)
                    asyncio.ensure_future(service.warm_up())
                    log.info("registered with controller", controller=controller, host=service.host_name)
                else:
                    reply = await stub.Heartbeat(pb.HeartbeatRequest(name=service.host_name), timeout=5)
                    registered = reply.known
                service.deny.replace([convert.revocation(r) for r in reply.revocations])
                await asyncio.sleep(delay)
            except grpc.RpcError as err:
                log.warning("controller unreachable; retrying", error=str(from_rpc_error(err, controller)))
                registered = False
                await asyncio.sleep(min(delay * 2, 5.0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a hung CRIU probe: log, keep trying
                log.warning("registration failed; retrying", error=str(exc))
                registered = False
                await asyncio.sleep(5.0)
    finally:
        if channel is not None:
            await channel.close()


def build_server(service: AgentService, listen: str, transport: Transport) -> grpc.aio.Server:
    server = grpc.aio.server(options=SERVER_OPTIONS,
                             interceptors=[AuthInterceptor(RULES, service.deny, transport.secure)])
    pb_grpc.add_AgentServicer_to_server(AgentServicer(service), server)
    transport.listen(server, listen)
    return server


async def serve(service: AgentService, listen: str, controller: str | None, advertise: str | None,
                transport: Transport, bulk_listen: str | None = None) -> None:
    server = build_server(service, listen, transport)
    if bulk_listen != "off":
        service.bulk = bulk.Listener(transport, bulk_listen or f"{bulk.host_of(listen)}:0", service.deny)
    await service.clean_up_after_a_killed_agent()   # before a caller can see what it left
    await server.start()
    address = advertise or listen
    log.info("agent listening", address=listen, bulk_port=service.bulk.port if service.bulk else "off",
             host=service.host_name, pid=os.getpid(), tls=transport.secure)
    service.runtime.sweep()   # before warm_up: its first landing then removes what a killed agent left
    tasks = [asyncio.ensure_future(_register_loop(service, controller, address, transport))] if controller else []
    tasks.append(asyncio.ensure_future(service.warm_up()))
    try:
        await server.wait_for_termination()
    finally:
        for t in tasks:
            t.cancel()
        if service.bulk is not None:
            service.bulk.close()
        await server.stop(grace=2)
