import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.core.config import ConfigError, FinetuneConfig, config_hash, load_config
from cluster.core.jobs import FINETUNE, JOBS

REPO = Path(__file__).resolve().parents[2]
VALID = """
name: t
data:
  path: llm/demo_task/tickets.jsonl
train:
  max_steps: 5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_valid_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, VALID), FinetuneConfig)
    assert cfg.train.max_steps == 5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, VALID + "  learning_rte: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, FinetuneConfig)
    assert str(path) in str(err.value)
    assert "unknown key 'train.learning_rte'" in str(err.value)


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path, VALID.replace("max_steps: 5", "max_steps: many"))
    with pytest.raises(ConfigError, match=r"key 'train.max_steps'"):
        load_config(path, FinetuneConfig)


def test_missing_required_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config(write(tmp_path, "name: t\n"), FinetuneConfig)


def test_cross_field_rule_explains_itself(tmp_path):
    path = write(tmp_path, VALID + "  warmup_steps: 9\n")
    with pytest.raises(ConfigError, match=r"warmup_steps \(9\) must be smaller"):
        load_config(path, FinetuneConfig)


def test_missing_file_and_bad_yaml_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", FinetuneConfig)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"), FinetuneConfig)


SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))
SCHEMAS = {job.configs_dir: job.config for job in JOBS.values() if job.configs_dir}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_yaml_loads_and_the_files_it_names_exist(path):
    """A job config loads with its job's schema and its data file exists; a `ray up` cluster
    file parses and mounts and runs files that exist; KubeRay manifests parse (their schemas
    are checked in test_k8s.py). A YAML in any other folder fails: nothing ships unchecked."""
    kind = path.relative_to(REPO / "configs").parts[0]
    if kind in SCHEMAS:
        cfg = load_config(path, SCHEMAS[kind])
        data = getattr(cfg, "data", None)
        assert data is None or (REPO / data.path).exists(), f"{path}: no {data.path}"
    elif kind == "cluster":
        raw = yaml.safe_load(path.read_text())
        assert {"cluster_name", "provider", "file_mounts", "setup_commands"} <= raw.keys()
        assert all(source == "." for source in raw["file_mounts"].values())
        for command in raw["setup_commands"]:
            assert all((REPO / word).exists() for word in command.split() if word.endswith(".sh"))
    elif kind == "k8s":
        manifests = list(yaml.safe_load_all(path.read_text()))
        assert manifests and all({"apiVersion", "kind", "metadata"} <= m.keys() for m in manifests)
    else:
        pytest.fail(f"{path}: no check for YAML files under configs/{kind}")


def test_every_job_with_configs_ships_its_profiles():
    for folder in SCHEMAS:
        assert {p.stem for p in (REPO / "configs" / folder).glob("*.yaml")} >= {"demo", "tiny"}


def test_config_hash_ignores_formatting(tmp_path):
    a = load_config(write(tmp_path, VALID), FinetuneConfig)
    b = load_config(
        write(
            tmp_path, "train: {max_steps: 5}\nname: t\ndata: {path: llm/demo_task/tickets.jsonl}\n"
        ),
        FinetuneConfig,
    )
    assert config_hash(a) == config_hash(b)


@pytest.mark.integration  # starts the job module in a fresh Python (about 10 s of imports)
def test_finetune_job_rejects_bad_config_before_starting_ray(tmp_path):
    path = write(tmp_path, VALID + "  lr: 0.1\n")
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            FINETUNE.module,
            "--config",
            str(path),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'train.lr'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state" / "ray_results").exists()
    assert time.monotonic() - started < 60
