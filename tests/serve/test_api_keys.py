import pytest

from cluster.core.credentials import hash_api_key as hash_key
from cluster.core.serve_config import AuthSettings
from serve.access.keys import ApiKeyError, bearer_hash, is_known, load_key_hashes


def is_authorized(authorization: str | None, key_hashes) -> bool:
    return is_known(bearer_hash(authorization), tuple(key_hashes))


def test_keys_from_env_and_file_are_kept_as_hashes(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\n{hash_key('sk-file')}\nsk-plain\n")
    settings = AuthSettings(api_keys_env="KEYS", api_keys_file=str(keys_file))
    hashes = load_key_hashes(settings, {"KEYS": "sk-env, sk-env2"})
    assert len(hashes) == 4 and all(h.startswith("sha256:") for h in hashes)
    assert "sk-env" not in "".join(hashes)
    for key in ("sk-file", "sk-plain", "sk-env", "sk-env2"):
        assert is_authorized(f"Bearer {key}", hashes)


def test_wrong_missing_or_malformed_keys_are_refused():
    hashes = [hash_key("sk-right")]
    assert not is_authorized("Bearer sk-wrong", hashes)
    assert not is_authorized(None, hashes)
    assert not is_authorized("sk-right", hashes)  # no scheme
    assert not is_authorized("Basic sk-right", hashes)


def test_no_key_configured_is_an_error_unless_the_endpoint_is_open():
    with pytest.raises(ApiKeyError, match=r"set \$KEYS"):
        load_key_hashes(AuthSettings(api_keys_env="KEYS"), {})
    assert load_key_hashes(AuthSettings(api_keys_env="KEYS", required=False), {}) == []
    assert is_authorized(None, [])


def test_serve_config_file_builds_the_same_app(tmp_path):
    import yaml

    from serve.deploy import main

    out = tmp_path / "serve.yaml"
    assert (
        main(
            [
                "--config",
                "configs/serve/demo.yaml",
                "--state-dir",
                str(tmp_path),
                "--write-serve-config",
                str(out),
            ]
        )
        == 0
    )
    written = yaml.safe_load(out.read_text())
    (application,) = written["applications"]
    assert application["import_path"] == "serve.app:app_builder"
    assert application["args"] == {"config": "configs/serve/demo.yaml", "state_dir": str(tmp_path)}
    assert written["http_options"] == {"host": "127.0.0.1", "port": 8000}
