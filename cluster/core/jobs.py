"""The jobs table: the only place a worker module is named.

Every way in runs a job by its entry here (the CLI, the demo, `fedforge drift retrain`, the
privacy audit, the k8s generator, the benches and the tests), so `python -m <module>` is
written once, and what `ray job submit` runs is what every command runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from cluster.core.config import FinetuneConfig
from cluster.core.federated_config import FederatedConfig
from cluster.core.serve_config import ServeConfig


@dataclass(frozen=True)
class Job:
    name: str
    module: str  # what `python -m` (and `ray job submit -- python -m`) runs
    config: type[BaseModel] | None  # the schema of its --config (None: it takes none)
    configs_dir: str | None = None  # its folder under configs/ (one YAML per profile)


FINETUNE = Job("finetune", "llm.finetune", FinetuneConfig, "finetune")
FEDERATE = Job("federate", "federated.run", FederatedConfig, "federated")
SERVE = Job("serve", "serve.deploy", ServeConfig, "serve")
VERIFY = Job("verify", "llm.evaluate_registered", FinetuneConfig)  # production from the registry
PRIVACY_AUDIT = Job("privacy-audit", "federated.audit", FederatedConfig)
PROVISION = Job("provision", "llm.demo_model", None)  # the demo and tiny models

JOBS = {job.name: job for job in (FINETUNE, FEDERATE, SERVE, VERIFY, PRIVACY_AUDIT, PROVISION)}
TRAINING_JOBS = (FINETUNE, FEDERATE)  # jobs that register an adapter
