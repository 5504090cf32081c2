"""KubeRay manifests (configs/k8s/) and the plain-VM cluster YAMLs (configs/cluster/).

The committed manifests are checked against KubeRay v1.7.0's CRD schemas (tests/data/kuberay-crds,
closed to unknown fields as `kubectl apply --validate=strict` is), against the configs they come
from, and for secrets; one integration test regenerates them and fails on any drift.
"""

from __future__ import annotations

import copy
import gzip
import json
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from cluster.commands.cli import app
from cluster.commands.k8s_manifests import (
    API_KEYS_SECRET,
    PROFILES,
    K8sError,
    generate,
    load_profile,
)
from cluster.commands.k8s_pods import STATE_DIR
from cluster.core.config import FinetuneConfig, load_config
from cluster.core.federated_config import FederatedConfig
from cluster.core.jobs import FEDERATE, FINETUNE
from cluster.core.serve_config import ServeConfig

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "tests" / "data" / "kuberay-crds"
GENERATED = REPO / "configs" / "k8s"
SECRET_NAME = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def _closed(schema):
    """The schema with every object that lists its properties closed to others: jsonschema
    would accept a misspelt field that the API server drops (or rejects, when strict)."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if "properties" in schema:
        closed["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            closed.setdefault("additionalProperties", False)
    return closed


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml.gz"
    with gzip.open(path) as text:
        crd = yaml.load(text, Loader=yaml.CSafeLoader)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_closed(served["schema"]["openAPIV3Schema"]))


def committed() -> dict[Path, dict]:
    return {p: yaml.safe_load(p.read_text()) for p in sorted(GENERATED.glob("*/*.yaml"))}


# The KubeRay resources; the claim and the Fleet service are core Kubernetes (checked below).
KUBERAY = [p for p, m in committed().items() if m["apiVersion"] == "ray.io/v1"]


def of_kind(profile: str, kind: str) -> list[dict]:
    return [m for p, m in committed().items() if p.parent.name == profile and m["kind"] == kind]


def configs(profile: str) -> tuple[FinetuneConfig, FederatedConfig, ServeConfig]:
    return (
        load_config(REPO / "configs" / "finetune" / f"{profile}.yaml", FinetuneConfig),
        load_config(REPO / "configs" / "federated" / f"{profile}.yaml", FederatedConfig),
        load_config(REPO / "configs" / "serve" / f"{profile}.yaml", ServeConfig),
    )


def pod_specs(manifest: dict) -> list[dict]:
    cluster = manifest["spec"].get("rayClusterConfig", manifest["spec"])
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def env_entries(node) -> list[dict]:
    if isinstance(node, dict):
        found = list(node.get("env", [])) if isinstance(node.get("env"), list) else []
        return found + [e for value in node.values() for e in env_entries(value)]
    if isinstance(node, list):
        return [e for item in node for e in env_entries(item)]
    return []


def test_every_profile_is_committed():
    assert sorted(p.name for p in GENERATED.iterdir() if p.is_dir()) == sorted(PROFILES)
    for profile in PROFILES:
        kinds = sorted(m["kind"] for p, m in committed().items() if p.parent.name == profile)
        assert kinds.count("RayJob") == 2 and kinds.count("RayService") == 1
        assert kinds.count("RayCluster") == 1 and kinds.count("PersistentVolumeClaim") == 1


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_kuberay_manifests_validate_against_the_crds(path):
    manifest = yaml.safe_load(path.read_text())
    errors = [e.message for e in crd_validator(manifest["kind"]).iter_errors(manifest)]
    assert errors == []


def test_the_validation_catches_misspelt_fields_and_wrong_types():
    (cluster,) = of_kind("demo", "RayCluster")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpec"] = typo["spec"].pop("workerGroupSpecs")
    assert not crd_validator("RayCluster").is_valid(typo)
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["replicas"] = "2"
    assert not crd_validator("RayCluster").is_valid(wrong)


@pytest.mark.parametrize("profile", PROFILES)
def test_the_service_runs_the_serve_config_on_the_shared_state(profile):
    (service,) = of_kind(profile, "RayService")
    app_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(app_config)  # what Serve itself accepts
    (application,) = app_config["applications"]
    assert application["import_path"] == "serve.app:app_builder"
    config = f"configs/serve/{profile}.yaml"
    assert application["args"] == {"config": config, "state_dir": STATE_DIR}
    assert (REPO / config).is_file()
    serve = configs(profile)[2]
    assert app_config["http_options"] == {"host": "0.0.0.0", "port": serve.http_port}


@pytest.mark.parametrize("profile", PROFILES)
def test_resources_come_from_the_configs(profile):
    finetune, federated, serve = configs(profile)
    (cluster,) = of_kind(profile, "RayCluster")
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["cpu"]) >= finetune.scaling.cpus_per_worker
    assert workers["replicas"] >= finetune.scaling.num_workers
    assert int(limits.get("nvidia.com/gpu", 0)) == int(finetune.scaling.use_gpu)

    (service,) = of_kind(profile, "RayService")
    (replicas,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (replicas["minReplicas"], replicas["maxReplicas"]) == (
        serve.autoscaling.min_replicas,
        serve.autoscaling.max_replicas,
    )
    replica_limits = replicas["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(replica_limits["cpu"]) == serve.cpus_per_replica + 1  # actor + engine bundle
    assert int(replica_limits.get("nvidia.com/gpu", 0)) == int(serve.accelerator == "gpu")

    jobs = {m["metadata"]["name"]: m["spec"] for m in of_kind(profile, "RayJob")}
    for trained in (FINETUNE, FEDERATE):
        spec = jobs[f"fedforge-{profile}-{trained.configs_dir}"]
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        config = f"configs/{trained.configs_dir}/{profile}.yaml"
        command = f"python -m {trained.module} --config {config} --state-dir {STATE_DIR}"
        assert spec["entrypoint"] == command


@pytest.mark.parametrize("profile", PROFILES)
def test_fleet_port_is_exposed_only_when_the_config_opens_it(profile):
    flower = configs(profile)[1].flower
    services = of_kind(profile, "Service")
    (cluster,) = of_kind(profile, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    if not flower.secure:  # the Fleet API listens on loopback: nothing outside may reach it
        assert services == [] and "ports" not in head
        return
    (service,) = services
    assert service["spec"]["ports"] == [
        {"name": "flower-fleet", "port": flower.fleet_port, "targetPort": "flower-fleet"}
    ]
    assert service["spec"]["selector"] == {
        "ray.io/cluster": cluster["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    assert {"name": "flower-fleet", "containerPort": flower.fleet_port} in head["ports"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_pod_mounts_the_shared_state_claim_as_non_root(profile):
    (claim,) = of_kind(profile, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volume = {"name": "state", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    for kind in ("RayCluster", "RayService"):
        for pod in pod_specs(of_kind(profile, kind)[0]):
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert volume in pod["volumes"]
            mounts = pod["containers"][0]["volumeMounts"]
            assert {"name": "state", "mountPath": STATE_DIR} in mounts


def test_no_manifest_holds_a_secret_value():
    for path, manifest in committed().items():
        for entry in env_entries(manifest):
            if any(word in entry["name"].upper() for word in SECRET_NAME):
                assert "value" not in entry, f"{path}: {entry['name']} is a literal"
                assert "secretKeyRef" in entry["valueFrom"], path
        text = path.read_text()
        assert "sha256:" not in text and "sk-" not in text, path
    for profile in PROFILES:
        (service,) = of_kind(profile, "RayService")
        keys_env = configs(profile)[2].auth.api_keys_env
        for pod in pod_specs(service):
            (entry,) = [e for e in pod["containers"][0]["env"] if e["name"] == keys_env]
            assert entry["valueFrom"]["secretKeyRef"]["name"] == API_KEYS_SECRET


def test_unknown_profile_is_a_one_line_error():
    result = CliRunner().invoke(app, ["k8s", "generate", "--profile", "prod"])
    assert result.exit_code == 2
    assert result.output == "error: unknown profile 'prod' (choose demo, gpu)\n"


def test_configs_that_disagree_on_the_registry_are_refused(tmp_path):
    for kind in ("finetune", "federated", "serve"):
        (tmp_path / "configs" / kind).mkdir(parents=True)
        text = (REPO / "configs" / kind / "demo.yaml").read_text()
        if kind == "serve":
            text += "registry:\n  tracking_uri: http://elsewhere:5000\n"
        (tmp_path / "configs" / kind / "demo.yaml").write_text(text)
    with pytest.raises(K8sError, match="disagree on registry.tracking_uri"):
        load_profile("demo", tmp_path)
    (tmp_path / "configs" / "serve" / "demo.yaml").write_text("name: [")
    result = CliRunner().invoke(
        app, ["k8s", "generate", "--repo", str(tmp_path), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and result.output.startswith("error: ")
    assert "not valid YAML" in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "cluster").glob("*.yaml")))
def test_ray_up_configs_validate_against_rays_schema(path):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    profile = path.stem.removeprefix("vms-")
    assert config["max_workers"] == configs(profile)[0].scaling.num_workers
    extra = "bash scripts/setup.sh" if profile == "demo" else "'.[gpu]'"
    assert any(extra in command for command in config["setup_commands"])


@pytest.mark.integration
@pytest.mark.slow
def test_committed_manifests_are_what_the_configs_generate(tmp_path, monkeypatch):
    # A key in the environment must never reach a manifest (the generator runs serve.deploy).
    monkeypatch.setenv("FEDFORGE_API_KEYS", "sk-canary-never-in-a-manifest")
    for profile in PROFILES:
        written = generate(profile, REPO, tmp_path)
        fresh = {p.name: p.read_text() for p in written}
        assert "sk-canary" not in "".join(fresh.values())
        now = {p.name: p.read_text() for p in (GENERATED / profile).glob("*.yaml")}
        assert now == fresh, (
            f"configs/k8s/{profile} is stale: run `fedforge k8s generate --profile {profile}`"
        )
