"""The fine-tuning job end to end on the tiny model: a real local Ray head, 2 Ray Train workers,
a real MLflow store. Each job runs as its own process, as `ray job submit` would run it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.core.example_ids import ExampleKey
from cluster.core.jobs import FINETUNE
from cluster.records.lineage import CONFIG_FILE
from cluster.records.registry import CANDIDATE, Registry

pytestmark = [pytest.mark.slow, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path: Path, **train) -> Path:
    cfg = yaml.safe_load((REPO / "configs/finetune/tiny.yaml").read_text())
    cfg["train"].update(train)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_job(config: Path, state, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            FINETUNE.module,
            "--config",
            str(config),
            "--state-dir",
            str(state.root),
        ],
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )


def start_until_first_checkpoint(config: Path, state, log: Path) -> subprocess.Popen:
    """Start the job and return once Ray Train has recorded its first checkpoint."""
    snapshot = state.ray_storage / "tiny-finetune" / "checkpoint_manager_snapshot.json"
    job = start_job(config, state, log)
    deadline = time.monotonic() + 300
    while not snapshot.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert snapshot.exists(), log.read_text()[-3000:]
    return job


def steps_logged(log: Path) -> list[tuple[int, float]]:
    pattern = re.compile(r"\[fedforge\] step (\d+)/\d+ loss ([0-9.]+)")
    return [(int(m[1]), float(m[2])) for m in pattern.finditer(log.read_text())]


def test_two_worker_run_lowers_the_loss_and_registers_lineage(tmp_path, state):
    config = tiny_config(tmp_path, max_steps=12, learning_rate=1e-2)
    log = tmp_path / "job.log"
    job = start_job(config, state, log)
    assert job.wait(timeout=600) == 0, log.read_text()[-3000:]

    steps = steps_logged(log)
    assert [s for s, _ in steps] == list(range(1, 13))
    first, last = steps[0][1], sum(loss for _, loss in steps[-3:]) / 3
    assert last < first - 0.3, steps

    registry = Registry(state.default_tracking_uri())
    (version,) = registry.versions("fedforge-tiny")
    assert registry.aliases("fedforge-tiny") == {CANDIDATE: version.version}
    lineage = version.lineage
    data = REPO / "llm/demo_task/tickets.jsonl"
    assert lineage.dataset_digest == ExampleKey.of(state).file_digest(data)  # keyed, not plain
    assert lineage.base_model == "tiny" and lineage.kind == "finetune"
    assert lineage.lora_rank == yaml.safe_load(config.read_text())["lora"]["r"]
    config_text = registry.read_text(version, CONFIG_FILE)  # registered beside the adapter
    assert yaml.safe_load(config_text)["train"]["max_steps"] == 12
    assert "torch" in lineage.packages
    assert lineage.metrics["eval_loss"] > 0 and "loss" in lineage.metrics
    run = registry.client.get_run(version.run_id)
    history = registry.client.get_metric_history(version.run_id, "loss")
    assert len(history) >= 12 and run.info.status == "FINISHED"


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, state):
    config = tiny_config(tmp_path, max_steps=24, checkpoint_every=4)
    first_log = tmp_path / "first.log"
    job = start_until_first_checkpoint(config, state, first_log)
    os.killpg(job.pid, signal.SIGKILL)  # the driver, its Ray head and every worker
    job.wait()
    killed_at = max(s for s, _ in steps_logged(first_log))
    assert killed_at < 24

    second_log = tmp_path / "second.log"
    job = start_job(config, state, second_log)
    assert job.wait(timeout=600) == 0, second_log.read_text()[-3000:]
    resumed = re.search(r"resumed from checkpoint at step (\d+)", second_log.read_text())
    assert resumed, second_log.read_text()[-3000:]
    resumed_at = int(resumed[1])
    assert resumed_at >= 4 and resumed_at % 4 == 0 and resumed_at <= killed_at
    steps = [s for s, _ in steps_logged(second_log)]
    assert steps == list(range(resumed_at + 1, 25))


def test_a_killed_worker_is_replaced_and_the_run_goes_on_from_its_last_checkpoint(tmp_path, state):
    import psutil

    config = tiny_config(tmp_path, max_steps=24, checkpoint_every=4)  # scaling.max_failures: 1
    log = tmp_path / "job.log"
    job = start_until_first_checkpoint(config, state, log)
    workers = [
        p
        for p in psutil.Process(job.pid).children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    killed_at = max(s for s, _ in steps_logged(log))
    workers[-1].kill()  # one rank dies mid-run; the other is left running
    killed = time.monotonic()

    assert job.wait(timeout=600) == 0, log.read_text()[-3000:]
    finished_in = time.monotonic() - killed
    resumed = re.findall(r"resumed from checkpoint at step (\d+)", log.read_text())
    assert len(resumed) == 1, log.read_text()[-3000:]
    resumed_at = int(resumed[0])
    print(
        f"\nworker killed after step {killed_at}; group restarted from step {resumed_at}; "
        f"run finished {finished_in:.0f} s after the kill"
    )
    assert 4 <= resumed_at <= killed_at + 4 and resumed_at % 4 == 0
    steps = [s for s, _ in steps_logged(log)]
    # Steps up to the kill, then the replaced group from the checkpoint on: none skipped.
    assert steps[-(24 - resumed_at) :] == list(range(resumed_at + 1, 25)), steps
    (version,) = Registry(state.default_tracking_uri()).versions("fedforge-tiny")
    assert version.lineage.metrics["eval_loss"] > 0
