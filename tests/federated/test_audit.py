"""The one-run canary audit: its lower bound as a pure function, and the audit on the tiny model.

The bound (Steinke, Nasr, Jagielski 2023) is checked against closed forms and its own
monotonicity; the integration test runs the product's rounds twice on the same canaries, with
local DP and without, and checks that the audit stays under the reported epsilon with DP and
sees the leak without it.
"""

from __future__ import annotations

import json
import math

import pytest

from cluster.state import StateDir
from federated.audit import (
    AuditError,
    AuditSettings,
    coin_flips,
    epsilon_lower_bound,
    guess,
    main,
    make_canaries,
    p_value,
    run_audit,
)
from tests.federated.conftest import tiny, write_config

WORDS = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]


def all_correct_bound(r: int, confidence: float) -> float:
    """With delta 0 and v = r: P[Binomial(r, q) >= r] = q^r = 1 - confidence, solved for eps."""
    q = (1 - confidence) ** (1 / r)
    return math.log(q / (1 - q))


@pytest.mark.parametrize("r", [10, 32, 100])
def test_all_guesses_correct_give_the_closed_form_bound(r):
    assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(
        all_correct_bound(r, 0.95), abs=1e-6
    )
    assert epsilon_lower_bound(2 * r, r, r, 0.0, 0.95) == pytest.approx(
        all_correct_bound(r, 0.95), abs=1e-6
    )  # abstentions cost nothing without delta


def test_random_guessing_gives_no_bound():
    assert epsilon_lower_bound(100, 100, 50, 1e-5, 0.95) == 0.0
    assert epsilon_lower_bound(100, 100, 55, 1e-5, 0.95) == 0.0  # within chance at 95%
    assert epsilon_lower_bound(100, 100, 20, 1e-5, 0.95) == 0.0  # worse than chance


def test_the_bound_grows_with_correct_guesses_and_confidence_and_shrinks_with_delta():
    bounds = [epsilon_lower_bound(64, 32, v, 1e-5, 0.95) for v in range(33)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[16] == 0.0 and bounds[-1] > 2.0
    assert epsilon_lower_bound(64, 32, 30, 1e-5, 0.99) < bounds[30]
    assert epsilon_lower_bound(64, 32, 30, 0.01, 0.95) < bounds[30]
    # at the bound, the p-value sits at 1 - confidence
    assert p_value(64, 32, 30, bounds[30], 1e-5) == pytest.approx(0.05, abs=1e-6)


def test_p_value_refuses_impossible_counts():
    with pytest.raises(ValueError):
        p_value(10, 11, 3, 1.0, 0.0)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 10, 5, 0.0, 1.0)


def test_guesses_take_both_ends_and_abstain_in_the_middle():
    scores = [0.5, -3.0, 2.0, -1.0, 0.0, 4.0]
    assert guess(scores, 4) == [None, True, False, True, None, False]
    assert guess(scores, 3) == [None, True, None, True, None, False]  # odd: one more "in"
    assert guess(scores, 0) == [None] * 6


def test_canaries_and_coin_flips_follow_the_seed_and_share_no_code_word():
    canaries = make_canaries(50, 7, WORDS)
    assert canaries == make_canaries(50, 7, WORDS)
    assert canaries != make_canaries(50, 8, WORDS)
    codes = [c.answer.removeprefix("ROUTE: ").split() for c in canaries]
    assert all(len(code) == 3 for code in codes)
    assert len({w for code in codes for w in code}) == 150
    flips = coin_flips(2000, 7)
    assert flips == coin_flips(2000, 7) and 900 < sum(flips) < 1100
    with pytest.raises(AuditError):
        make_canaries(300, 7, WORDS)  # 900 code words needed


@pytest.mark.parametrize(
    "settings",
    [
        AuditSettings(canaries=10, guesses=11),
        AuditSettings(canaries=1),
        AuditSettings(confidence=1.0),
        AuditSettings(client=5),
        AuditSettings(other_steps=99),
        AuditSettings(canary_lr=-1.0),
    ],
)
def test_an_audit_that_cannot_run_is_refused_before_training(tmp_path, settings):
    with pytest.raises(AuditError):
        run_audit(tiny(tmp_path), StateDir.resolve(tmp_path / "state"), settings)


# The tiny random model's logits span ~2.5 nats (unit RMSNorm, small tied embeddings): LoRA on
# attention/MLP cannot memorise single tokens, so the canary setting adds LoRA on lm_head (per
# token rows of B) and lifts max_update_norm for the canary client's high learning rate.
CANARY_SETTING = {
    "data": {"central_fraction": 0.8},  # a small canary client: more epochs per step
    "lora": {"target_modules": ["q_proj", "v_proj", "lm_head"]},
    "federation": {"rounds": 1, "local_steps": 24, "batch_size": 8, "max_update_norm": 1e4},
}
AUDIT = AuditSettings(canaries=64, guesses=32, canary_lr=0.05, other_steps=1, seed=1)


@pytest.mark.slow
@pytest.mark.integration
def test_the_audit_stays_under_epsilon_with_dp_and_sees_the_leak_without(tmp_path, state):
    # Noise 1.5 keeps the reported epsilon (1.92) under the 2.32 that 32 right guesses can
    # prove: "bound <= epsilon" is then a real check, failed by a run that leaks like no DP.
    with_dp = run_audit(
        tiny(tmp_path, **CANARY_SETTING, privacy={"mode": "local_dp", "noise_multiplier": 1.5}),
        state,
        AUDIT,
    )
    no_dp_config = write_config(
        tmp_path, **CANARY_SETTING, privacy={"mode": "none", "noise_multiplier": None}
    )
    args = ["--config", str(no_dp_config), "--state-dir", str(state.root)]
    args += ["--canaries", "64", "--guesses", "32", "--canary-lr", "0.05"]
    assert main([*args, "--other-steps", "1", "--seed", "1"]) == 0
    [report] = state.reports.glob("audit-*.json")
    no_dp = json.loads(report.read_text())

    print(
        f"\nwith DP: {with_dp.correct}/{with_dp.guesses} correct, bound "
        f"{with_dp.lower_bound:.3f}, reported {with_dp.client_epsilon:.3f} (canary client), "
        f"{with_dp.reported_epsilon:.3f} (run), {with_dp.seconds:.0f} s"
    )
    print(
        f"without DP: {no_dp['correct']}/{no_dp['guesses']} correct, bound "
        f"{no_dp['lower_bound']:.3f}, {no_dp['seconds']:.0f} s"
    )
    assert with_dp.inclusion == no_dp["inclusion"]  # the same canaries, the same coin flips
    assert with_dp.lower_bound <= with_dp.client_epsilon <= with_dp.reported_epsilon
    assert no_dp["reported_epsilon"] is None
    assert no_dp["lower_bound"] >= with_dp.lower_bound + 1.0
    assert no_dp["lower_bound"] > with_dp.client_epsilon  # this leak would refute the DP claim
    assert no_dp["correct"] >= 0.9 * no_dp["guesses"]
