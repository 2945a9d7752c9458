"""A real multi-node Ray cluster on this machine, started the way operators
start one: ``ray start`` for a head and for each worker node.

Each node is its own ``ray start --block`` process, started in a session of
its own, so that its raylet, agents and the worker processes they spawn are
one process group: killing that group is a node lost at once (as a machine
that loses power), which ``ray stop`` cannot do here (it stops every Ray
process on the machine, other people's clusters included).

Everything stays apart from any other Ray on the machine (the test session's
own ``ray.init()`` and other users'): its own temp dirs (Ray writes the
"current cluster" address there, not in /tmp/ray, so a plain ``ray.init()``
elsewhere never joins this cluster), its own ports, and its own auth token
(``RAY_AUTH_TOKEN``, not ~/.ray/auth_token). Nodes advertise 127.0.0.1, and
the dashboard (which ``serve deploy`` talks to) binds 127.0.0.1.

Ray's GCS, raylets and workers still bind their gRPC ports on every
interface (Ray 2.60 has no option for that; README "Deployment").
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serve_app.config import read_env_file

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The GCS declares a raylet dead after this many failed health checks, one
# every period: ~1.5 s here instead of Ray's default ~15 s, so a lost node is
# noticed within a test's patience. The same knobs exist on a real head.
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


def free_ports(count: int, taken: set[int]) -> list[int]:
    """``count`` distinct free ports, none in ``taken``, which grows by them.
    Each socket stays bound until all are picked, so the OS cannot hand the
    same port out twice; ``taken`` keeps ports picked for one node from
    being picked again for another before the first binds them (Ray refuses
    to start a node whose components share a port)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in taken:
                ports.append(port)
                taken.add(port)
    finally:
        for s in socks:
            s.close()
    return ports


def free_port_range(size: int, taken: set[int]) -> int:
    """The first of ``size`` consecutive free ports, none in ``taken``, which
    grows by them (for a node's worker processes)."""
    for _ in range(200):
        first = random.randrange(30000, 60000 - size)
        if taken.intersection(range(first, first + size)):
            continue
        try:
            socks = []
            for port in range(first, first + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            taken.update(range(first, first + size))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {size} consecutive free ports")


@dataclass
class Node:
    name: str
    resources: dict[str, float]
    process: subprocess.Popen
    log: Path
    node_id: str | None = None
    killed: bool = False

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the node's whole process group: raylet, agents, workers."""
        self.killed = True
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)


@dataclass
class LocalRayCluster:
    """A head and worker nodes on 127.0.0.1; use as a context manager."""

    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp")))
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    # Every port handed to a node so far (free_ports, free_port_range).
    taken_ports: set[int] = field(default_factory=set)

    @property
    def env(self) -> dict[str, str]:
        """Environment for the nodes and for Ray's CLIs talking to them."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(read_env_file())  # configs/ray.env, as README "Deployment" says to set on each node
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            # Workers import the tests' builder (tests/...) as well as serve_app;
            # tests/loopback keeps every process of the cluster on 127.0.0.1.
            PYTHONPATH=f"{ROOT / 'tests' / 'loopback'}:{ROOT}",
            PATH=f"{BIN}:{env.get('PATH', '')}",
        )
        return env

    def disk(self, node: str) -> Path:
        """The folder that is the node's own disk ($NODE_DISK on that node)."""
        return self.temp_dir / f"{node}-disk"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], resources: dict[str, float], num_cpus: float) -> Node:
        # A resource only this node has: how the tests find its node id, and
        # how a stage could be pinned to it.
        resources = {**resources, name: 1}
        # A temp dir per node: nodes starting at once in one temp dir race for
        # the same socket and log names, and one fails to register.
        temp_dir = self.temp_dir / name
        temp_dir.mkdir()
        log = self.temp_dir / f"{name}.out"
        worker_ports = free_port_range(40, self.taken_ports)
        node_manager, object_manager, agent_listen, agent_grpc, runtime_env, metrics = free_ports(6, self.taken_ports)
        command = [
            str(BIN / "ray"), "start", "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--num-cpus={num_cpus:g}", "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 39}",
            f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            "--object-store-memory=100000000", "--include-log-monitor=false", "--disable-usage-stats",
            *args,
        ]  # fmt: skip
        # A folder standing in for the node's own disk: its processes (the
        # raylet and the workers it starts) see it as $NODE_DISK.
        env = {**self.env, "NODE_DISK": str(self.disk(name))}
        with open(log, "wb") as out:
            process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, resources, process, log)
        self.nodes.append(node)
        return node

    def start_head(self, resources: dict[str, float], num_cpus: float = 2) -> Node:
        self.gcs_port, self.dashboard_port, client_port = free_ports(3, self.taken_ports)
        args = [
            "--head", f"--port={self.gcs_port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={client_port}",
            f"--system-config={json.dumps(HEALTH_CHECKS)}",
        ]  # fmt: skip
        return self._start("head", args, resources, num_cpus)

    def port(self) -> int:
        """A free port no node of this cluster was given (e.g. Serve's HTTP port)."""
        return free_ports(1, self.taken_ports)[0]

    def add_worker(self, name: str, resources: dict[str, float], num_cpus: float = 2) -> Node:
        return self._start(name, [f"--address=127.0.0.1:{self.gcs_port}"], resources, num_cpus)

    def api(self, path: str, method: str = "GET", timeout: float = 10, **kwargs) -> Any:
        """A call to the dashboard's REST API (Serve's and Ray's state API), with the cluster's token."""
        r = httpx.request(
            method, f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout, **kwargs
        )
        r.raise_for_status()
        return r.json()

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Ray's alive nodes (state API), each with node_id and resources_total."""
        body = self.api("/api/v0/nodes?limit=100&detail=true")
        return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_for_nodes(self, timeout: float = 60) -> None:
        """Until every started node is alive; records each node's id (matched by its custom resources)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.alive and not node.killed:
                    raise RuntimeError(f"ray start for {node.name} exited: {node.log.read_text()[-3000:]}")
            try:
                alive = self.alive_nodes()
            except httpx.HTTPError:
                alive = []
            for node in self.nodes:
                for info in alive:
                    if info["resources_total"].get(node.name) == 1:
                        node.node_id = info["node_id"]
            if all(node.node_id for node in self.nodes if not node.killed):
                return
            time.sleep(0.5)
        raise TimeoutError(f"nodes not up: {[n.name for n in self.nodes if not n.node_id]}")

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Ray's CLIs (``serve deploy``, ``serve status``) against this cluster."""
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    def logs(self, pattern: str, node: str = "head") -> str:
        """The text of a node's log files matching ``pattern``; ``worker-*.err``
        holds what replicas log through Python's logging (the serve_app logger)."""
        session = self.temp_dir / node / "session_latest" / "logs"
        return "\n".join(p.read_text(errors="replace") for p in sorted(session.glob(pattern)))

    def stop(self) -> None:
        """Every node's process group killed (a throwaway cluster: nothing to
        shut down gracefully, and SIGTERM takes Ray ~15 s per node), then the temp dir."""
        for node in reversed(self.nodes):
            try:
                os.killpg(node.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.process.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
