"""`livecache serve --ray`: start (or join) a Ray cluster, deploy the engine replicas, serve the ingress; and stop
all of it again, sessions first.

Shutdown order matters for the clients: the listener closes, then the deployment is deleted, so every replica
ends its sessions with reason "shutdown" and the relays pass that `stopped` on before they close; only then do
the ingress, Serve and (when this process started it) the local Ray instance go.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import asdict

import aiohttp
import ray
from aiohttp import web

from . import ray_serve
from .ray_ingress import ReplicaPool, build_ingress
from .server import LiveServer, ServerLimits

DRAIN_S = 15.0  # how long shutdown waits for the replicas to end their sessions and the relays to pass it on


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address`, or start a local one on 127.0.0.1; True when this process started it
    (and so must stop it). Already connected (a test's fixture): kept as it is."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, namespace=ray_serve.NAMESPACE, log_to_driver=False)
        return False
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
             namespace=ray_serve.NAMESPACE, object_store_memory=128 * 1024 * 1024, log_to_driver=False)
    return True


class RayLiveServer:
    """The ingress server in front of the engine deployment; same start/stop/url as `LiveServer`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, cluster: ray_serve.ClusterConfig | None = None,
                 limits: ServerLimits | None = None, ssl_context: ssl.SSLContext | None = None,
                 engine_options: dict[str, object] | None = None, address: str | None = None,
                 num_cpus: int | None = None) -> None:
        self.cluster = cluster or ray_serve.ClusterConfig()
        self.limits = limits or ServerLimits(max_sessions=self.cluster.max_sessions)
        self.engine_options = dict(engine_options or {})
        self.address, self.num_cpus = address, num_cpus
        self._started_ray = False
        self._http: aiohttp.ClientSession | None = None
        self._directory: object | None = None
        app = build_ingress(self._make_pool, self.cluster, self.limits)
        self.front = LiveServer(host, port, limits=self.limits, ssl_context=ssl_context, app=app)

    @property
    def url(self) -> str:
        return self.front.url

    @property
    def pool(self) -> ReplicaPool:
        return self.front.app["pool"]

    async def _make_pool(self, app: web.Application) -> ReplicaPool:
        self._http = aiohttp.ClientSession()
        pool = ReplicaPool(self._directory, self._http, self.cluster.max_replicas, app["counters"])
        await pool.start()
        return pool

    async def start(self) -> RayLiveServer:
        self._started_ray = await asyncio.to_thread(connect, self.address, self.num_cpus)
        limits = {k: v for k, v in asdict(self.limits).items() if k != "max_sessions"}
        try:
            self._directory = await asyncio.to_thread(ray_serve.deploy, self.cluster, self.engine_options, limits)
            await self.front.start()
        except BaseException:
            await self._stop_cluster()
            raise
        return self

    async def stop(self) -> None:
        listener = self.front._listener
        if listener is not None:
            listener.close()
        await asyncio.to_thread(ray_serve.undeploy, self._directory)
        relays = list(self.front.app["connections"])
        if relays:
            await asyncio.wait([asyncio.create_task(r.finished()) for r in relays], timeout=DRAIN_S)
        if "pool" in self.front.app:
            await self.pool.close()
        await self.front.stop()
        if self._http is not None:
            await self._http.close()
        await self._stop_cluster(undeployed=True)

    async def _stop_cluster(self, undeployed: bool = False) -> None:
        if not undeployed and ray.is_initialized():
            with contextlib.suppress(Exception):  # a failed start may have left only part of it
                await asyncio.to_thread(ray_serve.undeploy, self._directory)
        if self._started_ray:
            await asyncio.to_thread(ray.shutdown)
