"""The privacy ledger: epsilon never under-reported, on every path issue 12 names and in general.

Each test plays a run's server side for real (`serve_rounds`, the strategy, the ledger, the
round files) against in-process clients (tests/federated/loopback.py) and checks the epsilon
the run would register against an independent recomputation: Opacus' RDP accountant given the
history the scenario really produced (which noise, which rate, how many steps, how many times).
"""

from __future__ import annotations

import json
import random

import pytest
from flwr.app import Array, ArrayRecord, Message

from federated.local_train import TaskRefused, train_for_node
from federated.node_task import ClientState, NodeTask
from federated.planning import make_plan
from federated.privacy.accounting import PrivacyPlanError, epsilon_of, privacy_record
from federated.privacy.ledger import (
    LedgerError,
    ServerLedger,
    history_of,
    in_cluster_client,
    outside_client,
    sample_rate,
)
from federated.protocol import OUTSIDE_CLIENT, TrainTask
from federated.run_config import NodeConfig, RunSpec
from federated.run_files import RunFiles
from federated.server_app import serve_rounds
from tests.federated.loopback import HonestClient, LoopbackGrid, opacus_epsilon, step
from tests.federated.tiny_config import REPO, tiny

L = 2  # tiny.yaml's local_steps
SECURE = {"tls": True, "supernode_auth": True}


class Crash(Exception):
    """The server process died here."""


def job(cfg, state, make_clients) -> tuple[RunSpec, dict[int, HonestClient]]:
    """One submission of the run: plan against the ledger, serve the remaining rounds."""
    files = RunFiles(state, cfg.name)
    plan = make_plan(cfg, ServerLedger(files.root), files.latest_round() or 0)
    run = RunSpec(cfg, plan, state)
    clients = make_clients(run)
    serve_rounds(run, LoopbackGrid(clients))
    return run, clients


def in_cluster(run: RunSpec) -> dict[int, HonestClient]:
    return {100 + p: HonestClient(run, p) for p in range(run.cfg.federation.num_clients)}


def registered(run: RunSpec, state):
    files = RunFiles(state, run.cfg.name)
    files.check_complete(run.cfg.federation.rounds)
    return privacy_record(run.cfg, run.plan, files.rounds(), ServerLedger(files.root))


def rates(run: RunSpec) -> list[float]:
    return [sample_rate(len(p), run.cfg.federation.batch_size) for p in run.plan.partitions]


def crash_in(monkeypatch, method: str, at_round: int) -> None:
    original = getattr(RunFiles, method)

    def crashing(self, *args):
        rnd = args[-1] if method == "save_adapter" else args[1].round
        if rnd == at_round:
            monkeypatch.setattr(RunFiles, method, original)  # once
            raise Crash(f"{method} of round {at_round}")
        return original(self, *args)

    monkeypatch.setattr(RunFiles, method, crashing)


def test_a_raising_rounds_under_a_target_composes_the_spent_rounds_at_their_own_noise(
    tmp_path, state
):
    privacy = {"noise_multiplier": None, "target_epsilon": 2.0}
    first, _ = job(tiny(tmp_path, privacy=privacy, federation={"rounds": 2}), state, in_cluster)
    more, _ = job(tiny(tmp_path, privacy=privacy, federation={"rounds": 3}), state, in_cluster)

    sigma_1, sigma_2 = first.plan.noise.noise_multiplier, more.plan.noise.noise_multiplier
    assert sigma_2 > sigma_1  # the last round is noisier: the target holds for the composition
    truth = {
        in_cluster_client(p): opacus_epsilon([(sigma_1, q, 2 * L), (sigma_2, q, L)])
        for p, q in enumerate(rates(first))
    }
    record = registered(more, state)
    assert record.clients == pytest.approx(truth, rel=1e-9)
    assert record.epsilon == pytest.approx(max(truth.values()), rel=1e-9)
    assert 1.99 < record.epsilon <= 2.0 + 1e-9
    # Charging the spent rounds at the new noise (the old behaviour) would have under-reported.
    worst = max(rates(first))
    assert opacus_epsilon([(sigma_2, worst, 3 * L)]) < record.epsilon

    with pytest.raises(PrivacyPlanError, match="3 rounds already run .* spent epsilon 2.0"):
        job(tiny(tmp_path, privacy=privacy, federation={"rounds": 400}), state, in_cluster)


