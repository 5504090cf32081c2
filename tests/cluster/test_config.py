import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.core.config import ConfigError, FinetuneConfig, config_hash, load_config
from cluster.core.jobs import FINETUNE

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


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    from cluster.core.serve_config import ServeConfig

    models = {"finetune": FinetuneConfig, "serve": ServeConfig}
    kind = path.parent.name
    if kind in models:
        load_config(path, models[kind])


def test_config_hash_ignores_formatting(tmp_path):
    a = load_config(write(tmp_path, VALID), FinetuneConfig)
    b = load_config(
        write(
            tmp_path, "train: {max_steps: 5}\nname: t\ndata: {path: llm/demo_task/tickets.jsonl}\n"
        ),
        FinetuneConfig,
    )
    assert config_hash(a) == config_hash(b)


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
