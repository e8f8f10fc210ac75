"""Engines as a Ray Serve deployment: each replica runs the whole single-process live server for its sessions.

A live session is a long, two-way stream (audio and controls in, frames out; or WebRTC media), which a Serve
request/response handle cannot pin to one replica. So Ray Serve owns what it is good at — placing replicas on
nodes with their declared CPUs/GPUs, restarting a dead one, scaling between `min_replicas` and `max_replicas`
from our own metric (live sessions, `record_autoscaling_stats` and `session_policy`) — and every replica starts
the same `LiveServer` the single-process `livecache serve` runs (hub, engine worker batching all of its sessions,
websocket API, aiortc) on its node's address. Replicas announce themselves in a small named actor (the
`ReplicaDirectory`); the ingress (`ray_ingress.py`) reads it, places each session on the replica with the most
free slots and relays the websocket API to it (WebRTC media goes straight between browser and replica).

Ray is imported only here and in the ingress, and only when `livecache serve --ray` runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray import serve

NAMESPACE = "livecache"
APP_NAME = "livecache-live"
DIRECTORY = "livecache-replicas"
# scale up once the cluster's sessions pass this share of its replicas' slots: the next session then finds a
# replica ready instead of waiting seconds for one to start
TARGET_FILL = 0.75


@dataclass(frozen=True)
class ClusterConfig:
    """How the engine deployment is shaped (`livecache serve --ray` options; /api/info reports them)."""

    engine: str = "embedded"
    sessions_per_replica: int = 4
    min_replicas: int = 1
    max_replicas: int = 2
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0  # a fraction shares one GPU among replicas (0.25: four replicas per GPU)
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas} and "
                             f"{self.max_replicas}")
        if self.sessions_per_replica < 1:
            raise ValueError(f"sessions_per_replica must be at least 1, got {self.sessions_per_replica}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("replica_cpus and replica_gpus cannot be negative")

    @property
    def max_sessions(self) -> int:
        return self.max_replicas * self.sessions_per_replica

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "max_sessions": self.max_sessions}


@ray.remote(num_cpus=0)
class ReplicaDirectory:
    """Where each replica's own server listens, by Serve replica id. Owned by the ingress's driver, so it goes
    when the driver does."""

    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, Any]] = {}

    def register(self, replica: str, entry: dict[str, Any]) -> None:
        self._replicas[replica] = entry

    def forget(self, replica: str) -> None:
        self._replicas.pop(replica, None)

    def replicas(self) -> dict[str, dict[str, Any]]:
        return dict(self._replicas)


def session_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve autoscaling policy from live sessions (the replicas' `sessions` and `capacity` metrics): enough
    replicas to keep the cluster's sessions under TARGET_FILL of its slots. Serve clamps the answer to
    min/max_replicas and applies the up/down delays. Without metrics yet, it keeps the current count.

    It scales down only once no session is live (metrics averaged over Serve's look-back window): Serve, not
    we, picks the replica it stops, and it cannot tell one holding sessions from an empty one, so shrinking a
    busy cluster could end sessions that did nothing wrong."""
    metrics = ctx.aggregated_metrics or {}
    sessions, capacity = metrics.get("sessions", {}), metrics.get("capacity", {})
    if not capacity:
        return ctx.current_num_replicas, ctx.policy_state
    live = sum(sessions.values())
    wanted = math.ceil(live / (TARGET_FILL * max(capacity.values())))
    return (max(wanted, ctx.current_num_replicas) if live > 0 else wanted), ctx.policy_state


class EngineReplica:
    """One Serve replica: a `LiveServer` on this node holding up to `sessions_per_replica` sessions."""

    async def __init__(self, engine: str, engine_options: dict[str, object], limits: dict[str, object]) -> None:
        from .server import LiveServer, ServerLimits

        self.replica = serve.get_replica_context().replica_id.unique_id
        host = ray.util.get_node_ip_address()
        self.server = await LiveServer(host, 0, engine, ServerLimits(**limits), engine_options=engine_options).start()
        self.directory = ray.get_actor(DIRECTORY, namespace=NAMESPACE)
        await self.directory.register.remote(self.replica, {"url": self.server.url, "pid": os.getpid(),
                                                            "node": host})

    async def record_autoscaling_stats(self) -> dict[str, float]:
        hub = self.server.hub
        return {"sessions": float(len(hub.sessions)), "capacity": float(hub.max_sessions)}

    async def url(self) -> str:
        return self.server.url

    async def __del__(self) -> None:
        """Serve's graceful shutdown: the sessions end with reason "shutdown" (the ingress relays it). Also called
        for a replica whose start failed part way, so it releases only what it got."""
        if hasattr(self, "directory"):
            await self.directory.forget.remote(self.replica)
        if hasattr(self, "server"):
            await self.server.stop()


def deploy(config: ClusterConfig, engine_options: dict[str, object], limits: dict[str, object]) -> Any:
    """Create the directory and run the engine deployment (blocking until its first replicas are up). Returns the
    directory's handle: the caller keeps it, since Ray ends a named actor when its last handle goes."""
    serve.start(proxy_location="Disabled")  # the ingress is our own server; Serve's HTTP proxy is not needed
    found = ReplicaDirectory.options(name=DIRECTORY, namespace=NAMESPACE).remote()
    ray.get(found.replicas.remote())
    resources: dict[str, float] = {"num_cpus": config.replica_cpus}
    if config.replica_gpus:
        resources["num_gpus"] = config.replica_gpus
    deployment = serve.deployment(EngineReplica, name="engine").options(
        ray_actor_options=resources,
        autoscaling_config={
            "min_replicas": config.min_replicas, "initial_replicas": config.min_replicas,
            "max_replicas": config.max_replicas, "metrics_interval_s": 1.0, "look_back_period_s": 3.0,
            "upscale_delay_s": config.upscale_delay_s, "downscale_delay_s": config.downscale_delay_s,
            "policy": {"policy_function": session_policy},
        },
        health_check_period_s=2.0, health_check_timeout_s=10.0, graceful_shutdown_timeout_s=10.0,
    )
    app = deployment.bind(config.engine, engine_options, {**limits, "max_sessions": config.sessions_per_replica})
    serve.run(app, name=APP_NAME, route_prefix=None)
    return found


def undeploy(found: Any) -> None:
    """Delete the deployment (replicas shut down gracefully: their sessions end with "shutdown"), then Serve and
    the directory."""
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.kill(found)