def test_b_a_supernode_restarted_mid_run_is_charged_for_the_rounds_before_its_restart(
    tmp_path, state
):
    cfg = tiny(tmp_path, federation={"rounds": 2})
    victim: list[HonestClient] = []

    def clients(run):
        made = in_cluster(run)
        victim.append(made[100])
        answer = made[100]

        def restarting(msg: Message) -> Message:
            if TrainTask.from_content(msg.content).current.round == 2:
                answer.restart()  # the SuperNode came back with an empty context.state
            return answer(msg)

        return {**made, 100: restarting}

    run, _ = job(cfg, state, clients)

    q = rates(run)
    truth = opacus_epsilon([(1.0, q[0], 2 * L)])
    assert victim[0].reported[-1] == pytest.approx(truth, rel=1e-9)  # its own report
    assert opacus_epsilon([(1.0, q[0], L)]) < truth  # what it used to report
    record = registered(run, state)
    assert record.clients["0"] == pytest.approx(truth, rel=1e-9)
    assert record.epsilon == pytest.approx(max(opacus_epsilon([(1.0, r, 2 * L)]) for r in q))


def test_c_a_round_rerun_after_a_crash_before_it_was_saved_is_charged_twice(
    tmp_path, state, monkeypatch
):
    cfg = tiny(tmp_path, federation={"rounds": 2})
    crash_in(monkeypatch, "save_round", at_round=2)  # the clients replied, nothing saved
    with pytest.raises(Crash):
        job(cfg, state, in_cluster)
    run, clients = job(cfg, state, in_cluster)  # the whole job restarted: fresh clients

    truth = [opacus_epsilon([(1.0, q, 3 * L)]) for q in rates(run)]  # rounds 1, 2 and 2 again
    record = registered(run, state)
    assert [record.clients[str(p)] for p in range(2)] == pytest.approx(truth, rel=1e-9)
    assert record.epsilon == pytest.approx(max(truth), rel=1e-9)
    assert [c.reported[-1] for c in clients.values()] == pytest.approx(truth, rel=1e-9)
    assert [r.attempt for r in RunFiles(state, cfg.name).rounds()] == [1, 3]


def _outside_config(tmp_path, extra: int = 1, **privacy):
    return tiny(
        tmp_path,
        federation={"rounds": 2, "min_available_nodes": 2 + extra},
        flower={**SECURE, "external_clients": extra, "external_min_examples": 40},
        privacy=privacy or {},
    )


def test_d_an_outside_client_is_charged_at_its_own_rate_and_counted_in_the_calibration(
    tmp_path, state
):
    cfg = _outside_config(tmp_path, noise_multiplier=None, target_epsilon=3.0)
    outside = {}

    def clients(run):
        outside["client"] = HonestClient(run, OUTSIDE_CLIENT, examples=40)
        return {**in_cluster(run), 7: outside["client"]}

    run, _ = job(cfg, state, clients)

    noise = run.plan.noise
    assert noise.outside_rate == 1 / 10 == noise.sample_rate  # calibrated for the outside rate
    truth = opacus_epsilon([(noise.noise_multiplier, 1 / 10, 2 * L)])
    record = registered(run, state)
    assert record.clients[outside_client(7)] == pytest.approx(truth, rel=1e-9)
    assert record.epsilon == pytest.approx(truth, rel=1e-9) and truth <= 3.0
    assert outside["client"].reported[-1] == pytest.approx(truth, rel=1e-9)
    in_cluster_rate = max(rates(run))
    assert opacus_epsilon([(noise.noise_multiplier, in_cluster_rate, 2 * L)]) < truth


