"""The server's strategy against real Flower Messages: hostile replies, weights, central DP.

Each hostile reply is rejected with its reason logged while the round completes on the others;
weights come from the server, so a client cannot steer the average; a partition answers from
the node bound to it; a client's error text is never kept; central DP's effective noise
multiplier is exactly the one its accountant charges.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from cluster.core.config import ConfigError
from federated.client_app import build_client_app
from federated.planning import make_plan
from federated.privacy.accounting import ledger_epsilons
from federated.privacy.ledger import ServerLedger, outside_client
from federated.protocol import METRICS, OUTSIDE_CLIENT, TrainMetrics, TrainReply, payload_bytes
from federated.strategy import GuardedStrategy, JoinTimeout, RoundReport
from tests.federated.loopback import LoopbackGrid, opacus_epsilon
from tests.federated.tiny_config import tiny

SECURE = {"tls": True, "supernode_auth": True}
KEYS = ("m.lora_A.weight", "m.lora_B.weight")
GLOBAL = ArrayRecord({k: Array(np.zeros((4, 8), np.float32)) for k in KEYS})


def arrays(value: float = 0.01, dtype=np.float32, shape=(4, 8)) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(shape, value, dtype)) for k in KEYS})


def request(node: int) -> Message:
    content = RecordDict({"arrays": GLOBAL, "config": ConfigRecord({})})
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def answer(node: int, content) -> Message:
    return Message(content=content, reply_to=request(node))


def honest(node: int, plan, partition: int, value: float = 0.01, private: bool = True) -> Message:
    clear = {} if private else {"train_loss": 1.0, "train_seconds": 0.5}
    metrics = TrainMetrics(len(plan.partitions[partition]), 2, partition, epsilon=0.5, **clear)
    return answer(node, TrainReply(arrays(value), metrics).to_content())


def strategy(tmp_path, cfg, plan, saved: list, **kwargs) -> GuardedStrategy:
    ledger = ServerLedger(tmp_path / "run")

    def on_round(report: RoundReport, out: ArrayRecord) -> None:
        saved.append((report, out))

    made = GuardedStrategy(
        cfg, plan, ledger, lambda: ledger_epsilons(cfg, plan, ledger), on_round, **kwargs
    )
    made._global = GLOBAL  # as configure_train leaves it
    return made


def _hostile(plan) -> dict[str, Message]:
    """Node id 10.. -> a reply no server should aggregate, by kind."""
    good = dict(TrainMetrics(len(plan.partitions[1]), 2, 1, epsilon=0.5).to_record())

    def with_metrics(node, values, payload=None):
        return answer(
            node, RecordDict({"arrays": payload or arrays(), METRICS: MetricRecord(values)})
        )

    def with_records(node, records):
        return answer(node, RecordDict(records))

    wrong_bytes = arrays()
    wrong_bytes[KEYS[0]].data = b"\x93NUMPY" + b"\0" * 130  # right size, not an array
    outside = dict(good, **{"partition-id": OUTSIDE_CLIENT})
    return {
        "weight poisoning: 9e18 examples": with_metrics(10, dict(good, **{"num-examples": 9e18})),
        "negative unit-weight (extra key)": with_metrics(11, dict(good, **{"unit-weight": -5.0})),
        "missing metric key": with_metrics(12, {k: v for k, v in good.items() if k != "steps"}),
        "NaN step count": with_metrics(13, dict(good, steps=math.nan)),
        "list-valued metric": with_metrics(14, dict(good, **{"num-examples": [1.0, 2.0]})),
        "unexpected record name": with_records(
            141, {"weights": arrays(), METRICS: MetricRecord(good)}
        ),
        "extra config record": with_records(
            15, {"arrays": arrays(), METRICS: MetricRecord(good), "cfg": ConfigRecord({"a": 1})}
        ),
        "NaN tensor": with_metrics(16, good, arrays(math.nan)),
        "wrong shape": with_metrics(17, good, arrays(shape=(8, 4))),
        "wrong dtype": with_metrics(18, good, arrays(dtype=np.float64)),
        "update norm too large": with_metrics(19, good, arrays(1e3)),
        "bytes not an array": with_metrics(20, good, wrong_bytes),
        "loss in clear under DP": with_metrics(21, dict(good, train_loss=0.3)),
        "partition that does not exist": with_metrics(22, dict(good, **{"partition-id": 7})),
        "claims another partition's size": with_metrics(23, dict(good, **{"num-examples": 5})),
        "outside client above the cap": with_metrics(24, dict(outside, **{"num-examples": 50_000})),
        "second reply for one client": with_metrics(25, good),
        "empty reply": with_records(26, {}),
    }


def test_every_hostile_reply_is_rejected_logged_and_charged_and_the_round_completes(
    tmp_path, caplog
):
    cfg = tiny(
        tmp_path, flower={**SECURE, "external_clients": 1}, federation={"min_available_nodes": 3}
    )
    plan = make_plan(cfg)
    saved: list = []
    guard = strategy(tmp_path, cfg, plan, saved)
    guard._attempt = guard.ledger.start(1, 1.0, 2, [])
    hostile = _hostile(plan)
    replies = [honest(1, plan, 0, 0.01), honest(2, plan, 1, 0.03), *hostile.values()]
    replies.append(Message(Error(code=0, reason="SuperNode lost"), reply_to=request(30)))

    out, _ = guard.aggregate_train(1, replies)

    [(report, kept)] = saved
    assert report.clients == 2 and sorted(report.per_client) == [1, 2]
    assert sorted(report.rejected) == sorted(m.metadata.src_node_id for m in hostile.values())
    assert report.failed == {30: "Flower error 0 (unknown)"}  # never the client's own words
    assert len(hostile) >= 8
    for node, why in report.rejected.items():
        assert why and f"rejected reply from node {node}" in caplog.text
    # The honest average, by the server's weights (partition sizes 162 and 147).
    n0, n1 = (len(p) for p in plan.partitions)
    expected = (0.01 * n0 + 0.03 * n1) / (n0 + n1)
    assert np.allclose(out[KEYS[0]].numpy(), expected, atol=1e-7) and kept is out
    # The rejected replies were charged: the ledger holds every reply the server saw.
    statuses = [e.status for e in guard.ledger.events() if e.event == "reply"]
    assert statuses.count("rejected") == len(hostile) and statuses.count("kept") == 2
    assert report.train_loss is None and report.slowest_client_seconds is None  # under DP
    assert report.seconds is None  # a round's time follows what its clients sampled
    # Communication: every reply read off the wire is counted, the failed one sent nothing.
    honest_bytes = payload_bytes(replies[0].content)
    assert honest_bytes > 0 and report.bytes_received[1] == report.bytes_received[2] == honest_bytes
    assert 30 not in report.bytes_received


def test_a_client_cannot_steer_the_average_with_its_weight(tmp_path):
    cfg = tiny(
        tmp_path,
        flower={**SECURE, "external_clients": 2, "external_max_examples": 200},
        federation={"min_available_nodes": 4},
        privacy={"mode": "none", "noise_multiplier": None},
    )
    plan = make_plan(cfg)
    saved: list = []
    guard = strategy(tmp_path, cfg, plan, saved)
    guard._attempt = guard.ledger.start(1, None, 0, [])
    poison = arrays(0.5)  # within max_update_norm (50): only its weight could make it win

    def claim(node, partition, examples):
        metrics = TrainMetrics(examples, 2, partition, train_loss=1.0, train_seconds=0.1)
        return answer(node, TrainReply(poison, metrics).to_content())

    replies = [
        honest(1, plan, 0, 0.01, private=False),
        honest(2, plan, 1, 0.03, private=False),
        claim(3, 0, 9 * 10**15),  # an in-cluster partition, a giant count
        claim(4, OUTSIDE_CLIENT, 9 * 10**15),  # outside, a giant count
    ]

    out, _ = guard.aggregate_train(1, replies)

    n0, n1 = (len(p) for p in plan.partitions)
    honest_average = (0.01 * n0 + 0.03 * n1) / (n0 + n1)
    assert np.allclose(out[KEYS[0]].numpy(), honest_average, atol=1e-7)
    [(report, _)] = saved
    assert sorted(report.rejected) == [3, 4]


def test_central_dp_noise_matches_what_its_accountant_charges(tmp_path):
    sigma, clip = 1.3, 0.5
    cfg = tiny(
        tmp_path,
        privacy={"mode": "central_dp", "noise_multiplier": sigma, "max_grad_norm": clip},
        federation={"num_clients": 2, "rounds": 1, "fraction_train": 0.5},
    )
    plan = make_plan(cfg)
    saved: list = []
    guard = strategy(tmp_path, cfg, plan, saved, rng=np.random.default_rng(0))
    grid = LoopbackGrid(dict.fromkeys([1, 2, 3, 4]))
    messages = list(guard.configure_train(1, GLOBAL, ConfigRecord(), grid))
    assert len(messages) == 2 == len(guard._sampled)  # half of the 4 connected nodes

    # Sensitivity: with the noise off, adding or removing one client (however large its
    # update, a failed one counting as zero) moves the average by at most clip / sampled.
    silent = plan.noise.model_copy(update={"noise_multiplier": 0.0})
    guard_off = strategy(tmp_path / "off", cfg, plan.model_copy(update={"noise": silent}), [])
    guard_off._sampled, guard_off._attempt = [1, 2], guard_off.ledger.start(1, 0.0, 1, [1, 2])
    metrics = TrainMetrics(len(plan.partitions[0]), 1, 0)
    big = answer(1, TrainReply(arrays(5.0), metrics).to_content())  # norm 40 >> clip
    lost = Message(Error(0, "lost"), reply_to=request(1))
    with_both, _ = guard_off.aggregate_train(1, [big, honest(2, plan, 1, 0.01)])
    without, _ = guard_off.aggregate_train(1, [lost, honest(2, plan, 1, 0.01)])
    moved = math.sqrt(
        sum(((with_both[k].numpy() - without[k].numpy()).astype(float) ** 2).sum() for k in KEYS)
    )
    assert moved == pytest.approx(clip / 2, rel=1e-5)  # the clipped big update, divided by 2

    # Noise: its std on the average is sigma * clip / 2, so noise / sensitivity = sigma.
    big_global = ArrayRecord({k: Array(np.zeros((200, 250), np.float32)) for k in KEYS})
    guard._global = big_global
    out, _ = guard.aggregate_train(1, [])
    noise_std = np.concatenate([out[k].numpy().ravel() for k in KEYS]).std()
    assert noise_std / (clip / 2) == pytest.approx(sigma, rel=0.01)

    # What the accountant charged: one release per round at rate 1 (no sampling amplification),
    # at the same sigma, for every client.
    truth = opacus_epsilon([(sigma, 1.0, 1)])
    assert ledger_epsilons(cfg, plan, guard.ledger) == pytest.approx({"0": truth, "1": truth})
    assert plan.noise.sample_rates == [1.0, 1.0]


def test_a_round_waits_for_its_nodes_only_until_the_join_deadline(tmp_path):
    cfg = tiny(
        tmp_path,
        flower={**SECURE, "external_clients": 1, "join_timeout_s": 0.3},
        federation={"min_available_nodes": 3},
    )
    guard = strategy(tmp_path, cfg, make_plan(cfg), [])
    with pytest.raises(JoinTimeout) as err:
        guard.configure_train(1, GLOBAL, ConfigRecord(), LoopbackGrid({1: None, 2: None}))
    message = str(err.value)
    assert "2 of the 3 SuperNodes" in message and "flower.join_timeout_s (0.3 s)" in message
    assert "in-cluster partitions [0, 1] of 2" in message and "1 expected" in message
    assert guard.ledger.attempts() == []  # nobody was asked, nothing charged


def _claim(node: int, partition: int, examples: int, value: float, private: bool = True):
    """A reply claiming `partition` and `examples`, whoever sends it."""
    clear = {} if private else {"train_loss": 1.0, "train_seconds": 0.1}
    metrics = TrainMetrics(examples, 2, partition, epsilon=0.5 if private else None, **clear)
    return answer(node, TrainReply(arrays(value), metrics).to_content())


def _round(guard: GuardedStrategy, connected: list[int], replies: list[Message]):
    """One round through the strategy's public path: sampled and logged, then aggregated."""
    grid = LoopbackGrid(dict.fromkeys(connected))
    guard.configure_train(1, GLOBAL, ConfigRecord(), grid)
    return guard.aggregate_train(1, replies)


