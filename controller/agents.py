"""The controller's client for agents: one channel per host, errors turned back into StasisErrors."""

from __future__ import annotations

import asyncio
from typing import Callable

import grpc

from stasis.errors import DeadlineExceeded, Unavailable, from_rpc_error
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.proto.v1 import stasis_pb2_grpc as pb_grpc
from stasis.security.pki import agent_server_name
from stasis.security.tls import Transport

QUICK = 15.0          # seconds for queries
LONG = 3600.0         # seconds for a checkpoint or restore of many GiB
REATTACH = (1, 2, 4, 8)  # seconds between re-attempts of an idempotent long call


class AgentClient:
    def __init__(self, name: str, address: str, transport: Transport | None = None):
        self.name = name
        self.address = address
        self.transport = transport or Transport.insecure()
        self._stamp = self.transport.stamp()
        # TLS: the agent must prove it is NAME.agent.stasis, whatever address it registered.
        self.channel = self.transport.aio_channel(address, agent_server_name(name))
        self._stub = pb_grpc.AgentStub(self.channel)

    @property
    def stub(self) -> pb_grpc.AgentStub:
        if self.transport.stamp() != self._stamp:
            # Our bundle was rotated: new calls go over a channel with the new certificate; calls in
            # flight finish on the old one.
            old = self.channel
            self._stamp = self.transport.stamp()
            self.channel = self.transport.aio_channel(self.address, agent_server_name(self.name))
            self._stub = pb_grpc.AgentStub(self.channel)
            asyncio.ensure_future(old.close(grace=LONG))
        return self._stub

    @property
    def peer(self) -> str:
        return f"agent {self.name} at {self.address}"

    async def _call(self, method, request, timeout: float = QUICK):
        try:
            return await method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.peer) from None

    async def _stream(self, method, request, on_progress: Callable[[pb.Progress], None]) -> pb.AgentEvent:
        """A long call; when the connection drops, call again with the same operation id.

        The agent keeps working when a stream breaks and joins a repeated operation id to the
        running work, so re-attaching gets the real outcome instead of guessing (a guess here
        would roll back a migration whose restore is still going on).
        """
        for pause in (*REATTACH, None):
            try:
                return await self._stream_once(method, request, on_progress)
            except (Unavailable, DeadlineExceeded):
                if pause is None:
                    raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def _stream_once(self, method, request, on_progress) -> pb.AgentEvent:
        final = None
        try:
            async for event in method(request, timeout=LONG):
                if event.HasField("progress"):
                    on_progress(event.progress)
                else:
                    final = event
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.peer) from None
        if final is None:
            raise Unavailable(f"{self.peer} closed the stream without a result")
        return final

    async def host_info(self) -> pb.HostInfo:
        return await self._call(self.stub.GetHostInfo, pb.GetHostInfoRequest())

    async def containers(self, all: bool = False) -> list[pb.Container]:
        return list((await self._call(self.stub.ListContainers, pb.ListContainersRequest(all=all))).containers)

    async def inspect(self, name: str) -> pb.Container:
        return await self._call(self.stub.InspectContainer, pb.InspectContainerRequest(name=name))

    async def checkpoint(self, op_id: str, container: str, leave_running: bool, repository: str,
                         on_progress, tags: dict[str, str] | None = None, direct: bool = False,
                         checkpoint_id: str = "", ignore_volumes: bool = False,
                         post_copy: bool = False) -> pb.CheckpointSummary:
        req = pb.AgentCheckpointRequest(operation_id=op_id, container=container, leave_running=leave_running,
                                        repository=repository, tags=tags or {}, direct=direct,
                                        checkpoint_id=checkpoint_id, ignore_volumes=ignore_volumes,
                                        post_copy=post_copy)
        return (await self._stream(self.stub.Checkpoint, req, on_progress)).checkpoint

    async def restore(self, op_id: str, checkpoint_id: str, repository: str, name: str,
                      on_progress, peer: "AgentClient | None" = None, ticket: bytes = b"",
                      ignore_volumes: bool = False, post_copy: bool = False,
                      page_ticket: bytes = b"") -> pb.RestoreResult:
        """From the repository, or (direct migration) from `peer`, which holds it, with a ticket."""
        req = pb.AgentRestoreRequest(operation_id=op_id, checkpoint_id=checkpoint_id, repository=repository,
                                     name=name, peer_host=peer.name if peer else "",
                                     peer_address=peer.address if peer else "", ticket=ticket,
                                     ignore_volumes=ignore_volumes, post_copy=post_copy,
                                     page_ticket=page_ticket)
        return (await self._stream(self.stub.Restore, req, on_progress)).restored

    async def describe_for_migration(self, name: str) -> pb.MigrationNeeds:
        return await self._call(self.stub.DescribeForMigration, pb.InspectContainerRequest(name=name))

    async def check_migration(self, needs: pb.MigrationNeeds) -> None:
        # CRIU's cpuinfo check, and the page pool (at most pool.BUDGET seconds).
        await self._call(self.stub.CheckMigration, needs, timeout=60.0)

    async def resume(self, name: str) -> pb.Container:
        return await self._call(self.stub.Resume, pb.ResumeRequest(name=name), timeout=LONG)

    async def exec(self, container: str, argv: list[str], timeout: float) -> pb.ExecResponse:
        return await self._call(self.stub.Exec, pb.ExecRequest(container=container, argv=argv,
                                                              timeout_seconds=timeout), timeout=timeout + 10)

    async def remove(self, name: str, force: bool = True) -> None:
        await self._call(self.stub.RemoveContainer, pb.RemoveContainerRequest(name=name, force=force))

    async def close(self) -> None:
        await self.channel.close()