def test_d_an_outside_client_with_less_data_than_calibrated_refuses_to_train(tmp_path, state):
    cfg = _outside_config(tmp_path, noise_multiplier=None, target_epsilon=3.0)
    small = tmp_path / "small.jsonl"
    lines = (REPO / "llm" / "demo_task" / "tickets.jsonl").read_text().splitlines()[:20]
    small.write_text("\n".join(lines) + "\n")
    run = RunSpec(cfg, make_plan(cfg), state)
    arrays = ArrayRecord({"x": Array(__import__("numpy").zeros(2, "float32"))})
    task = TrainTask(arrays, (ServerLedger(tmp_path).start(1, 1.5, L, []),))
    node = NodeConfig(data_path=str(small))
    with pytest.raises(TaskRefused, match="20 examples, fewer than the 40"):
        train_for_node(NodeTask(run, node, task, ClientState()))


def test_e_rejected_replies_are_charged(tmp_path, state):
    cfg = _outside_config(tmp_path, extra=2)
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 3})})

    def clients(run):
        flaky = HonestClient(run, OUTSIDE_CLIENT, examples=40)
        broken = HonestClient(run, OUTSIDE_CLIENT, examples=40, delta=1e6)  # norm far too big

        def sometimes_broken(msg: Message) -> Message:
            if TrainTask.from_content(msg.content).current.round == 2:
                flaky.delta = 1e6
                reply = flaky(msg)
                flaky.delta = 1e-3
                return reply
            return flaky(msg)

        return {**in_cluster(run), 7: sometimes_broken, 8: broken}

    run, _ = job(cfg, state, clients)

    files = RunFiles(state, cfg.name)
    rejected = [sorted(r.rejected) for r in files.rounds()]
    assert rejected == [[8], [7, 8], [8]]
    truth = opacus_epsilon([(1.0, 1 / 10, 3 * L)])
    record = registered(run, state)
    assert record.clients[outside_client(7)] == pytest.approx(truth, rel=1e-9)
    assert record.clients[outside_client(8)] == pytest.approx(truth, rel=1e-9)
    assert record.epsilon == pytest.approx(truth, rel=1e-9)


def test_f_a_crash_between_the_round_line_and_its_adapter_reruns_the_round(
    tmp_path, state, monkeypatch
):
    cfg = tiny(tmp_path, federation={"rounds": 2})
    files = RunFiles(state, cfg.name)
    crash_in(monkeypatch, "save_adapter", at_round=2)  # the line is written, the adapter not
    with pytest.raises(Crash):
        job(cfg, state, in_cluster)
    assert files.latest_round() == 1  # not "finished"
    with pytest.raises(Exception, match="rounds 1..2 are not all saved and logged"):
        files.check_complete(2)

    run, _ = job(cfg, state, in_cluster)

    truth = [opacus_epsilon([(1.0, q, 3 * L)]) for q in rates(run)]
    record = registered(run, state)
    assert record.epsilon == pytest.approx(max(truth), rel=1e-9)
    assert files.rounds()[-1].attempt == 3