def test_a_partition_answers_only_from_the_node_bound_to_it_while_that_node_is_connected(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="flwr")  # another test may have quietened Flower's
    cfg = tiny(tmp_path)
    plan = make_plan(cfg)
    saved: list = []
    guard = strategy(tmp_path, cfg, plan, saved)
    n0, n1 = (len(p) for p in plan.partitions)
    honest_average = (0.01 * n0 + 0.03 * n1) / (n0 + n1)
    _round(guard, [1, 2], [honest(1, plan, 0, 0.01), honest(2, plan, 1, 0.03)])

    # Node 3 claims partition 0 (bound to node 1, still connected), and answers first.
    impostor = _claim(3, 0, n0, 0.5)
    out, _ = _round(
        guard, [1, 2, 3], [impostor, honest(1, plan, 0, 0.01), honest(2, plan, 1, 0.03)]
    )

    report = saved[-1][0]
    assert sorted(report.per_client) == [1, 2] and list(report.rejected) == [3]
    assert report.rejected[3] == (
        "client 0 is bound to node 1, which is still connected; node 3 cannot answer for it"
    )
    assert "rejected reply from node 3" in caplog.text
    assert np.allclose(out[KEYS[0]].numpy(), honest_average, atol=1e-7)
    replies = [e for e in guard.ledger.events() if e.event == "reply" and e.attempt == 2]
    assert [(e.node, e.client, e.status) for e in replies] == [
        (3, "0", "rejected"),  # charged to the partition it claimed
        (1, "0", "kept"),
        (2, "1", "kept"),
    ]
    # A node answers as one client: node 2 cannot switch to partition 0 either.
    _round(guard, [1, 2], [honest(1, plan, 0, 0.01), _claim(2, 0, n0, 0.03)])
    assert "node 2 answered as client 1, not 0" in saved[-1][0].rejected[2]

    # Node 1 left (its SuperNode was restarted by Ray): the new node 4 takes partition 0 over.
    _round(guard, [2, 4], [honest(4, plan, 0, 0.01), honest(2, plan, 1, 0.03)])
    assert sorted(saved[-1][0].per_client) == [2, 4] and not saved[-1][0].rejected
    assert "client 0 moved from node 1 (gone) to node 4" in caplog.text

    # A resumed server reads the bindings back from the ledger.
    resumed = strategy(tmp_path, cfg, plan, saved)
    _round(resumed, [2, 4, 5], [_claim(5, 0, n0, 0.5), honest(4, plan, 0, 0.01)])
    assert list(saved[-1][0].rejected) == [5] and sorted(saved[-1][0].per_client) == [4]


