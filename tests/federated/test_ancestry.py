"""Epsilon across versions, per example: each data source's spend composed over a version's
ancestry by which examples the runs shared, checked against Opacus' own accountant given the
true history of every example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from cluster.core.example_ids import ExampleKey
from cluster.core.state import StateDir
from cluster.records.privacy_record import (
    ClientCharge,
    DataUse,
    DataUses,
    PrivacyRecord,
    budget_overrun,
)
from federated.privacy.ancestry import ancestor_uses, compose, run_use
from llm.data import example_content, load_split
from llm.publish import example_ids, profile_examples
from tests.federated.tiny_config import tiny

DELTA = 1e-5


def charges(sigma: float, rate: float, steps: int, rounds: int) -> list[ClientCharge]:
    return [
        ClientCharge(attempt=r, round=r, noise=sigma, rate=rate, steps=steps) for r in range(rounds)
    ]


def opacus_epsilon(*histories: list[ClientCharge]) -> float:
    accountant = RDPAccountant()
    accountant.history = [(c.noise, c.rate, c.steps) for h in histories for c in h]
    return accountant.get_epsilon(DELTA)


def record(histories: dict[str, list[ClientCharge]]) -> PrivacyRecord:
    return PrivacyRecord(mode="local_dp", delta=DELTA, histories=histories)


@pytest.fixture
def key(tmp_path) -> ExampleKey:
    return ExampleKey.of(StateDir.resolve(tmp_path / "state"))


def test_one_run_spends_what_its_worst_client_spent(key):
    run = record({"0": charges(1.0, 1 / 37, 2, 2), "1": charges(1.0, 1 / 10, 2, 2)})
    spent = compose([run_use(run, "d/clients", key.key_id, ["a", "b"])], key.key_id, DELTA)
    assert spent["d/clients"].epsilon == pytest.approx(opacus_epsilon(run.histories["1"]))
    assert spent["d/clients"].private and spent["d/clients"].versions == []


def test_a_version_federated_from_a_federated_version_composes_both(key):
    first, second = record({"0": charges(1.0, 0.1, 2, 2)}), record({"0": charges(1.2, 0.1, 2, 3)})
    parent = DataUses(uses=[run_use(first, "d/clients", key.key_id, ["a", "b"])])
    uses = [
        run_use(second, "d/clients", key.key_id, ["a", "b"]),
        *parent.of_version("m:1"),
    ]
    spent = compose(uses, key.key_id, DELTA)["d/clients"]
    both = opacus_epsilon(first.histories["0"], second.histories["0"])
    assert spent.epsilon == pytest.approx(both, rel=1e-6) and spent.versions == ["m:1"]


def test_shares_that_overlap_by_content_leave_no_guarantee_whatever_their_names(tmp_path, key):
    """A fine-tune on a 50 % central share (no DP) and a federation whose clients hold the 70 %
    left by a 30 % central share share examples: those examples were released without DP."""
    fine = tiny(tmp_path, data={"share": "central", "central_fraction": 0.5})
    fed = tiny(tmp_path, data={"share": "clients", "central_fraction": 0.3})
    central = set(example_ids(fine, key))
    clients = set(example_ids(fed, key))
    assert central & clients  # the two names hide a real overlap
    run = record({"0": charges(1.0, 0.1, 2, 2)})
    uses = [
        run_use(run, "d/clients", key.key_id, sorted(clients)),
        DataUse(
            version="m:1", source="d/central", rdp=None, key_id=key.key_id, examples=sorted(central)
        ),
    ]
    spent = compose(uses, key.key_id, DELTA)
    assert spent["d/clients"].epsilon is None and spent["d/clients"].private
    assert not spent["d/central"].private  # used without DP by design: no budget binds it
    assert "without differential privacy (epsilon infinite), budget 3" in budget_overrun(
        spent, 3.0, "v2"
    )
    # The same two jobs on disjoint shares (both at 30 %): the clients' data keeps its epsilon.
    disjoint = set(example_ids(tiny(tmp_path, data={"share": "central"}), key))
    assert not disjoint & clients
    uses[1] = uses[1].model_copy(update={"examples": sorted(disjoint)})
    spent = compose(uses, key.key_id, DELTA)
    assert spent["d/clients"].epsilon == pytest.approx(opacus_epsilon(run.histories["0"]))
    assert budget_overrun(spent, 3.0, "v2") is None


def test_an_edited_file_keeps_the_spend_of_the_examples_it_still_holds(tmp_path, key):
    """One edited byte gives the file another digest and one example another id; the others
    compose with the parent's spend, and epsilon is that of an example trained in both runs."""
    cfg = tiny(tmp_path)
    rows = [json.loads(line) for line in Path(cfg.data.path).read_text().splitlines()]
    edited_path = tmp_path / "edited.jsonl"
    rows[0] = {
        **rows[0],
        "messages": [
            *rows[0]["messages"][:-1],
            {"role": "assistant", "content": rows[0]["messages"][-1]["content"] + "!"},
        ],
    }
    edited_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = tiny(tmp_path, data={"path": str(edited_path)})
    assert key.file_digest(cfg.data.path) != key.file_digest(edited.data.path)
    first, second = record({"0": charges(1.0, 0.1, 2, 2)}), record({"0": charges(1.1, 0.1, 2, 2)})
    parent = DataUses(uses=[run_use(first, "old/clients", key.key_id, example_ids(cfg, key))])
    uses = [
        run_use(second, "new/clients", key.key_id, example_ids(edited, key)),
        *parent.of_version("m:1"),
    ]
    spent = compose(uses, key.key_id, DELTA)
    both = opacus_epsilon(first.histories["0"], second.histories["0"])
    assert spent["new/clients"].epsilon == pytest.approx(both, rel=1e-6)
    assert spent["old/clients"].epsilon == pytest.approx(both, rel=1e-6)