def test_f_registration_refuses_a_saved_round_without_its_line(tmp_path, state):
    cfg = tiny(tmp_path, federation={"rounds": 2})
    run, _ = job(cfg, state, in_cluster)
    files = RunFiles(state, cfg.name)
    lines = files.rounds_log.read_text().splitlines()
    files.rounds_log.write_text(lines[0] + "\n")  # as the old order could leave it

    assert files.latest_round() == 1
    with pytest.raises(Exception, match="log lines for \\[1\\]"):
        files.check_complete(2)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_ledger_never_under_reports_under_random_crashes_restarts_and_rejections(
    tmp_path, state, monkeypatch, seed
):
    """Every training a client really did is charged: random crashes (before a round is saved,
    between its line and its adapter), SuperNode restarts, rejected and failed replies."""
    rng = random.Random(seed)
    cfg = _outside_config(tmp_path)
    cfg = cfg.model_copy(
        update={"federation": cfg.federation.model_copy(update={"rounds": 4, "min_train_nodes": 1})}
    )
    trained: dict[str, list[tuple[float, float, int]]] = {}

    def clients(run):
        made = {**in_cluster(run), 7: HonestClient(run, OUTSIDE_CLIENT, examples=55)}

        def wrap(node: int, client: HonestClient):
            name = outside_client(node) if node == 7 else in_cluster_client(client.partition)
            n = 55 if node == 7 else len(run.plan.partitions[client.partition])

            def answer(msg: Message) -> Message:
                if rng.random() < 0.2:
                    client.restart()
                noise = TrainTask.from_content(msg.content).current.noise
                reply = client(msg)  # it trained: a real release of its data
                trained.setdefault(name, []).append((noise, sample_rate(n, 4), L))
                fate = rng.random()
                if fate < 0.15:
                    return Message(
                        TrainTask(
                            step(TrainTask.from_content(msg.content).arrays, float("nan"))
                        ).to_content(),
                        reply_to=msg,
                    )  # garbage after training: rejected
                return reply

            return answer

        return {node: wrap(node, c) for node, c in made.items()}

    for _ in range(12):
        if (RunFiles(state, cfg.name).latest_round() or 0) >= 4:
            break
        if rng.random() < 0.5:
            crash_in(monkeypatch, rng.choice(["save_round", "save_adapter"]), rng.randint(1, 4))
        try:
            run, _ = job(cfg, state, clients)
        except Crash:
            monkeypatch.undo()
    record = registered(run, state)
    for name, history in trained.items():
        truth = opacus_epsilon(history)
        assert record.clients[name] >= truth - 1e-9, (name, record.clients[name], truth)
    assert record.epsilon >= max(opacus_epsilon(h) for h in trained.values()) - 1e-9
    # In-cluster clients trained in every attempt: their epsilon is exact, not just an upper bound.
    for p in range(2):
        assert record.clients[str(p)] == pytest.approx(opacus_epsilon(trained[str(p)]), rel=1e-9)


@pytest.mark.parametrize("noise", [None, 0.5])
def test_a_client_refuses_a_task_with_less_noise_than_planned(tmp_path, empty_state, noise):
    from federated.local_train import client_ledger
    from federated.privacy.ledger import Attempt

    cfg = tiny(tmp_path)  # planned noise 1.0
    run = RunSpec(cfg, make_plan(cfg), empty_state)
    arrays = ArrayRecord({"x": Array(__import__("numpy").zeros(2, "float32"))})
    task = NodeTask(
        run, NodeConfig(partition=0), TrainTask(arrays, (Attempt(1, 1, noise),)), ClientState()
    )
    with pytest.raises(TaskRefused, match="below the planned 1"):
        client_ledger(task, 0.1)


def _cut_last_line(ledger: ServerLedger) -> int:
    """A crash in the middle of the last append: half of the last line is on disk."""
    data = ledger.path.read_bytes()
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    kept = start + (len(data) - start) // 2
    ledger.path.write_bytes(data[:kept])
    return kept - start  # the cut line's bytes left on disk


def _ledger_epsilon(charges) -> float:
    return epsilon_of(history_of(charges), 1e-5, "rdp")


def test_a_started_line_cut_by_a_crash_is_repaired_and_every_attempt_is_charged(tmp_path):
    ledger, q, q_out = ServerLedger(tmp_path), 1 / 41, 1 / 10
    for n, noise in enumerate([1.2, 1.0], start=1):
        attempt = ledger.start(n, noise, L, [100, 7])
        ledger.reply(attempt, 100, "0", q, "kept")
        if n == 1:
            ledger.reply(attempt, 7, outside_client(7), q_out, "kept")
        ledger.done(attempt)
    ledger.start(3, 1.1, L, [100, 7])
    on_disk = _cut_last_line(ledger)  # the crash: attempt 3's line is half written

    fourth = ledger.start(3, 1.1, L, [100, 7])  # the resumed run re-runs round 3
    ledger.reply(fourth, 100, "0", q, "kept")
    ledger.reply(fourth, 7, outside_client(7), q_out, "kept")

    lines = [json.loads(line) for line in ledger.path.read_text().splitlines()]  # all whole
    assert {"event": "torn", "attempt": 3, "opened": True, "dropped": on_disk} in lines
    assert fourth.attempt == 4 and [a.attempt for a in ledger.attempts()] == [1, 2, 4]
    charges = ledger.charges({"0": q})
    # The cut attempt is charged at the run's smallest noise (its own is lost), as assumed.
    assert history_of(charges["0"]) == [(1.2, q, L), (1.0, q, L), (1.0, q, L), (1.1, q, L)]
    assert [c.assumed for c in charges["0"]] == [False, False, True, False]
    # The truth: attempts 1, 2 and 4 trained (3 crashed before anyone was asked); charging 3
    # too, even at its own noise, stays below what the ledger charges.
    trained = [(1.2, q, L), (1.0, q, L), (1.1, q, L)]
    assert _ledger_epsilon(charges["0"]) == pytest.approx(
        opacus_epsilon([(1.2, q, L), (1.0, q, L), (1.0, q, L), (1.1, q, L)]), rel=1e-9
    )
    assert _ledger_epsilon(charges["0"]) >= opacus_epsilon([*trained, (1.1, q, L)]) - 1e-12
    assert _ledger_epsilon(charges["0"]) > opacus_epsilon(trained)
    # The outside client trained in 1 and 4; the unfinished, cut attempt 3 is charged to it.
    outside = charges[outside_client(7)]
    assert [c.attempt for c in outside] == [1, 3, 4]
    assert _ledger_epsilon(outside) >= opacus_epsilon([(1.2, q_out, L), (1.1, q_out, L)])


