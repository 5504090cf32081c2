"""Every job, unchanged, on a multi-node Ray cluster (head + 2 worker nodes on this machine) with
an MLflow tracking server as the registry: submitted as a user does (`fedforge ... --address`),
then where its Ray actors ran is read back from Ray's state API.

Placement is made unambiguous by sizes, not by test-only resources: the head has 0 CPUs and each
worker node 2, so a job piece that asks for 2 CPUs (a Ray Train worker with
scaling.cpus_per_worker 2, a SuperNode's trainer with flower.cpus_per_supernode 2, a serving
replica with its 2-CPU bundle) fills one worker node, and two of them must land on both.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cluster.core.credentials import hash_api_key
from cluster.core.job_runner import submit_job
from cluster.core.jobs import SERVE
from cluster.records.registry import PRODUCTION, Registry
from tests.multinode.harness import (
    REPO,
    LocalCluster,
    fedforge,
    job_actors,
    job_config,
    submission_ids,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL = "fedforge-tiny"
SERVE_PORT = 8100  # not Serve's default 8000 (other local endpoints)


def _alive(actors, class_part: str) -> list:
    return [a for a in actors if class_part in a.class_name and a.state == "ALIVE"]


def _newest(registry: Registry):
    return max(registry.versions(MODEL), key=lambda v: int(v.version))


def submit(command: str, config: Path, cluster: LocalCluster, state) -> str:
    """`fedforge <command>` sent to the cluster as a Ray job; waits for it, returns its id."""
    started = time.monotonic()
    out = fedforge(
        command, "--config", str(config), "--state-dir", str(state.root),
        "--address", cluster.dashboard, timeout=600,
    )  # fmt: skip
    print(f"[multinode] {command} job: {time.monotonic() - started:.0f} s")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    [job] = submission_ids(out.stdout)
    return job


def test_finetune_workers_run_on_two_nodes(local_cluster: LocalCluster, cluster_state, tmp_path):
    config = job_config(
        "finetune",
        tmp_path,
        local_cluster,
        name="mn-finetune",
        scaling={"num_workers": 2, "cpus_per_worker": 2},
        train={"max_steps": 4, "checkpoint_every": 4},  # placement is the point, not accuracy
        eval={"max_examples": 4},
    )
    job = submit("finetune", config, local_cluster, cluster_state)

    workers = [a for a in job_actors(local_cluster, job) if a.class_name == "RayTrainWorker"]
    nodes = {a.node_id for a in workers}
    assert len(workers) == 2, [(a.class_name, a.state) for a in workers]
    assert nodes == local_cluster.worker_node_ids  # one rank on each worker node

    # Registered through the MLflow server: the adapter is an artifact the server holds.
    registry = Registry(local_cluster.tracking_uri)
    version = _newest(registry)
    assert version.lineage.kind == "finetune"
    assert version.source.startswith("mlflow-artifacts:"), version.source
    adapter = registry.download(MODEL, version.version, tmp_path / "download")
    assert (adapter / "adapter_config.json").is_file()
    # Rank 0, on a worker node, logged every step's metrics to the server.
    history = registry.client.get_metric_history(version.run_id, "tokens_per_s")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    # Checkpoints went to the state dir every node shares.
    assert list((cluster_state.ray_storage / "mn-finetune").rglob("adapter_model.safetensors"))


def test_supernodes_train_on_two_nodes(local_cluster: LocalCluster, cluster_state, tmp_path):
    config = job_config(
        "federated",
        tmp_path,
        local_cluster,
        name="mn-federated",
        # Not Flower's/the demo's default ports (9091-9093): other local federations.
        flower={
            "cpus_per_supernode": 2,
            "serverappio_port": 9191,
            "fleet_port": 9192,
            "control_port": 9193,
        },
        eval={"max_examples": 4},
    )
    job = submit("federate", config, local_cluster, cluster_state)

    actors = job_actors(local_cluster, job)
    trainers = [a for a in actors if a.class_name == "WarmTrainer"]
    hosts = [a for a in actors if a.class_name == "FlowerHost"]
    # Each SuperNode's training (its warm trainer holds the SuperNode's CPUs) on its own node.
    assert len(trainers) == 2
    assert {a.node_id for a in trainers} == local_cluster.worker_node_ids
    # Without TLS + node auth the Fleet API stays on loopback: the SuperLink and the two
    # flower-supernode processes share one node (see federated/federation.py), the job
    # driver's: the head, where a Fleet API Service or an open port sends outside SuperNodes.
    assert len(hosts) == 3 and {a.node_id for a in hosts} == {local_cluster.head_node_id}

    version = _newest(Registry(local_cluster.tracking_uri))
    assert version.lineage.kind == "federated"
    assert version.lineage.privacy.epsilon > 0
    rounds = cluster_state.root / "federated" / "mn-federated"
    assert rounds.is_dir() and any(rounds.rglob("adapter_model.safetensors"))


def test_serving_replicas_on_two_nodes(
    local_cluster: LocalCluster, cluster_state, tmp_path, monkeypatch
):
    from openai import APIConnectionError, APIStatusError, APITimeoutError, OpenAI
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    config = job_config(
        "serve",
        tmp_path,
        local_cluster,
        autoscaling={"min_replicas": 2, "max_replicas": 2},
        http_port=SERVE_PORT,
    )
    key = "sk-multinode-test"
    client = JobSubmissionClient(local_cluster.dashboard)
    monkeypatch.chdir(REPO)  # the job's working dir
    started = time.monotonic()
    job = submit_job(
        client,
        SERVE.module,
        ["--config", str(config), "--state-dir", str(cluster_state.root)],
        env={"FEDFORGE_API_KEYS": hash_api_key(key)},
        python="python",
    )
    api = OpenAI(
        base_url=f"http://127.0.0.1:{SERVE_PORT}/v1", api_key=key, max_retries=0, timeout=60
    )
    try:
        deadline = time.monotonic() + 480
        while True:
            status = client.get_job_status(job)
            assert not status.is_terminal(), f"{status}: {client.get_job_logs(job)[-4000:]}"
            try:
                api.chat.completions.create(
                    model="fedforge-tiny-base",
                    messages=[{"role": "user", "content": "hello"}],
                    max_tokens=1,
                )
                break
            except (APIConnectionError, APIStatusError, APITimeoutError):
                assert time.monotonic() < deadline, client.get_job_logs(job)[-4000:]
                time.sleep(3)
        print(f"[multinode] 2 replicas answering {time.monotonic() - started:.0f} s after submit")

        actors = list_actors(address=local_cluster.dashboard, detail=True, limit=10_000)
        replicas = _alive(actors, "EngineServer")
        assert len(replicas) == 2, [a.class_name for a in replicas]
        assert {a.node_id for a in replicas} == local_cluster.worker_node_ids

        # A registered adapter, fetched by a replica from the MLflow server.
        versions = Registry(local_cluster.tracking_uri).versions(MODEL)
        for version in versions[-2:]:
            answer = api.chat.completions.create(
                model=f"{MODEL}:{version.version}",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=2,
            )
            assert answer.model == f"{MODEL}:{version.version}"
    finally:
        client.stop_job(job)  # SIGTERM: serve.deploy shuts Serve down
        deadline = time.monotonic() + 90
        while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
            time.sleep(1)
    deadline = time.monotonic() + 60  # the Serve controller removes replicas asynchronously
    while _alive(list_actors(address=local_cluster.dashboard, limit=10_000), "ServeReplica"):
        assert time.monotonic() < deadline, "replicas outlived the serving job"
        time.sleep(2)


def test_demo_runs_to_the_end_on_the_cluster(local_cluster: LocalCluster, cluster_state):
    registry = Registry(local_cluster.tracking_uri)
    before = {v.version for v in registry.versions(MODEL)}
    started = time.monotonic()
    out = fedforge(
        "demo", "--profile", "tiny", "--state-dir", str(cluster_state.root),
        "--address", local_cluster.dashboard, "--tracking-uri", local_cluster.tracking_uri,
        timeout=900,
    )  # fmt: skip
    print(f"[multinode] demo: {time.monotonic() - started:.0f} s")
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    assert "demo finished in" in out.stdout
    assert f"{MODEL}:" in out.stdout and "answered:" in out.stdout
    assert len(submission_ids(out.stdout)) == 4  # every stage but the gate is a Ray job

    new = [v for v in registry.versions(MODEL) if v.version not in before]
    assert sorted(v.lineage.kind for v in new) == ["federated", "finetune"]
    assert all(v.source.startswith("mlflow-artifacts:") for v in new)
    production = registry.aliases(MODEL).get(PRODUCTION)
    assert production is not None