def test_a_parent_without_per_example_records_is_taken_to_hold_every_example(key, tmp_path):
    """A parent registered before data_uses.json: its curves (or its run's histories) compose
    with every example; a parent that recorded nothing leaves no guarantee."""
    from cluster.records.lineage import Lineage
    from cluster.records.privacy_record import DataPrivacy

    first, second = record({"0": charges(1.0, 0.1, 2, 2)}), record({"0": charges(1.1, 0.1, 2, 2)})
    lineage = Lineage(
        kind="federated",
        base_model="tiny",
        data_privacy={"d/clients": DataPrivacy(epsilon=1.0, delta=DELTA)},
    )
    legacy = ancestor_uses("m:1", lineage, first, None)  # privacy.json without `sources`
    uses = [run_use(second, "new/clients", key.key_id, ["a", "b"]), *legacy]
    spent = compose(uses, key.key_id, DELTA)
    both = opacus_epsilon(first.histories["0"], second.histories["0"])
    assert spent["new/clients"].epsilon == pytest.approx(both, rel=1e-6)
    assert spent["new/clients"].versions == ["m:1"]
    # Under another deployment's key the ids cannot be matched: the worst is assumed too.
    foreign = DataUses(uses=[run_use(first, "old", "another-key", ["x"])]).of_version("m:1")
    spent = compose([uses[0], *foreign], key.key_id, DELTA)
    assert spent["new/clients"].epsilon == pytest.approx(both, rel=1e-6)
    nothing = ancestor_uses("m:1", Lineage(kind="finetune", base_model="tiny"), None, None)
    assert compose([uses[0], *nothing], key.key_id, DELTA)["new/clients"].epsilon is None


def test_outside_clients_examples_compose_across_runs_they_both_joined(key):
    first = record({"0": charges(1.0, 0.1, 2, 2), "outside-7": charges(1.0, 0.2, 2, 2)})
    second = record({"0": charges(1.0, 0.1, 2, 1), "outside-9": charges(1.0, 0.2, 2, 1)})
    uses = [
        run_use(second, "d/clients", key.key_id, ["a"]),
        *DataUses(uses=[run_use(first, "d/clients", key.key_id, ["b"])]).of_version("m:1"),
    ]
    spent = compose(uses, key.key_id, DELTA)["d/clients"]
    # "a" and "b" each trained once; an outside client's example may have trained in both.
    outside = opacus_epsilon(first.histories["outside-7"], second.histories["outside-9"])
    assert spent.epsilon == pytest.approx(outside, rel=1e-6)


def test_the_training_profile_never_describes_an_example_a_dp_release_protects(tmp_path, key):
    fed = tiny(tmp_path)
    run = record({"0": charges(1.0, 0.1, 2, 2)})
    own = run_use(run, "d/clients", key.key_id, example_ids(fed, key))
    profiled = profile_examples(fed, [own], key)
    central = load_split(fed.data.model_copy(update={"share": "central"})).train
    assert profiled == central  # the server's own share, in clear by design
    protected = set(own.examples)
    assert not {key.example_id(example_content(e)) for e in profiled} & protected
    # A federation whose clients hold all the data has nothing it may describe.
    everything = tiny(tmp_path, data={"share": "all", "central_fraction": 0.0})
    assert profile_examples(everything, [own], key) == []
    # A protected example that cannot be named (unknown membership): nothing is described.
    legacy = DataUse(version="m:1", source="old", rdp=own.rdp)
    assert profile_examples(fed, [own, legacy], key) == []
