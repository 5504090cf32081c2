"""An in-cluster ClientApp process stays light: it hands the round to the node's warm trainer.

The child process below is what Flower starts for every message on an in-cluster SuperNode:
it builds the ClientApp, parses the node config with Flower's own parser and runs the train
handler on a real Message and Context. The warm trainer is a real `WarmTrainer` actor in a Ray
cluster this test starts. The child reports which heavy modules it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import ray
import torch

from federated.adapter_state import adapter_to_arrays
from federated.flower_processes import WarmTrainer, process_env
from federated.local_train import lora_model
from federated.planning import make_plan
from federated.run_config import RAY_NAMESPACE, NodeConfig, RunSpec
from tests.federated.tiny_config import tiny

HEAVY = ["torch", "opacus", "transformers", "peft"]

CHILD = """
import json, sys

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import parse_config_args

from federated.client_app import build_client_app
from federated.privacy.ledger import Attempt
from federated.node_task import ClientState
from federated.protocol import TrainReply, TrainTask

arrays_path, run_config_path, node_config = sys.argv[1:4]
with np.load(arrays_path) as saved:
    arrays = ArrayRecord({key: Array(saved[key]) for key in saved.files})
context = Context(
    run_id=1,
    node_id=1,
    node_config=parse_config_args([node_config]),
    state=RecordDict(),
    run_config=json.loads(open(run_config_path).read()),
)
content = TrainTask(arrays, (Attempt(1, 1, 1.0),)).to_content()  # tiny.yaml's noise
task = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
reply = build_client_app()(task, context)
metrics = TrainReply.from_content(reply.content).metrics
seen = {
    "heavy": sorted(m for m in json.loads(sys.argv[4]) if m in sys.modules),
    "partition": metrics.partition,
    "epsilon": metrics.epsilon,
    "steps_kept": ClientState.load(context.state).steps,
}
print("SEEN " + json.dumps(seen), flush=True)
"""


@pytest.mark.integration
def test_a_warm_client_app_process_imports_neither_torch_nor_opacus(tmp_path, state):
    cfg = tiny(tmp_path, federation={"local_steps": 1})
    run_config = tmp_path / "run-config.json"
    run_config.write_text(json.dumps(RunSpec(cfg, make_plan(cfg), state).to_flower()))
    arrays = adapter_to_arrays(lora_model(cfg, state.base_model("tiny"), torch.device("cpu")))
    np.savez(tmp_path / "arrays.npz", **{key: array.numpy() for key, array in arrays.items()})
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        name = "fedforge-test-trainer-0"
        trainer = WarmTrainer.options(name=name, namespace=RAY_NAMESPACE).remote(1)
        ray.get(trainer.__ray_ready__.remote())  # up (the handle keeps it alive)
        gcs = ray.get_runtime_context().gcs_address
        node = NodeConfig(partition=0, warm_trainer=name, ray_address=gcs)
        argv = [str(tmp_path / "arrays.npz"), str(run_config), node.to_flower(), json.dumps(HEAVY)]
        done = subprocess.run(
            [sys.executable, "-c", CHILD, *argv],
            env=process_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        ray.shutdown()

    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("SEEN ")]
    seen = json.loads(line.removeprefix("SEEN "))
    assert seen["heavy"] == [], f"the ClientApp process imported {seen['heavy']}"
    assert seen["partition"] == 0 and seen["epsilon"] > 0  # trained by the actor, with DP
    assert seen["steps_kept"] == 1  # and the client's state kept for its next message
