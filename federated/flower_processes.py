"""Flower's long-lived processes, owned by Ray actors so Ray places, tracks and stops them.

One `FlowerHost` actor runs the SuperLink (and the `flwr` CLI against its loopback Control API);
one per in-cluster SuperNode runs `flower-supernode`. Each process gets its own session (so its
children, such as the per-message ClientApp processes, are stopped with it) and is told to exit
when its actor's process dies, so a killed job leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray

from cluster.core.processes import exit_with_parent
from federated.node_task import NodeResult, NodeTask

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where `federated` is importable from


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This interpreter's scripts first on PATH (Flower starts `flower-superexec`, `flwr-*`),
    and the project importable, whatever directory the process starts in."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


@ray.remote(num_cpus=0, max_restarts=0)
class FlowerHost:
    """Runs Flower processes on the node Ray placed it on."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def node(self) -> tuple[str, str]:
        """This node's IP and Ray node id."""
        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def start(self, name: str, argv: list[str], env: dict[str, str], log_path: str) -> int:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                cwd=PROJECT_ROOT,
                env=process_env(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=exit_with_parent,
            )
        return self.procs[name].pid

    def wait_for_port(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs.values()):
                return False
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return True
            time.sleep(0.2)
        return False

    def returncode(self, name: str) -> int | None:
        return self.procs[name].poll()

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
        """A short command on this node (e.g. `flwr supernode register`): exit code, output."""
        done = subprocess.run(
            argv,
            cwd=PROJECT_ROOT,
            env=process_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.returncode, done.stdout + done.stderr

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM every process group, then SIGKILL what is still there after the grace."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # the group: ClientApps outlive it
                os.killpg(proc.pid, signal.SIGKILL)


@ray.remote(max_restarts=0)
class WarmTrainer:
    """One in-cluster SuperNode's training, in a process that outlives Flower's per-message
    ClientApp processes: torch, the tokenizer and the base model load once, not every round
    (federated.local_train caches them per process)."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)

    def train(self, task: NodeTask) -> NodeResult:
        from federated.local_train import train_for_node

        return train_for_node(task)
