"""Secure by default: what the config refuses, where the Fleet API listens, key files."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.core.config import ConfigError
from cluster.core.federated_config import FlowerSettings
from federated.certs import make_node_key, make_tls, server_names
from federated.federation import fleet_bind_host
from federated.flower_processes import process_env
from tests.federated.tiny_config import tiny


@pytest.mark.parametrize(
    ("flower", "asked"),
    [
        ({"external_clients": 1}, "flower.external_clients > 0"),
        ({"host": "fl.example.org"}, "flower.host"),
        ({"external_clients": 1, "tls": True}, "flower.external_clients > 0"),  # no node auth
    ],
)
def test_an_outside_client_without_tls_and_a_registered_key_is_refused_by_default(
    tmp_path, flower, asked
):
    with pytest.raises(
        ConfigError, match=f"{asked}.*needs flower.tls: true and flower.supernode_auth"
    ):
        tiny(tmp_path, flower=flower, federation={"min_available_nodes": 2})


def test_the_fleet_api_listens_on_loopback_unless_tls_and_node_auth_are_both_on():
    assert fleet_bind_host(FlowerSettings()) == "127.0.0.1"
    assert fleet_bind_host(FlowerSettings(tls=True)) == "127.0.0.1"
    assert fleet_bind_host(FlowerSettings(tls=True, supernode_auth=True)) == "0.0.0.0"


def test_private_keys_are_0600_and_the_run_s_ca_key_is_never_written(tmp_path):
    run_certs = make_tls(tmp_path / "run", ["127.0.0.1", "localhost"], keep_ca_key=False)
    assert not (tmp_path / "run" / "ca.key").exists() and "ca_key" not in run_certs
    assert server_names(run_certs["server_cert"]) == {"127.0.0.1", "localhost"}
    private, public = make_node_key(tmp_path / "keys" / "client-0")
    user_certs = make_tls(tmp_path / "mine", ["fl.example.org"])  # the CLI keeps the CA key
    for path in (run_certs["server_key"], private, user_certs["ca_key"]):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(public.stat().st_mode) & 0o077 != 0o077  # public stays readable


def _outside_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.integration
def test_a_default_superlink_cannot_be_reached_from_another_interface(tmp_path):
    ip = _outside_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback interface")
    port = 19292
    argv = [
        str(Path(sys.executable).parent / "flower-superlink"),
        "--insecure",
        "--fleet-api-address",
        f"{fleet_bind_host(FlowerSettings())}:{port}",
        "--control-api-address",
        "127.0.0.1:19293",
        "--serverappio-api-address",
        "127.0.0.1:19291",
    ]
    log = (tmp_path / "superlink.log").open("wb")
    link = subprocess.Popen(argv, env=process_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and link.poll() is None, "no SuperLink"
            time.sleep(0.3)
        with socket.socket() as s:
            assert s.connect_ex((ip, port)) != 0  # refused from the machine's own address
    finally:
        link.terminate()
        link.wait(timeout=30)


def test_a_client_owner_makes_its_key_pair_with_the_readme_command(tmp_path):
    """`python -m federated.certs node-key --out keys/x`, as the README's client owner runs it."""
    out = tmp_path / "keys" / "hospital-a"
    subprocess.run(
        [sys.executable, "-m", "federated.certs", "node-key", "--out", str(out)], check=True
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.with_suffix(".pub").read_text().startswith("ecdsa-sha2-nistp")