@pytest.mark.parametrize("weights", ["examples", "equal"])
def test_an_outside_client_claiming_the_most_examples_weighs_no_more_than_the_largest_partition(
    tmp_path, weights
):
    most = 10_000
    cfg = tiny(
        tmp_path,
        flower={
            **SECURE,
            "external_clients": 1,
            "external_max_examples": most,
            "aggregation_weights": weights,
        },
        federation={"min_available_nodes": 3},
        privacy={"mode": "none", "noise_multiplier": None},
    )
    plan = make_plan(cfg)
    saved: list = []
    guard = strategy(tmp_path, cfg, plan, saved)
    replies = [
        honest(1, plan, 0, 0.01, private=False),
        honest(2, plan, 1, 0.03, private=False),
        _claim(3, OUTSIDE_CLIENT, most, 0.5, private=False),  # accepted: within the bounds
    ]

    out, _ = _round(guard, [1, 2, 3], replies)

    assert sorted(saved[-1][0].per_client) == [1, 2, 3]
    n0, n1 = (len(p) for p in plan.partitions)
    if weights == "examples":
        cap = max(n0, n1)
        expected = (0.01 * n0 + 0.03 * n1 + 0.5 * cap) / (n0 + n1 + cap)
    else:
        expected = (0.01 + 0.03 + 0.5) / 3
    assert np.allclose(out[KEYS[0]].numpy(), expected, atol=1e-7)
    claimed = (0.01 * n0 + 0.03 * n1 + 0.5 * most) / (n0 + n1 + most)  # what it asked for
    assert out[KEYS[0]].numpy()[0, 0] < claimed - 0.1


