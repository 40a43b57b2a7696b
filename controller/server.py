"""The controller's gRPC face: a thin servicer over ControllerService."""

from __future__ import annotations

import asyncio
import os

import grpc
import structlog

from stasis.controller.audit import AuditLog
from stasis.controller.service import ControllerService
from stasis.errors import SERVER_OPTIONS, rpc_errors
from stasis.security.authz import AuthInterceptor, admin, daemon, operator, viewer
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.proto.v1 import stasis_pb2_grpc as pb_grpc

log = structlog.get_logger("stasis.controller")


@rpc_errors
class ControllerServicer(pb_grpc.ControllerServicer):
    def __init__(self, service: ControllerService):
        self.service = service
        self.audit = AuditLog(service.store)

    async def RegisterAgent(self, request, context):
        self.service.register(request.name, request.address, request.info)
        return pb.RegisterAgentResponse(repository=self.service.repository.url,
                                        heartbeat_seconds=self.service.heartbeat_seconds,
                                        revocations=self.service.revocations_pb())

    async def Heartbeat(self, request, context):
        return pb.HeartbeatResponse(known=self.service.heartbeat(request.name),
                                    revocations=self.service.revocations_pb())

    async def ListHosts(self, request, context):
        return pb.ListHostsResponse(hosts=self.service.hosts())

    async def ListContainers(self, request, context):
        return pb.ListContainersResponse(containers=await self.service.containers(request.host, request.all))

    async def Checkpoint(self, request, context):
        job = self.service.start_checkpoint(request.request_id, request.host, request.container,
                                            request.leave_running)
        async for event in self.service.jobs.watch(job):
            yield event

    async def Restore(self, request, context):
        job = await self.service.start_restore(request.request_id, request.checkpoint_id, request.host, request.name)
        async for event in self.service.jobs.watch(job):
            yield event

    async def Migrate(self, request, context):
        job = self.service.start_migrate(request.request_id, request.host, request.container, request.to,
                                         request.transfer, request.ignore_volumes, request.post_copy)
        async for event in self.service.jobs.watch(job):
            yield event

    async def ListCheckpoints(self, request, context):
        return pb.ListCheckpointsResponse(checkpoints=self.service.checkpoints(request.container, request.host,
                                                                               request.schedule))

    async def GetCheckpoint(self, request, context):
        return await self.service.checkpoint(request.id)

    async def GetJob(self, request, context):
        return self.service.jobs.require(request.id).to_pb()

    async def ListJobs(self, request, context):
        jobs = (self.service.jobs.get(r.id) for r in self.service.store.jobs(request.limit or 50))
        return pb.ListJobsResponse(jobs=[j.to_pb() for j in jobs if j is not None])

    async def WatchJob(self, request, context):
        async for event in self.service.jobs.watch(self.service.jobs.require(request.id)):
            yield event

    async def CreateSchedule(self, request, context):
        return self.service.schedules.create(request)

    async def ListSchedules(self, request, context):
        return pb.ListSchedulesResponse(schedules=self.service.schedules.list())

    async def GetSchedule(self, request, context):
        return self.service.schedules.get(request.name)

    async def PauseSchedule(self, request, context):
        return self.service.schedules.pause(request.name, request.paused)

    async def DeleteSchedule(self, request, context):
        self.service.schedules.delete(request.name)
        return pb.DeleteScheduleResponse()

    async def RunSchedule(self, request, context):
        return pb.RunScheduleResponse(job_ids=await self.service.schedules.run_now(request.name))

    async def Forget(self, request, context):
        return await self.service.schedules.forget(request)

    async def WhoAmI(self, request, context):
        return self.service.whoami()

    async def Revoke(self, request, context):
        return self.service.revoke(request.target, request.reason)

    async def ListRevocations(self, request, context):
        return pb.ListRevocationsResponse(revocations=self.service.revocations_pb())

    async def ListAudit(self, request, context):
        return pb.ListAuditResponse(entries=self.audit.entries(request.since, request.principal, request.limit))


# Who may call what (stasis.security.authz): agents register and report; users by role.
RULES = {f"/stasis.v1.Controller/{name}": rule for name, rule in {
    "RegisterAgent": daemon("agent"), "Heartbeat": daemon("agent"),
    "WhoAmI": viewer(), "ListHosts": viewer(), "ListContainers": viewer(), "ListCheckpoints": viewer(),
    "GetCheckpoint": viewer(), "GetJob": viewer(), "ListJobs": viewer(), "WatchJob": viewer(),
    "ListSchedules": viewer(), "GetSchedule": viewer(),
    "Checkpoint": operator(), "Restore": operator(), "Migrate": operator(), "CreateSchedule": operator(),
    "PauseSchedule": operator(), "DeleteSchedule": operator(), "RunSchedule": operator(),
    # Forgetting is what retention does every night; freeing the space for good is an admin's call.
    "Forget": operator(escalate=lambda r: "admin" if r.prune else ""),
    "Revoke": admin(), "ListRevocations": admin(), "ListAudit": admin(),
}.items()}


def build_server(service: ControllerService, listen: str) -> grpc.aio.Server:
    servicer = ControllerServicer(service)
    guard = AuthInterceptor(RULES, service.deny, service.transport.secure, servicer.audit)
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[guard])
    pb_grpc.add_ControllerServicer_to_server(servicer, server)
    service.transport.listen(server, listen)
    return server


async def serve(service: ControllerService, listen: str) -> None:
    server = build_server(service, listen)
    await server.start()
    added = await service.sync_catalog()
    scheduler = asyncio.ensure_future(service.schedules.loop())
    recovery = asyncio.ensure_future(service.recover_jobs())
    log.info("controller listening", address=listen, repository=service.repository.url,
             catalog_imported=added, pid=os.getpid())
    try:
        await server.wait_for_termination()
    finally:
        scheduler.cancel()
        recovery.cancel()
        await service.close()
        await server.stop(grace=2)
        await asyncio.sleep(0)
