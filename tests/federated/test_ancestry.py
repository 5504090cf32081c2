"""Epsilon across versions: each data source's spend composed over a version's ancestry, checked
against Opacus' own accountant given the whole history."""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant

from cluster.privacy_record import ClientCharge, DataPrivacy, PrivacyRecord, data_source
from federated.ancestry import compose
from tests.federated.conftest import tiny

SHA = "ab" * 32
CLIENTS = data_source(SHA, "clients")


def charges(sigma: float, rate: float, steps: int, rounds: int) -> list[ClientCharge]:
    return [
        ClientCharge(attempt=r, round=r, noise=sigma, rate=rate, steps=steps) for r in range(rounds)
    ]


def opacus_epsilon(history: list[ClientCharge], delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    accountant.history = [(c.noise, c.rate, c.steps) for c in history]
    return accountant.get_epsilon(delta)


def record(histories: dict[str, list[ClientCharge]]) -> PrivacyRecord:
    return PrivacyRecord(mode="local_dp", delta=1e-5, histories=histories)


def test_one_run_spends_what_its_worst_client_spent(tmp_path):
    cfg = tiny(tmp_path)
    run = record({"0": charges(1.0, 1 / 37, 2, 2), "1": charges(1.0, 1 / 10, 2, 2)})
    spent, curves = compose(cfg, run, SHA, ancestor=None)
    worst = opacus_epsilon(run.histories["1"])
    assert spent[CLIENTS].epsilon == pytest.approx(worst, rel=1e-6)
    assert spent[CLIENTS].versions == [] and list(curves) == [CLIENTS]


def test_a_version_federated_from_a_federated_version_composes_both(tmp_path):
    cfg = tiny(tmp_path, privacy={"budget_epsilon": 3.0})
    first = record({"0": charges(1.0, 0.1, 2, 2)})
    spent_first, curves_first = compose(cfg, first, SHA, ancestor=None)
    first = first.model_copy(update={"sources": curves_first})
    second = record({"0": charges(1.2, 0.1, 2, 3)})
    spent, _ = compose(cfg, second, SHA, ancestor=("m:1", spent_first, first))
    both = opacus_epsilon([*first.histories["0"], *second.histories["0"]])
    assert spent[CLIENTS].epsilon == pytest.approx(both, rel=1e-6)
    assert spent[CLIENTS].epsilon > spent_first[CLIENTS].epsilon
    assert spent[CLIENTS].versions == ["m:1"] and spent[CLIENTS].budget_epsilon == 3.0
    if both > 3.0:
        assert spent[CLIENTS].over_budget == pytest.approx(both - 3.0)
    else:
        assert spent[CLIENTS].over_budget is None


def test_central_fine_tuning_is_another_source_but_all_the_data_leaves_no_guarantee(tmp_path):
    cfg = tiny(tmp_path)
    run = record({"0": charges(1.0, 0.1, 2, 2)})
    central = {data_source(SHA, "central"): DataPrivacy(epsilon=None)}
    spent, _ = compose(cfg, run, SHA, ancestor=("m:1", central, None))
    assert spent[CLIENTS].epsilon is not None  # disjoint shares: the clients' data stays private
    assert spent[data_source(SHA, "central")].epsilon is None  # carried forward, as it is
    everything = {data_source(SHA, "all"): DataPrivacy(epsilon=None)}
    spent, curves = compose(cfg, run, SHA, ancestor=("m:1", everything, None))
    assert spent[CLIENTS].epsilon is None and CLIENTS not in curves
    assert spent[CLIENTS].over_budget is None  # no budget configured here