def test_aggregation_weights_other_than_examples_or_equal_are_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="flower.aggregation_weights.*'examples' or 'equal'"):
        tiny(tmp_path, flower={"aggregation_weights": "claimed"})


def test_a_rejected_outside_client_is_charged_at_its_own_rate_never_below_the_planned_one(
    tmp_path,
):
    cfg = tiny(
        tmp_path,
        flower={**SECURE, "external_clients": 2, "external_min_examples": 40},
        federation={"min_available_nodes": 4},
    )
    plan = make_plan(cfg)
    guard = strategy(tmp_path, cfg, plan, [])
    steps, sigma = plan.noise.steps_per_round, plan.noise.noise_multiplier
    assert plan.noise.outside_rate == 1 / 10  # 40 examples in batches of 4
    replies = [
        honest(1, plan, 0),
        honest(2, plan, 1),
        _claim(8, OUTSIDE_CLIENT, 20, 0.01),  # fewer than 40: rejected, but it may have trained
        _claim(9, OUTSIDE_CLIENT, 400, 1e3),  # norm too large: rejected
    ]

    _round(guard, [1, 2, 8, 9], replies)

    epsilons = ledger_epsilons(cfg, plan, guard.ledger)
    own = opacus_epsilon([(sigma, 1 / 5, steps)])  # 20 examples in batches of 4
    assert epsilons[outside_client(8)] == pytest.approx(own, rel=1e-9)
    assert own > opacus_epsilon([(sigma, 1 / 10, steps)])  # what it used to be charged
    # 400 examples would be rate 1/100: charged at the plan's 1/10, never below.
    assert epsilons[outside_client(9)] == pytest.approx(
        opacus_epsilon([(sigma, 1 / 10, steps)]), rel=1e-9
    )


