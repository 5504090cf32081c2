import pytest
import torch
from safetensors.torch import load_file

from cluster.core.config import LoraSettings
from cluster.records.lineage import Lineage
from cluster.records.privacy_record import PrivacyBudget
from cluster.records.registry import CANDIDATE, PRODUCTION, Registry, RegistryError
from llm.lora import apply_lora, load_adapter, save_adapter
from llm.model import load_model, load_tokenizer


@pytest.fixture
def registry(state) -> Registry:
    return Registry(state.default_tracking_uri(), state.mlflow_artifacts)


@pytest.fixture
def adapter_dir(state, tmp_path):
    model = apply_lora(load_model(str(state.tiny_model)), LoraSettings(r=4), seed=1)
    with torch.no_grad():  # non-zero B so the adapter changes outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return save_adapter(model, tmp_path / "adapter")


TEST_LINEAGE = Lineage(
    kind="test",
    base_model="tiny",
    lora_rank=4,
    metrics={"eval_accuracy": 0.25},
    privacy=PrivacyBudget(mode="local_dp", epsilon=2.5, delta=1e-5, steps=20),
)


def register(registry, adapter_dir, n=1):
    with registry.run("tests", "unit", {"p": 1}) as run_id:
        return [registry.register_adapter("m", adapter_dir, run_id, TEST_LINEAGE) for _ in range(n)]


def test_round_trip_register_alias_download_load_generate(registry, adapter_dir, state, tmp_path):
    (version,) = register(registry, adapter_dir)
    assert registry.aliases("m") == {CANDIDATE: version.version}
    # Reading a version gives the typed record back, field for field.
    assert registry.get("m", CANDIDATE).lineage == TEST_LINEAGE

    downloaded = registry.download("m", CANDIDATE, tmp_path / "dl")
    original = load_file(str(adapter_dir / "adapter_model.safetensors"))
    restored = load_file(str(downloaded / "adapter_model.safetensors"))
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)

    tokenizer = load_tokenizer(str(state.tiny_model))
    inputs = tokenizer("Route this ticket", return_tensors="pt")
    base = load_model(str(state.tiny_model))
    base_out = base.generate(**inputs, max_new_tokens=5, do_sample=False)
    tuned = load_adapter(load_model(str(state.tiny_model)), downloaded)
    tuned_out = tuned.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert tuned_out.shape == base_out.shape
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, tuned(**inputs).logits)


def test_promote_and_rollback_keep_every_version(registry, adapter_dir):
    v1, v2, v3 = register(registry, adapter_dir, n=3)
    registry.promote("m", v1.version)
    registry.promote("m", CANDIDATE)  # alias resolves to the newest candidate, v3
    assert registry.aliases("m")[PRODUCTION] == v3.version
    assert registry.rollback("m") == (v1, [])
    assert registry.aliases("m")[PRODUCTION] == v1.version
    assert [v.version for v in registry.versions("m")] == [v1.version, v2.version, v3.version]
    with pytest.raises(RegistryError, match="no earlier production version"):
        registry.rollback("m")


def test_unknown_version_is_a_clear_error(registry, adapter_dir):
    register(registry, adapter_dir)
    with pytest.raises(RegistryError, match="no version '7' of model 'm'"):
        registry.get("m", 7)
    with pytest.raises(RegistryError, match="no version 'production'"):
        registry.get("m", PRODUCTION)


def test_failure_midway_leaves_no_version(registry, adapter_dir, monkeypatch):
    def broken_store(*args, **kwargs):
        raise ConnectionError("store went away")

    monkeypatch.setattr(registry.client, "set_registered_model_alias", broken_store)
    with pytest.raises(ConnectionError):
        register(registry, adapter_dir)
    assert registry.versions("m") == []


def test_failed_upload_creates_no_version(registry, adapter_dir, monkeypatch):
    def broken_upload(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(registry.client, "log_artifacts", broken_upload)
    with pytest.raises(OSError):
        register(registry, adapter_dir)
    assert registry.model_names() == [] or registry.versions("m") == []


def test_failed_run_is_marked_failed(registry):
    with pytest.raises(RuntimeError), registry.run("tests", "boom", {}) as run_id:
        raise RuntimeError("training crashed")
    assert registry.client.get_run(run_id).info.status == "FAILED"
