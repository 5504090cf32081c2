"""Ray pod templates for KubeRay: the one place that says what every fedforge pod looks like.

Every pod runs the fedforge image as its non-root user, mounts the shared state volume at
`STATE_DIR` (checkpoints, rounds, the SQLite registry and its artifacts, the adapter cache: what
every node must see), and takes its secrets from Kubernetes Secrets by reference, never as
literal values. Field names follow KubeRay v1.7.0's CRDs (tests validate against them).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.core.state import DEMO_MODEL_DIRNAME, ENV_VAR

STATE_DIR = "/var/lib/fedforge"  # the shared volume's mount path, in every pod
# Where the CPU image keeps the demo model it provisioned at build time (see Dockerfile): the
# state volume hides the image's own state dir, so an init container links the model into it.
SEED_STATE_DIR = "/opt/fedforge/seed"
USER_ID = 1000  # the image's `fedforge` user (Dockerfile)
CREDENTIALS_SECRET = "fedforge-credentials"  # optional: MLflow server login, hub token, S3 keys


@dataclass(frozen=True)
class PodShape:
    """What one Ray node asks Kubernetes for."""

    cpus: int
    memory: str
    gpus: int = 0


@dataclass(frozen=True)
class PodSpec:
    """What every pod of one deployment shares: image, state volume, extra env (secret refs)."""

    image: str
    state_claim: str
    link_demo_model: bool
    env: tuple[dict, ...] = ()
    fleet_port: int | None = None  # named container port on the head (Flower's Fleet API)
    serve_port: int | None = None  # named container port KubeRay's Serve service targets


def _resources(shape: PodShape) -> dict:
    amounts = {"cpu": str(shape.cpus), "memory": shape.memory}
    if shape.gpus:
        amounts["nvidia.com/gpu"] = str(shape.gpus)
    # Requests equal limits: Ray sizes its node from them, and Kubernetes then guarantees them.
    return {"requests": dict(amounts), "limits": amounts}


def _link_demo_model(image: str) -> dict:
    """Init container: link the image's demo model into the state volume (idempotent; every
    pod uses the same image, so the link resolves on every node)."""
    models = f"{STATE_DIR}/models"
    target = f"{models}/{DEMO_MODEL_DIRNAME}"
    script = (
        f"mkdir -p {models} && "
        f"{{ [ -e {target} ] || ln -s {SEED_STATE_DIR}/models/{DEMO_MODEL_DIRNAME} {target}; }}"
    )
    return {
        "name": "link-demo-model",
        "image": image,
        "command": ["sh", "-c", script],
        "volumeMounts": [{"name": "state", "mountPath": STATE_DIR}],
        "securityContext": {"allowPrivilegeEscalation": False},
    }


def pod_template(spec: PodSpec, shape: PodShape, container: str, head: bool) -> dict:
    """A RayCluster group's `template`: one Ray container, the state volume, /dev/shm in RAM."""
    env = [
        {"name": ENV_VAR, "value": STATE_DIR},
        {"name": "HF_HOME", "value": f"{STATE_DIR}/huggingface"},  # hub downloads, shared
        *spec.env,
    ]
    ports = []
    if head and spec.fleet_port:
        ports.append({"name": "flower-fleet", "containerPort": spec.fleet_port})
    if spec.serve_port:
        ports.append({"name": "serve", "containerPort": spec.serve_port})
    ray = {
        "name": container,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": _resources(shape),
        "env": env,
        "envFrom": [{"secretRef": {"name": CREDENTIALS_SECRET, "optional": True}}],
        "volumeMounts": [
            {"name": "state", "mountPath": STATE_DIR},
            {"name": "shm", "mountPath": "/dev/shm"},  # Ray's object store and torch's gloo
        ],
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    if ports:
        ray["ports"] = ports
    pod = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "fsGroup": USER_ID,  # the state volume is writable by the image's user
        },
        "containers": [ray],
        "volumes": [
            {"name": "state", "persistentVolumeClaim": {"claimName": spec.state_claim}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if spec.link_demo_model:
        pod["initContainers"] = [_link_demo_model(spec.image)]
    return {"spec": pod}


def ray_cluster_spec(
    spec: PodSpec,
    ray_version: str,
    head: PodShape,
    worker: PodShape,
    group: str,
    replicas: tuple[int, int, int],
) -> dict:
    """A RayCluster `spec`: a head that runs drivers only (0 Ray CPUs) and one worker group.

    `replicas` is (min, initial, max) worker pods; the in-tree autoscaler runs when they differ.
    """
    low, initial, high = replicas
    cluster = {
        "rayVersion": ray_version,
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0"},  # jobs' work lands on workers, not the head
            "template": pod_template(spec, head, "ray-head", head=True),
        },
        "workerGroupSpecs": [
            {
                "groupName": group,
                "replicas": initial,
                "minReplicas": low,
                "maxReplicas": high,
                "rayStartParams": {},  # CPUs and GPUs come from the container's limits
                "template": pod_template(spec, worker, "ray-worker", head=False),
            }
        ],
    }
    if low != high:
        cluster = {"enableInTreeAutoscaling": True, **cluster}
    return cluster
