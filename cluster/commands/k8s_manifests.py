"""Kubernetes manifests for KubeRay, generated from a profile's job configs so they never drift.

For profile P it reads configs/{finetune,federated,serve}/P.yaml and writes, under <out>/P/:
a PersistentVolumeClaim for the shared state dir, a RayCluster for the jobs, one RayJob per
job (`python -m llm.finetune ...`, `python -m federated.run ...`, exactly what `ray job
submit` runs) sent to that cluster, a RayService whose serveConfigV2 is the one
`python -m serve.deploy --write-serve-config` writes, and, when the federated config opens the
Fleet API to other machines (TLS + node auth), a LoadBalancer Service for outside SuperNodes.
Resources come from the configs (CPUs per worker, GPUs, workers, serving replicas); memory,
which no config states, from the profile's sizing below. Secrets are Secret references only.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml

from cluster.commands.k8s_pods import STATE_DIR, PodShape, PodSpec, ray_cluster_spec
from cluster.core.config import FinetuneConfig, load_config
from cluster.core.errors import UserError
from cluster.core.federated_config import FederatedConfig
from cluster.core.jobs import FEDERATE, FINETUNE, SERVE
from cluster.core.serve_config import ServeConfig
from cluster.core.state import DEMO

API_KEYS_SECRET = "fedforge-api-keys"  # kubectl create secret generic ... --from-literal=...
API_KEYS_SECRET_KEY = "api-keys"


class K8sError(UserError):
    """The manifests cannot be generated as asked (unknown profile, configs that disagree)."""


@dataclass(frozen=True)
class Profile:
    """What the configs do not say: the image variant, memory per pod, the state volume's size.

    Demo figures from DESIGN.md: a 135M fine-tuning worker peaks at 2.7 GB, a CPU vLLM replica
    needs about 4.5 GB with its KV cache; the head runs the jobs' drivers.
    """

    variant: str
    head: PodShape
    worker_memory: str
    replica_memory: str
    state_size: str


PROFILES = {
    "demo": Profile("cpu", PodShape(cpus=1, memory="4Gi"), "4Gi", "6Gi", state_size="20Gi"),
    "gpu": Profile("gpu", PodShape(cpus=4, memory="32Gi"), "48Gi", "48Gi", state_size="500Gi"),
}


@dataclass(frozen=True)
class ProfileConfigs:
    """A profile's three configs, and their paths as the image sees them (relative to WORKDIR)."""

    name: str
    finetune: FinetuneConfig
    federated: FederatedConfig
    serve: ServeConfig

    def path(self, kind: str) -> str:
        return f"configs/{kind}/{self.name}.yaml"


def load_profile(profile: str, root: Path) -> ProfileConfigs:
    """Read and validate the profile's configs under `root` (the repository)."""
    if profile not in PROFILES:
        raise K8sError(f"unknown profile '{profile}' (choose {', '.join(PROFILES)})")
    kinds = {"finetune": FinetuneConfig, "federated": FederatedConfig, "serve": ServeConfig}
    loaded = {k: load_config(root / "configs" / k / f"{profile}.yaml", m) for k, m in kinds.items()}
    uris = {kind: cfg.registry.tracking_uri for kind, cfg in loaded.items()}
    if len(set(uris.values())) != 1:  # the endpoint must read the registry the jobs write
        listed = ", ".join(f"{kind}: {uri}" for kind, uri in uris.items())
        raise K8sError(f"profile '{profile}': configs disagree on registry.tracking_uri ({listed})")
    return ProfileConfigs(profile, **loaded)


def default_image(profile: str) -> str:
    return f"fedforge:{version('fedforge')}-{PROFILES[profile].variant}"