def test_only_the_class_of_a_clients_error_reaches_the_server_and_its_reports(tmp_path, caplog):
    cfg = tiny(tmp_path)
    plan = make_plan(cfg)
    saved: list = []
    guard = strategy(tmp_path, cfg, plan, saved)
    secret = "patient-7 diagnosis"
    # fedforge's ClientApp, with a node config whose error message would quote a data path.
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "data-path": f"/data/{secret}.jsonl"},
        state=RecordDict(),
        run_config={},
    )
    from_app = build_client_app()(request(5), context)
    assert from_app.has_error() and from_app.error.reason == "ValueError"
    # Any other client (Flower's own format quotes the message), and a payload numpy cannot
    # read whose error would echo the client's bytes.
    raw = Message(Error(code=2, reason=f"<class 'KeyError'>:<'{secret}'>"), reply_to=request(6))
    unreadable = arrays()
    unreadable[KEYS[0]].data = secret.encode().ljust(len(unreadable[KEYS[0]].data), b"x")
    metrics = TrainMetrics(len(plan.partitions[1]), 2, 1, epsilon=0.5)
    garbled = answer(7, TrainReply(unreadable, metrics).to_content())

    _round(guard, [5, 6, 7], [from_app, raw, garbled])

    report = saved[-1][0]
    assert report.failed == {
        5: "Flower error 2 (client app raised exception): ValueError",
        6: "Flower error 2 (client app raised exception): KeyError",
    }
    assert report.rejected[7].endswith("cannot be read as an array (ValueError)")
    server_log = "\n".join(r.getMessage() for r in caplog.records if r.name == "flwr")
    assert secret not in report.model_dump_json() and secret not in server_log
