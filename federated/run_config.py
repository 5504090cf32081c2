"""What the job hands Flower's apps: the run config (every app) and a node config (one SuperNode).

The run config carries the validated config (as YAML), the plan made at job start (as JSON) and
the server's state dir, by value: a SuperNode on another machine reads the same settings and
resolves paths in them (data, models) on its own side. The keys are the ones declared in
federated/flower_app/pyproject.toml. Light imports only: ClientApps read both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from cluster.core.config import dump_config
from cluster.core.federated_config import FederatedConfig
from cluster.core.state import StateDir
from federated.plan import FederatedPlan
from federated.protocol import PARTITION_ID

CONFIG_YAML, PLAN_JSON, STATE_DIR = "config-yaml", "plan-json", "state-dir"
RAY_NAMESPACE = "fedforge"  # where warm trainers are named


# NodeConfig field -> its key in Flower's node config
_NODE_KEYS = {
    "partition": PARTITION_ID,
    "data_path": "data-path",
    "state_dir": STATE_DIR,
    "warm_trainer": "warm-trainer",
    "ray_address": "ray-address",
}


@dataclass(frozen=True)
class NodeConfig:
    """A SuperNode's `--node-config`: whose data it trains on, and who trains for it."""

    partition: int | None = None  # an in-cluster node: its planned share of the job's data
    data_path: str | None = None  # an outside node: its own examples file
    state_dir: str | None = None  # an outside node's own state dir (its provisioned models)
    warm_trainer: str | None = None  # an in-cluster node: the Ray actor that trains for it
    ray_address: str | None = None  # ... and the Ray cluster that actor lives in

    def to_flower(self) -> str:
        """The `--node-config` argument of `flower-supernode`."""
        values = {key: getattr(self, name) for name, key in _NODE_KEYS.items()}
        return " ".join(f"{key}={json.dumps(v)}" for key, v in values.items() if v is not None)

    @classmethod
    def from_flower(cls, node_config: Mapping) -> NodeConfig:
        """A node config as Flower gives it to an app (keys of other tools are ignored)."""
        values = {name: node_config.get(key) for name, key in _NODE_KEYS.items()}
        if (values["partition"] is None) == (values["data_path"] is None):
            raise ValueError(
                f"a SuperNode's node config needs exactly one of {PARTITION_ID} (in-cluster) "
                f"and {_NODE_KEYS['data_path']} (its own data), got {dict(node_config)}"
            )
        partition = values.pop("partition")
        return cls(
            partition=None if partition is None else int(partition),
            **{name: None if v is None else str(v) for name, v in values.items()},
        )


@dataclass(frozen=True)
class RunSpec:
    """What every app of a run reads: the config, the plan made from it, the state dir."""

    cfg: FederatedConfig
    plan: FederatedPlan
    state: StateDir

    def to_flower(self) -> dict[str, str]:
        """Flower's run config (`flwr run --run-config`)."""
        return {
            CONFIG_YAML: dump_config(self.cfg),
            PLAN_JSON: self.plan.model_dump_json(),
            STATE_DIR: str(self.state.root),
        }

    @classmethod
    def from_flower(cls, run_config: Mapping, node: NodeConfig | None = None) -> RunSpec:
        """The run as an app sees it: a node's own `state-dir` overrides the server's."""
        state_dir = (node.state_dir if node else None) or run_config[STATE_DIR]
        return cls(
            cfg=FederatedConfig.model_validate(yaml.safe_load(run_config[CONFIG_YAML])),
            plan=FederatedPlan.model_validate_json(run_config[PLAN_JSON]),
            state=StateDir.resolve(state_dir),
        )