def serve_app_config(configs: ProfileConfigs, root: Path) -> dict:
    """The Serve config `python -m serve.deploy --write-serve-config` writes, made for a pod.

    The control plane does not import serve/: it runs the module, as a user would. Two values
    are the pod's, not this machine's: the proxy listens on every interface (KubeRay's Serve
    service reaches it at the pod's IP; the API key check stays on), and the state dir is the
    shared volume (the module writes the absolute state dir it was given: a scratch one here).
    """
    with tempfile.TemporaryDirectory(prefix="fedforge-k8s-") as scratch:
        out = Path(scratch) / "serve.yaml"
        argv = [sys.executable, "-m", SERVE.module, "--config", configs.path(SERVE.configs_dir)]
        argv += ["--state-dir", str(Path(scratch) / "state"), "--write-serve-config", str(out)]
        done = subprocess.run(argv, cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            raise K8sError(f"`{' '.join(argv[1:5])}` failed:\n{done.stderr.strip()[-2000:]}")
        app_config = yaml.safe_load(out.read_text())
    apps = app_config.get("applications") or []
    if len(apps) != 1 or "state_dir" not in apps[0].get("args", {}):
        raise K8sError(
            f"{SERVE.module} wrote an unexpected Serve config (one app with a state_dir)"
        )
    app_config["http_options"]["host"] = "0.0.0.0"
    apps[0]["args"]["state_dir"] = STATE_DIR
    return app_config


def _meta(name: str, profile: str, component: str) -> dict:
    labels = {
        "app.kubernetes.io/name": "fedforge",
        "app.kubernetes.io/instance": f"fedforge-{profile}",
        "app.kubernetes.io/component": component,
    }
    return {"name": name, "labels": labels}


def _jobs_workers(configs: ProfileConfigs, memory: str) -> tuple[PodShape, int]:
    """One worker pod shape that fits a Ray Train worker and a SuperNode, and enough of them
    for the larger of the two jobs (they run one after the other on this cluster)."""
    scaling, flower = configs.finetune.scaling, configs.federated.flower
    clients = configs.federated.federation.num_clients
    cpus = max(scaling.cpus_per_worker, math.ceil(flower.cpus_per_supernode))
    gpus = max(int(scaling.use_gpu), math.ceil(flower.gpus_per_supernode))
    pods = [scaling.num_workers, math.ceil(clients * flower.cpus_per_supernode / cpus)]
    if gpus:
        pods.append(math.ceil(clients * flower.gpus_per_supernode / gpus))
    return PodShape(cpus=cpus, memory=memory, gpus=gpus), max(pods)


def manifests(configs: ProfileConfigs, serve_app: dict, image: str) -> dict[str, dict]:
    """Every manifest of the profile, by file name."""
    profile, sizing = configs.name, PROFILES[configs.name]
    name = f"fedforge-{profile}"
    ray_version = version("ray")
    uses_demo = DEMO in {c.model.base for c in (configs.finetune, configs.federated, configs.serve)}
    flower = configs.federated.flower
    fleet_port = flower.fleet_port if flower.secure else None
    jobs_pods = PodSpec(image, f"{name}-state", uses_demo, fleet_port=fleet_port)
    worker, pods = _jobs_workers(configs, sizing.worker_memory)
    out = {
        "state-pvc.yaml": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _meta(f"{name}-state", profile, "state"),
            "spec": {
                "accessModes": ["ReadWriteMany"],  # every node reads and writes it
                "resources": {"requests": {"storage": sizing.state_size}},
            },
        },
        "raycluster.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": _meta(name, profile, "jobs"),
            "spec": ray_cluster_spec(
                jobs_pods, ray_version, sizing.head, worker, "workers", (pods, pods, pods)
            ),
        },
    }
    for trained in (FINETUNE, FEDERATE):
        job, config = trained.configs_dir, configs.path(trained.configs_dir)
        command = f"python -m {trained.module} --config {config} --state-dir {STATE_DIR}"
        out[f"rayjob-{job}.yaml"] = {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": _meta(f"{name}-{job}", profile, job),
            "spec": {"clusterSelector": {"ray.io/cluster": name}, "entrypoint": command},
        }
    out["rayservice.yaml"] = _ray_service(configs, serve_app, image, ray_version, uses_demo)
    if fleet_port:
        out["flower-fleet-service.yaml"] = _fleet_service(name, profile, fleet_port)
    return out


def _ray_service(
    configs: ProfileConfigs, serve_app: dict, image: str, ray_version: str, uses_demo: bool
) -> dict:
    cfg, sizing = configs.serve, PROFILES[configs.name]
    name = f"fedforge-{configs.name}"
    api_keys = {
        "name": cfg.auth.api_keys_env,
        "valueFrom": {
            "secretKeyRef": {
                "name": API_KEYS_SECRET,
                "key": API_KEYS_SECRET_KEY,
                "optional": not cfg.auth.required,
            }
        },
    }
    port = serve_app["http_options"]["port"]
    pods = PodSpec(image, f"{name}-state", uses_demo, env=(api_keys,), serve_port=port)
    # A replica holds its actor's CPU plus its engine bundle (cpus_per_replica [+ 1 GPU]).
    gpus = int(cfg.accelerator == "gpu")
    replica = PodShape(cpus=cfg.cpus_per_replica + 1, memory=sizing.replica_memory, gpus=gpus)
    scaling = cfg.autoscaling
    replicas = (scaling.min_replicas, max(scaling.min_replicas, 1), scaling.max_replicas)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        # Not the RayCluster's name: KubeRay names both clusters' services after their owner.
        # Clients reach the endpoint at service <name>-endpoint-serve-svc.
        "metadata": _meta(f"{name}-endpoint", configs.name, "serve"),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_app, sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(
                pods, ray_version, sizing.head, replica, "replicas", replicas
            ),
        },
    }


def _fleet_service(cluster: str, profile: str, port: int) -> dict:
    """Outside SuperNodes reach the SuperLink here, on the head, where the federated job's
    driver runs (a RayJob's entrypoint runs on the head): federated.federation pins the
    SuperLink's actor to the driver's node (Ray's default scheduling alone put a zero-CPU actor
    on the driver's node 2 times in 10 in a 3-node test)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(f"{cluster}-flower-fleet", profile, "flower-fleet"),
        "spec": {
            "type": "LoadBalancer",
            "selector": {"ray.io/cluster": cluster, "ray.io/node-type": "head"},
            "ports": [
                {"name": "flower-fleet", "port": port, "targetPort": "flower-fleet"},
            ],
        },
    }


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML for review and `kubectl`: multi-line strings (serveConfigV2) as literal
    blocks, no anchors or aliases for repeated values, no folding of long lines."""

    def ignore_aliases(self, data) -> bool:
        return True


_ManifestDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def render(filename: str, manifest: dict, profile: str) -> str:
    header = (
        f"# Generated by `fedforge k8s generate --profile {profile}` from configs/*/{profile}.yaml"
        f" ({filename}).\n# Do not edit: change the configs and generate again.\n"
    )
    return header + yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, width=4096)


def generate(profile: str, root: Path, out: Path, image: str | None = None) -> list[Path]:
    """Write the profile's manifests to out/<profile>/ (replacing what was there); return them."""
    configs = load_profile(profile, root)
    rendered = {
        filename: render(filename, manifest, profile)
        for filename, manifest in manifests(
            configs, serve_app_config(configs, root), image or default_image(profile)
        ).items()
    }
    target = out / profile
    target.mkdir(parents=True, exist_ok=True)
    for stale in set(target.glob("*.yaml")) - {target / f for f in rendered}:
        stale.unlink()
    for filename, text in rendered.items():
        (target / filename).write_text(text)
    return [target / f for f in rendered]
