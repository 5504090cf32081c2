"""The audit trail: every register, promote, rollback and delete in a hash-chained log kept in the
registry's store; `history` shows it, `verify` names the first edited, missing or moved entry."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.commands.cli import app
from cluster.core.config import RegistrySettings
from cluster.core.state import StateDir
from cluster.records.audit_log import AuditEntry, AuditLog, check_chain, sha256
from cluster.records.lineage import Lineage
from cluster.records.registry import PRODUCTION, Registry, RegistryError

REPO = Path(__file__).resolve().parents[2]
LINEAGE = Lineage(kind="test", base_model="tiny", metrics={"eval_accuracy": 0.5})
runner = CliRunner()


def register(registry: Registry, adapter: Path, n: int = 1, name: str = "m") -> list[str]:
    with registry.run("audit", "audit", {}) as run_id:
        return [registry.register_adapter(name, adapter, run_id, LINEAGE).version for _ in range(n)]


def cli(state, *args):
    return runner.invoke(app, [*args, "--state-dir", str(state.root)])


def moves(registry: Registry, name: str = "m") -> list[tuple]:
    return [
        (e.action, e.version, e.alias, e.previous, e.new, e.reason) for e in registry.history(name)
    ]


def test_history_shows_every_act_with_its_versions_reasons_and_actor(
    registry, empty_state, stub_adapter, monkeypatch
):
    monkeypatch.setenv("FEDFORGE_ACTOR", "alice@ops")
    register(registry, stub_adapter, n=3)
    for args in (
        ["promote", "m", "1", "--reason", "first"],
        ["promote", "m", "candidate", "--reason", "v3 is better"],
        ["rollback", "m", "--reason", "answers got worse"],
    ):
        result = cli(empty_state, "registry", *args)
        assert result.exit_code == 0, result.output
    refused = cli(empty_state, "registry", "delete", "m", "1")  # production: refused, not logged
    assert refused.exit_code == 2 and "is in production" in refused.output
    deleted = cli(empty_state, "registry", "delete", "m", "2", "--reason", "bad data")
    assert deleted.exit_code == 0, deleted.output
    dropped = cli(empty_state, "registry", "delete", "m", "3", "--reason", "superseded")
    assert "alias candidate removed" in dropped.output

    assert moves(registry) == [
        ("register", "1", "candidate", None, "1", ""),
        ("register", "2", "candidate", "1", "2", ""),
        ("register", "3", "candidate", "2", "3", ""),
        ("promote", "1", PRODUCTION, None, "1", "first"),
        ("promote", "3", PRODUCTION, "1", "3", "v3 is better"),
        ("rollback", "1", PRODUCTION, "3", "1", "answers got worse"),
        ("delete", "2", None, None, None, "bad data"),
        ("delete", "3", "candidate", "3", None, "superseded"),
    ]
    entries = registry.history("m")
    assert {e.actor for e in entries} == {"alice@ops"}
    times = [e.time for e in entries]
    assert times == sorted(times) and all(t.endswith("Z") for t in times)  # UTC, in order
    assert entries[0].details["kind"] == "test" and entries[0].details["run_id"]

    shown = cli(empty_state, "registry", "history", "m")
    assert shown.exit_code == 0
    lines = shown.output.splitlines()
    assert len(lines) == 8
    assert "alice@ops  rollback v1 production: v3 -> v1  reason: answers got worse" in lines[5]
    verified = cli(empty_state, "registry", "verify", "m")
    assert verified.exit_code == 0 and "intact: 8 entries, head sha256" in verified.output


def test_gate_promotions_carry_the_gate_decision_as_reason(registry, stub_adapter):
    from cluster.commands.gate import run_gate

    register(registry, stub_adapter, n=2)
    run_gate(registry, "m", registry.versions("m"))
    (promote,) = [e for e in registry.history("m") if e.action == "promote"]
    assert promote.reason == "gate: promoted v1 (50.0%) over no production version"


def _tamper(db: Path, sql: str, *args) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(sql, args)


def _value(db: Path, key: str) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT value FROM params WHERE key = ?", (key,)).fetchone()[0]


def _edited(text: str, **changes) -> str:
    entry = {**json.loads(text), **changes}
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))  # still canonical JSON


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        ("edit", "entry #2 (promote v1) is not signed by this deployment's audit key"),
        ("edit last", "entry #5 (promote v2) is not signed by this deployment's audit key"),
        ("delete", "entry #2 is missing: the log jumps from #1 to #3"),
        ("delete last", "entry #5 is missing: the log head records #5, the log ends at #4"),
        ("reorder", "entry #2 holds entry #3 (promote v2): the log was reordered"),
        ("not json", "entry #1 was edited: it is not a valid entry"),
    ],
)
def test_verify_names_the_first_edited_missing_or_moved_entry(
    tamper, named, registry, empty_state, stub_adapter
):
    register(registry, stub_adapter, n=2)  # entries 0, 1
    registry.promote("m", "1", reason="go")  # 2
    registry.promote("m", "2")  # 3
    registry.rollback("m", reason="back")  # 4
    registry.promote("m", "2", reason="again")  # 5
    db = empty_state.mlflow_db
    key = {"edit": "00000002", "edit last": "00000005", "delete": "00000002"}.get(tamper)
    if tamper in ("edit", "edit last"):
        # Changing a reason after the fact, e.g. to hide why a version was promoted.
        new = _edited(_value(db, key), reason="routine")
        _tamper(db, "UPDATE params SET value = ? WHERE key = ?", new, key)
    elif tamper == "delete":
        _tamper(db, "DELETE FROM params WHERE key = ?", key)
    elif tamper == "delete last":
        _tamper(db, "DELETE FROM params WHERE key = '00000005'")
    elif tamper == "reorder":
        two, three = _value(db, "00000002"), _value(db, "00000003")
        _tamper(db, "UPDATE params SET value = ? WHERE key = '00000002'", three)
        _tamper(db, "UPDATE params SET value = ? WHERE key = '00000003'", two)
    else:
        _tamper(db, "UPDATE params SET value = '{\"seq\": 1}' WHERE key = '00000001'")

    result = cli(empty_state, "registry", "verify", "m")
    assert result.exit_code == 1
    assert "audit log of 'm' FAILED verification" in result.output
    assert named in result.output, result.output


def test_a_rewritten_log_is_caught_by_a_head_recorded_before(registry, empty_state, stub_adapter):
    register(registry, stub_adapter, n=2)
    registry.promote("m", "1", reason="go")
    anchor = registry.verify("m").head_sha256
    assert cli(empty_state, "registry", "verify", "m", "--head", anchor).exit_code == 0
    # Someone with database access rewrites the whole chain consistently, head tag included.
    db = empty_state.mlflow_db
    slots, previous = {}, "0" * 64
    for seq in range(3):
        key = f"{seq:08d}"
        text = _edited(_value(db, key), prev_sha256=previous, actor="nobody")
        _tamper(db, "UPDATE params SET value = ? WHERE key = ?", text, key)
        slots[key], previous = text, sha256(text)
    registry.client.set_registered_model_tag("m", "fedforge.audit_head", f"2 {previous}")
    chain_only = AuditLog(registry.client, "m")
    assert chain_only.check().ok  # the chain alone is consistent...
    assert "the log was rewritten" in chain_only.check(anchor).problems[0]  # ...not to a head
    # And without a head recorded anywhere: the writer never held the deployment's key.
    for head in ([], ["--head", anchor]):
        rewritten = cli(empty_state, "registry", "verify", "m", *head)
        assert rewritten.exit_code == 1
        assert "entry #0 (register v1) is not signed by this deployment's audit key" in (
            rewritten.output
        )


def test_an_alias_moved_outside_fedforge_fails_verification(registry, empty_state, stub_adapter):
    register(registry, stub_adapter, n=2)
    registry.promote("m", "1")
    registry.client.set_registered_model_alias("m", PRODUCTION, "2")  # e.g. MLflow's UI
    result = cli(empty_state, "registry", "verify", "m")
    assert result.exit_code == 1
    assert "production points at v2, but the log's last production move is to v1" in (result.output)


def test_a_model_without_a_log_fails_verification(empty_state):
    result = cli(empty_state, "registry", "verify", "nothing")
    assert result.exit_code == 1 and "'nothing' has no audit log" in result.output


def test_concurrent_promotes_keep_the_chain_valid(registry, empty_state, stub_adapter):
    versions = register(registry, stub_adapter, n=4)

    def promote(version: str) -> None:  # a registry per thread, as separate jobs have
        Registry.from_settings(RegistrySettings(), empty_state).promote(
            "m", version, reason=f"thread {version}"
        )

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.verify("m").ok
    promotes = [e for e in registry.history("m") if e.action == "promote"]
    assert sorted(e.version for e in promotes) == versions  # each once
    # Each entry's `previous` is the version the one before it moved production to.
    assert [e.previous for e in promotes] == [None, *(e.new for e in promotes[:-1])]
    assert registry.aliases("m")[PRODUCTION] == promotes[-1].new


def test_concurrent_appends_without_a_lock_chain_through_write_once_slots(
    registry, empty_state, stub_adapter
):
    """What writers on different nodes of an MLflow server do: no shared lock, each takes the
    next free slot or loses the race, reads again and chains after the winner."""
    register(registry, stub_adapter)
    errors: list[Exception] = []

    def append(i: int) -> None:
        try:
            mine = Registry.from_settings(RegistrySettings(), empty_state)
            for j in range(3):
                mine._audit("m").append("promote", "1", reason=f"writer {i}.{j}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    check = AuditLog(registry.client, "m").check()
    assert check.ok, check.problems
    assert check.entries == 1 + 4 * 3


def _run_killed(script: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]


KILL = """
import os, signal
from pathlib import Path
from mlflow import MlflowClient
from cluster.core.config import RegistrySettings
from cluster.core.state import StateDir
from cluster.records.registry import Registry

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # no except, no finally: a real kill
"""


def test_a_process_killed_inside_the_append_transaction_leaves_a_verifiable_log(
    registry, empty_state, stub_adapter
):
    state = empty_state
    register(registry, stub_adapter, n=2)
    registry.promote("m", "1")
    # Killed after the entry's row is written to the database, before it is committed.
    script = KILL + textwrap.dedent(
        f"""
        import sqlalchemy.orm
        armed = False
        original_log_param, original_commit = MlflowClient.log_param, sqlalchemy.orm.Session.commit

        def log_param(self, *args, **kwargs):
            global armed
            armed = True
            return original_log_param(self, *args, **kwargs)

        def commit(self, *args, **kwargs):
            if armed:
                self.flush()
                die()
            return original_commit(self, *args, **kwargs)

        MlflowClient.log_param, sqlalchemy.orm.Session.commit = log_param, commit
        state = StateDir.resolve({str(state.root)!r})
        registry = Registry.from_settings(RegistrySettings(), state)
        registry.promote("m", "2", reason="killed")
        """
    )
    _run_killed(script)
    assert registry.verify("m").ok
    assert [e.reason for e in registry.history("m")][-1] != "killed"  # all or nothing
    assert registry.aliases("m")[PRODUCTION] == "1"  # logged before it moves: it never moved
    registry.promote("m", "2", reason="after the kill")  # the next append works
    assert registry.verify("m").ok and registry.history("m")[-1].reason == "after the kill"


def test_a_promote_killed_after_its_entry_is_reported_and_repaired_by_promoting_again(
    registry, empty_state, stub_adapter
):
    register(registry, stub_adapter, n=2)
    registry.promote("m", "1")
    # Killed at the first tag write after the entry: the log head; the alias never moved.
    script = KILL + textwrap.dedent(
        f"""
        MlflowClient.set_registered_model_tag = die
        state = StateDir.resolve({str(empty_state.root)!r})
        registry = Registry.from_settings(RegistrySettings(), state)
        registry.promote("m", "2", reason="killed")
        """
    )
    _run_killed(script)
    assert AuditLog(registry.client, "m", trust=registry.trust).check().ok  # whole; head lags
    result = cli(empty_state, "registry", "verify", "m")
    assert result.exit_code == 1
    assert "production points at v1, but the log's last production move is to v2" in (result.output)
    registry.promote("m", "2", reason="finish the move")
    assert registry.verify("m").ok


def test_a_failed_registration_is_logged_with_its_removal(registry, stub_adapter, monkeypatch):
    def broken_store(*args, **kwargs):
        raise ConnectionError("store went away")

    register(registry, stub_adapter)
    monkeypatch.setattr(registry.client, "set_registered_model_alias", broken_store)
    with pytest.raises(ConnectionError):
        register(registry, stub_adapter)
    monkeypatch.undo()
    assert [(e.action, e.version) for e in registry.history("m")] == [
        ("register", "1"),
        ("register", "2"),
        ("delete", "2"),
    ]
    assert "registration failed" in registry.history("m")[-1].reason
    assert registry.verify("m").ok


def test_delete_is_checked_before_it_is_logged(registry, stub_adapter):
    register(registry, stub_adapter)
    with pytest.raises(RegistryError, match="no version '9'"):
        registry.delete("m", 9)
    with pytest.raises(RegistryError, match="not an alias"):
        registry.delete("m", "candidate")
    assert len(registry.history("m")) == 1


def test_check_chain_on_its_own():
    entries, previous = {}, "0" * 64
    for seq in range(3):
        entry = AuditEntry(
            seq=seq, time="t", actor="a", action="promote", model="m", version=str(seq),
            prev_sha256=previous,
        )  # fmt: skip
        entries[f"{seq:08d}"], previous = entry.text, entry.sha256
    assert check_chain(entries, f"2 {previous}").ok
    assert check_chain(entries, f"1 {sha256(entries['00000001'])}").ok  # a head left behind
    assert check_chain({}, None).entries == 0
    assert "not numbered" in check_chain({**entries, "x": "{}"}, None).problems[0]
    del entries["00000000"]
    assert check_chain(entries, None).problems == ["entry #0 is missing: the log starts at #1"]


@pytest.fixture
def mlflow_server(tmp_path, migrated_mlflow_db):
    """A real MLflow server on a free local port (the store every node of a cluster shares)."""
    import shutil
    import socket
    import time
    import urllib.request

    shutil.copy(migrated_mlflow_db, tmp_path / "server.db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.integration
def test_the_log_works_on_an_mlflow_server_with_writers_in_separate_processes(
    mlflow_server, stub_adapter, tmp_path
):
    """A server's clients: no artifact root, no lock; every writer signs with the deployment's
    key and anchors in its anchor (a shared state dir, as on a cluster)."""
    state = StateDir.resolve(tmp_path / "shared-state")
    settings = RegistrySettings(tracking_uri=mlflow_server)
    registry = Registry.from_settings(settings, state)
    register(registry, stub_adapter, n=2)
    uri = ["--tracking-uri", mlflow_server, "--state-dir", str(state.root)]
    for args in (
        ["promote", "m", "1", "--reason", "go"],
        ["promote", "m", "2"],
        ["rollback", "m", "--reason", "back"],
        ["delete", "m", "2", "--reason", "gone"],
    ):
        result = runner.invoke(app, ["registry", *args, *uri])
        assert result.exit_code == 0, result.output
    assert [(e.action, e.previous, e.new, e.reason) for e in registry.history("m")][2:] == [
        ("promote", None, "1", "go"),
        ("promote", "1", "2", ""),
        ("rollback", "2", "1", "back"),
        ("delete", "2", None, "gone"),
    ]
    # Writers in separate processes (as on separate nodes) append at the same time.
    script = textwrap.dedent(
        f"""
        import sys
        from cluster.core.config import RegistrySettings
        from cluster.core.state import StateDir
        from cluster.records.registry import Registry
        settings = RegistrySettings(tracking_uri={mlflow_server!r})
        log = Registry.from_settings(settings, StateDir.resolve({str(state.root)!r}))._audit("m")
        for j in range(4):
            log.append("promote", "1", reason=f"writer {{sys.argv[1]}}.{{j}}")
        """
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=REPO) for i in range(3)]
    assert [w.wait(timeout=300) for w in writers] == [0, 0, 0]
    check = registry.verify("m")
    assert check.ok, check.problems
    assert check.entries == 6 + 3 * 4
    verified = runner.invoke(app, ["registry", "verify", "m", *uri])
    assert verified.exit_code == 0 and "intact: 18 entries" in verified.output
    shown = runner.invoke(app, ["registry", "show", "m", "1", "--card", *uri])
    assert shown.exit_code == 0 and "matches the logged sha256" in shown.stdout


def _replace_the_log(registry, entries: list[str]) -> None:
    """What someone with registry write access can do through MLflow's API alone: soft-delete
    the model's audit run, make a new one tagged for the model, log `entries` into it and point
    the head tag at the last one."""
    from cluster.records.audit_log import EXPERIMENT
    from cluster.records.lineage import AUDIT_HEAD_TAG, AUDIT_MODEL_TAG

    client = registry.client
    old = AuditLog(client, "m").run_id()
    client.delete_run(old)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    new = client.create_run(experiment, tags={AUDIT_MODEL_TAG: "m"}).info.run_id
    for seq, text in enumerate(entries):
        client.log_param(new, f"{seq:08d}", text)
    client.set_registered_model_tag(
        "m", AUDIT_HEAD_TAG, f"{len(entries) - 1} {sha256(entries[-1])}"
    )


def test_a_log_rewritten_through_the_mlflow_api_is_detected(registry, stub_adapter):
    """Issue 21's attack: every entry re-logged with an edited reason and recomputed links in a
    new run, the old run soft-deleted, the head reset. The chain alone is consistent; the
    anchor outside the store and the deleted run give it away."""
    register(registry, stub_adapter, n=2)
    registry.promote("m", "2", reason="reviewed by the board")
    forged, previous = [], "0" * 64
    for entry in registry.history("m"):
        fields = {"reason": "routine", "prev_sha256": previous, "signature": ""}
        text = entry.model_copy(update=fields).text  # unsigned: the writer has no key
        forged.append(text)
        previous = sha256(text)
    _replace_the_log(registry, forged)
    chain_only = AuditLog(registry.client, "m").check().problems  # without the key or anchor
    assert len(chain_only) == 1 and "an audit run of this model was deleted" in chain_only[0]
    problems = registry.verify("m").problems
    # Unsigned, as a log begun before signing would be: the anchor outside the store holds the
    # real head. (Signed entries edited in place fail their signatures: the test above.)
    assert "entry #2 is not the one the anchor recorded" in problems[0]
    assert "an audit run of this model was deleted" in problems[1]


def test_a_log_cut_back_to_its_signed_prefix_is_detected(registry, stub_adapter):
    """Replaying the real, signed entries but the last ones (to hide a promote) passes every
    signature; the anchor outside the store still holds the later head."""
    register(registry, stub_adapter, n=2)
    registry.promote("m", "2", reason="the act to hide")
    kept = [entry.text for entry in registry.history("m")][:-1]
    _replace_the_log(registry, kept)
    problems = registry.verify("m").problems
    assert any("the log ends at #1 but the anchor recorded #2" in p for p in problems), problems


def test_an_untouched_signed_log_verifies_and_names_its_head(registry, empty_state, stub_adapter):
    register(registry, stub_adapter, n=2)
    registry.promote("m", "1")
    registry.set_privacy_budget("m", 3.0, reason="set")
    result = cli(empty_state, "registry", "verify", "m")
    assert result.exit_code == 0 and "intact: 4 entries" in result.output
    assert all(entry.signature for entry in registry.history("m"))
    anchor = (empty_state.root / "audit-anchor.log").read_text().splitlines()
    assert len(anchor) == 4 and anchor[-1].startswith("m 3 ")
