"""A real federation on loopback: Ray-placed SuperLink + SuperNodes, TLS and node keys, plus
SuperNodes started outside Ray the way a client owner starts theirs.

One round, five would-be clients:
- in-cluster SuperNodes 0, 1, 2 (Ray actors); number 2 is killed mid-round,
- an outside SuperNode with an authorised key whose ClientApp sends NaN (rejected),
- an outside SuperNode with an unknown key (refused at connect).
The round must still aggregate nodes 0 and 1, save the adapter and log who was left out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from federated.certs import make_node_key
from federated.federation import Federation
from federated.flower_processes import process_env
from federated.planning import make_plan
from federated.run_config import NodeConfig, RunSpec
from federated.run_files import RunFiles
from federated.strategy import RoundReport
from llm.lora import load_adapter
from llm.model import load_model
from tests.federated.tiny_config import REPO, tiny

# Imported by every Python process started with this directory on PYTHONPATH: it makes the
# ClientApp of that SuperNode return NaN tensors (a broken or malicious client).
POISON = """
import dataclasses
import torch
from flwr.app import ArrayRecord
import federated.local_train as local_train

_train_round = local_train.train_round

def _nan_round(*args, **kwargs):
    result = _train_round(*args, **kwargs)
    state = result.arrays.to_torch_state_dict()
    poisoned = ArrayRecord({k: torch.full_like(v, float("nan")) for k, v in state.items()})
    return dataclasses.replace(result, arrays=poisoned)

local_train.train_round = _nan_round
"""


def _outside_supernode(
    federation: Federation, key: Path, port: int, log: Path, extra_path: str | None = None
) -> subprocess.Popen:
    """`flower-supernode` as a client owner runs it, with their own data and state dir."""
    data = REPO / "llm" / "demo_task" / "tickets.jsonl"
    env = process_env()
    if extra_path:
        env["PYTHONPATH"] = f"{extra_path}{os.pathsep}{env['PYTHONPATH']}"
    argv = [
        str(Path(sys.executable).parent / "flower-supernode"),
        "--superlink",
        federation.address,
        "--root-certificates",
        str(federation.root_certificates),
        "--auth-supernode-private-key",
        str(key),
        "--clientappio-api-address",
        f"127.0.0.1:{port}",
        "--node-config",
        NodeConfig(data_path=str(data)).to_flower(),
        "--max-retries",
        "3",
        "--max-wait-time",
        "20",
    ]
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.integration
def test_round_survives_a_dead_node_a_nan_client_and_refuses_an_unknown_key(tmp_path, state):
    keys = tmp_path / "keys"
    trusted, trusted_pub = make_node_key(keys / "hospital")
    stranger, _ = make_node_key(keys / "stranger")
    cfg = tiny(
        tmp_path,
        federation={
            "num_clients": 3,
            "min_available_nodes": 4,
            "min_train_nodes": 2,
            "local_steps": 1,
        },
        partition={"scheme": "iid", "min_examples": 8},
        flower={
            "host": "127.0.0.1",
            "fleet_port": 19192,
            "control_port": 19193,
            "serverappio_port": 19191,
            "tls": True,
            "supernode_auth": True,
            "authorized_keys": [str(trusted_pub)],
            "external_clients": 2,
            "cpus_per_supernode": 0.1,
        },
    )
    poison_dir = tmp_path / "poison"
    poison_dir.mkdir()
    (poison_dir / "sitecustomize.py").write_text(POISON)
    files = RunFiles(state, cfg.name)
    ray.init(num_cpus=2, include_dashboard=False)
    outside: list[subprocess.Popen] = []
    try:
        with Federation(RunSpec(cfg, make_plan(cfg), state), files) as federation:
            nan_log = tmp_path / "nan.log"
            bad = _outside_supernode(federation, trusted, 19194, nan_log, str(poison_dir))
            refused = _outside_supernode(federation, stranger, 19195, tmp_path / "refused.log")
            outside += [bad, refused]

            reports: list[RoundReport] = []
            runner = threading.Thread(target=federation.run, args=(reports.append,))
            runner.start()
            victim_log = federation.logs / "supernode-2.log"
            _wait_for(lambda: "Receiving: train message" in victim_log.read_text(), 240, "round 1")
            os.killpg(federation.node_pids[2], signal.SIGKILL)  # as if its machine died
            runner.join(timeout=300)
            assert not runner.is_alive(), "the round did not finish"

            assert refused.wait(timeout=60) != 0
            assert (
                "No SuperNode found with the given public key"
                in (tmp_path / "refused.log").read_text()
            )
    finally:
        for proc in outside:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        ray.shutdown()

    [report] = files.rounds()
    assert report.clients == 2
    assert len(report.failed) == 1  # the killed in-cluster node
    [why] = report.rejected.values()  # the NaN client, logged with its reason
    assert "finite" in why or "nan" in why.lower()
    assert sorted(c.partition for c in report.per_client.values()) == [0, 1]
    before, after = (
        load_adapter(load_model(state.base_model("tiny")), files.adapter_dir(r)) for r in (0, 1)
    )
    after_state = after.state_dict()
    lora = [k for k in after_state if "lora_" in k]
    assert all(np.isfinite(after_state[k].numpy()).all() for k in lora)
    assert any(not np.array_equal(before.state_dict()[k], after_state[k]) for k in lora)
    leftovers = subprocess.run(
        ["pgrep", "-f", f"flower-super.*{cfg.flower.fleet_port}"], capture_output=True
    )
    assert leftovers.stdout == b"", "Flower processes survived the federation"
