"""A real multi-node Ray cluster on this machine, for the whole session: a 0-CPU head and two
2-CPU worker nodes, each a separate `ray start` (its own raylet, resources and node id), plus an
MLflow tracking server, all started by `scripts/local_cluster.sh up` and stopped by `down`
(by the recorded process groups, never `ray stop`), also when a test fails.

Ports are not Ray's defaults (GCS 6390, dashboard 8266, MLflow 5055), so the cluster runs beside
other local Ray heads. Every job is submitted as a user would (`fedforge ... --address`); where
its Ray actors ran is read back from Ray's state API.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.core.state import StateDir
from tests.multinode.harness import REPO, LocalCluster

SCRIPT = REPO / "scripts" / "local_cluster.sh"
GCS_PORT, DASHBOARD_PORT, MLFLOW_PORT = 6390, 8266, 5055
WORKER_CPUS = 2  # per worker node: one serving replica (2 CPUs) or one 2-CPU job worker each
WORKERS = 2


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _script(action: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), action],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory) -> LocalCluster:
    taken = [p for p in (GCS_PORT, DASHBOARD_PORT, MLFLOW_PORT) if _listening(p)]
    if taken:
        pytest.fail(
            f"ports {taken} are taken: a cluster left running? `scripts/local_cluster.sh down`"
        )
    env = {
        **os.environ,
        "FEDFORGE_CLUSTER_DIR": str(tmp_path_factory.mktemp("cluster")),
        "VENV_BIN": str(Path(sys.executable).parent),
        "GCS_PORT": str(GCS_PORT),
        "DASHBOARD_PORT": str(DASHBOARD_PORT),
        "MLFLOW_PORT": str(MLFLOW_PORT),
        "HEAD_CPUS": "0",
        "WORKERS": str(WORKERS),
        "WORKER_CPUS": str(WORKER_CPUS),
    }
    env.pop("RAY_ADDRESS", None)
    # The cluster uses Ray's token authentication (the token in ~/.ray/auth_token): clients in
    # this process and the fedforge commands it runs must send it, as a user's shell would.
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "token")
    try:
        started = time.monotonic()
        up = _script("up", env, timeout=300)
        if up.returncode != 0:
            pytest.fail(f"local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
        print(f"\n[multinode] cluster up in {time.monotonic() - started:.0f} s", flush=True)
        dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"
        nodes = _nodes(dashboard)
        heads = [n.node_id for n in nodes if n.is_head_node]
        yield LocalCluster(
            dashboard=dashboard,
            gcs=f"127.0.0.1:{GCS_PORT}",
            tracking_uri=f"http://127.0.0.1:{MLFLOW_PORT}",
            head_node_id=heads[0],
            worker_node_ids=frozenset(n.node_id for n in nodes if not n.is_head_node),
        )
    finally:
        down = _script("down", env, timeout=120)
        print(f"[multinode] {down.stdout.strip()}", flush=True)
        patch.undo()


def _nodes(dashboard: str):
    from ray.util.state import list_nodes

    nodes = [n for n in list_nodes(address=dashboard, detail=True) if n.state == "ALIVE"]
    assert len(nodes) == WORKERS + 1, nodes
    assert len({n.node_id for n in nodes}) == WORKERS + 1
    for node in nodes:
        expected = 0 if node.is_head_node else WORKER_CPUS
        assert node.resources_total.get("CPU", 0) == expected, node
    return nodes


@pytest.fixture(scope="session")
def cluster_state(tmp_path_factory, provisioned: StateDir) -> StateDir:
    """One state dir for every job (Ray Train storage, federated rounds, reports): a path every
    node of this one-machine cluster shares. Its models/ links to the provisioned ones."""
    state = StateDir.resolve(tmp_path_factory.mktemp("state"))
    (state.root / "models").symlink_to(provisioned.models, target_is_directory=True)
    return state