def test_an_outside_clients_first_reply_cut_by_a_crash_still_charges_its_attempt(tmp_path):
    ledger, q_out = ServerLedger(tmp_path), 1 / 10
    first = ledger.start(1, 1.0, L, [9])
    ledger.reply(first, 9, outside_client(9), q_out, "kept")
    _cut_last_line(ledger)  # the server saw its update, the crash cut the line saying so

    second = ledger.start(1, 1.0, L, [9])  # the round re-run: the client answers again
    ledger.reply(second, 9, outside_client(9), q_out, "kept")

    torn = [e for e in ledger.events() if e.event == "torn"]
    assert [(e.attempt, e.opened) for e in torn] == [(1, False)]  # of the open attempt 1
    charges = ledger.charges({})[outside_client(9)]
    assert [c.attempt for c in charges] == [1, 2]
    assert _ledger_epsilon(charges) == pytest.approx(opacus_epsilon([(1.0, q_out, 2 * L)]))


def test_a_ledger_line_that_does_not_parse_before_the_last_is_refused_not_skipped(tmp_path):
    ledger = ServerLedger(tmp_path)
    attempt = ledger.start(1, 1.0, L, [100])
    ledger.reply(attempt, 100, "0", 1 / 41, "kept")
    ledger.done(attempt)
    lines = ledger.path.read_bytes().split(b"\n")
    # What the old append left: a cut line with the next event merged into it.
    lines[1] = lines[1][:20] + lines[2]
    ledger.path.write_bytes(b"\n".join(lines))

    for read in (ledger.events, lambda: ledger.charges({"0": 1 / 41}), ledger.repair):
        with pytest.raises(LedgerError, match=f"{ledger.path}, line 2: not a ledger event"):
            read()
    with pytest.raises(LedgerError, match="line 2"):
        ledger.start(2, 1.0, L, [100])


def test_a_saved_round_without_a_started_attempt_is_refused(tmp_path, state):
    cfg = tiny(tmp_path, federation={"rounds": 2})
    job(cfg, state, in_cluster)
    files = RunFiles(state, cfg.name)
    ledger = ServerLedger(files.root)
    lines = ledger.path.read_text().splitlines()
    kept = [x for x in lines if not (json.loads(x)["event"] == "started" and '"round":2' in x)]
    assert len(kept) == len(lines) - 1
    ledger.path.write_text("\n".join(kept) + "\n")  # the ledger lost round 2's release

    refused = "rounds \\[2\\] were saved but no attempt at them was logged"
    with pytest.raises(LedgerError, match=refused):
        files.check_complete(2)  # registration
    with pytest.raises(LedgerError, match=refused):
        files.latest_round()  # where a resumed run starts
    with pytest.raises(LedgerError, match=refused):
        job(tiny(tmp_path, federation={"rounds": 3}), state, in_cluster)
