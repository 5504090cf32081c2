"""The one-run canary audit: its statistics as pure functions, its views, and the audit on the
tiny model.

The bound (Steinke, Nasr, Jagielski 2023) is checked against closed forms and its own
monotonicity, the ceiling and the split of confidence across views likewise; the files view on
profiles and texts; the rounds view against autograd. The integration tests run the product's
rounds with canaries: with DP the bound stays under the reported epsilon (with a ceiling above
it), a planted profile of the clients' examples is flagged at the ceiling while the shipped one
names no canary, and without DP (in a setting where the tiny model can memorise) the audit sees
the leak.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from scipy import stats

from cluster.core.state import StateDir
from cluster.records.lineage import TRAINING_PROFILE_FILE
from cluster.records.prompt_features import prompt_text, training_profile
from federated.audit import (
    PLANTED_PROFILE,
    VIEWS,
    AuditError,
    AuditSettings,
    canary_batches,
    canary_clients,
    ceiling,
    code_words,
    coin_flips,
    descent,
    epsilon_lower_bound,
    guess,
    main,
    make_canaries,
    named_canaries,
    p_value,
    run_audit,
    score_run,
    train_run,
    view_confidence,
    write_report,
)
from federated.local_train import lora_model
from llm.data import load_split
from llm.losses import per_example_loss
from llm.model import load_tokenizer
from tests.federated.tiny_config import tiny, write_config

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


def test_the_ceiling_grows_with_the_guesses_and_is_above_the_demo_epsilon_at_the_defaults():
    per_view = view_confidence(0.95, len(VIEWS))
    ceilings = [ceiling(1000, r, 1e-5, per_view) for r in (10, 32, 100, 250, 500)]
    assert all(a < b for a, b in zip(ceilings, ceilings[1:], strict=False))
    assert ceiling(64, 32, 1e-5, 0.95) == pytest.approx(2.32, abs=0.01)  # the old audit's
    # The defaults (1000 canaries, 250 guesses, 3 views) can refute the demo's epsilon of 3.
    assert ceiling(1000, 250, 1e-5, per_view) == pytest.approx(4.06, abs=0.01)


def test_views_split_the_confidence_so_their_largest_bound_keeps_it():
    assert view_confidence(0.95, 3) == pytest.approx(1 - 0.05 / 3)
    assert view_confidence(0.95, 1) == pytest.approx(0.95)
    m, r, delta, per_view = 1000, 250, 1e-5, view_confidence(0.95, 3)
    assert ceiling(m, r, delta, per_view) < ceiling(m, r, delta, 0.95)  # the price of 3 views
    # Under the null (guesses at chance, views independent or not), any one view's bound above
    # 0 has probability at most 0.05 / 3, so the largest of the 3 is above 0 at most 5% of runs.
    first_positive = next(v for v in range(r + 1) if epsilon_lower_bound(m, r, v, delta, per_view))
    single = float(stats.binom.sf(first_positive - 1, r, 0.5))
    assert single <= 0.05 / 3
    assert 3 * single <= 0.05


def test_p_value_refuses_impossible_counts():
    with pytest.raises(ValueError):
        p_value(10, 11, 3, 1.0, 0.0)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 10, 5, 0.0, 1.0)


def test_guesses_take_the_highest_scores_or_both_ends_and_abstain_otherwise():
    scores = [0.5, -3.0, 2.0, -1.0, 0.0, 4.0]
    assert guess(scores, 3) == [True, None, True, None, None, True]  # one-sided: highest only
    assert guess(scores, 4, two_sided=True) == [None, False, True, False, None, True]
    assert guess(scores, 3, two_sided=True) == [None, False, True, None, None, True]  # odd: "in"
    assert guess(scores, 0) == [None] * 6
    assert guess([1.0, 0.0, 1.0, 1.0], 2) == [True, None, True, None]  # ties by index


def test_canaries_clients_and_coin_flips_follow_the_seed_and_share_no_code_word_or_prompt():
    canaries = make_canaries(200, 7, WORDS)
    assert canaries == make_canaries(200, 7, WORDS)
    assert canaries != make_canaries(200, 8, WORDS)
    codes = [c.answer.removeprefix("ROUTE: ").split() for c in canaries]
    assert all(len(code) == 3 for code in codes)
    assert len({w for code in codes for w in code}) == 600
    assert len({prompt_text(c.prompt_messages) for c in canaries}) == 200
    flips = coin_flips(2000, 7)
    assert flips == coin_flips(2000, 7) and 900 < sum(flips) < 1100
    clients = canary_clients(3000, 3, 7)
    assert clients == canary_clients(3000, 3, 7)
    assert all(900 < clients.count(c) < 1100 for c in range(3))
    with pytest.raises(AuditError):
        make_canaries(300, 7, WORDS)  # 900 code words needed


def test_a_file_names_a_canary_by_its_profile_row_or_its_text(tiny_config):
    canaries = make_canaries(6, 3, WORDS)
    shipped = training_profile(
        [prompt_text(e.prompt_messages) for e in load_split(tiny_config.data).train]
    )  # what a DP run registers: examples no DP release protects (no canary among them)
    assert named_canaries(canaries, TRAINING_PROFILE_FILE, shipped) == [False] * 6
    leaky = training_profile([prompt_text(c.prompt_messages) for c in canaries[:2]])
    assert named_canaries(canaries, PLANTED_PROFILE, leaky) == [True, True] + [False] * 4
    # The same rows in a file that is no profile name nothing: they are features, not text.
    assert named_canaries(canaries, "data_uses.json", leaky) == [False] * 6
    text = f"notes: {canaries[3].answer}; {prompt_text(canaries[5].prompt_messages)}"
    assert named_canaries(canaries, "README.md", text) == [False] * 3 + [True, False, True]


def test_the_rounds_view_is_the_gradient_inner_product_per_canary(tiny_config, state):
    model_path = state.base_model(tiny_config.model.base)
    tokenizer = load_tokenizer(model_path)
    canaries = make_canaries(12, 1, code_words(tokenizer))
    model = lora_model(tiny_config, model_path, torch.device("cpu")).eval()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(0)
    start = {n: 0.1 * torch.randn(p.shape, generator=generator) for n, p in lora.items()}
    end = {n: t + 0.05 * torch.randn(t.shape, generator=generator) for n, t in start.items()}
    batches = canary_batches(tiny_config, tokenizer, canaries)
    along = descent(model, batches, start, end)  # leaves the model at `start`
    exact = []
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            loss = per_example_loss(
                model(
                    input_ids=batch["input_ids"][i : i + 1],
                    attention_mask=batch["attention_mask"][i : i + 1],
                ).logits,
                batch["labels"][i : i + 1],
            )
            grads = torch.autograd.grad(loss.sum(), list(lora.values()))
            exact.append(
                -sum((g * (end[n] - start[n])).sum() for g, n in zip(grads, lora, strict=True))
            )
    assert along.tolist() == pytest.approx([float(e) for e in exact], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        AuditSettings(canaries=10, guesses=11),
        AuditSettings(canaries=1, guesses=1),
        AuditSettings(guesses=0),
        AuditSettings(confidence=1.0),
        AuditSettings(canary_lr=-1.0),
    ],
)
def test_an_audit_that_cannot_run_is_refused_before_training(tmp_path, settings):
    with pytest.raises(AuditError):
        run_audit(tiny(tmp_path), StateDir.resolve(tmp_path / "state"), settings)


SEED = 1


@pytest.mark.slow
@pytest.mark.integration
def test_with_dp_the_bound_stays_under_epsilon_and_a_planted_profile_is_flagged(tmp_path, state):
    # The shipped tiny config, DP on, the defaults: 1000 canaries, 250 one-sided guesses.
    settings = AuditSettings(seed=SEED)
    run = train_run(tiny(tmp_path), state, settings)
    shipped = score_run(run, settings)
    planted = score_run(run, dataclasses.replace(settings, plant_profile=True))
    print(
        f"\nwith DP: bound {shipped.lower_bound:.3f} ({shipped.view}), ceiling "
        f"{shipped.ceiling:.3f}, reported {shipped.reported_epsilon:.3f}; "
        + ", ".join(f"{k} {v.correct}/{v.guesses}" for k, v in shipped.views.items())
        + f"; planted: files {planted.views['files'].correct}/{planted.views['files'].guesses}"
        f", bound {planted.lower_bound:.3f}; {shipped.seconds:.0f} s"
    )
    assert shipped.lower_bound <= shipped.reported_epsilon < shipped.ceiling
    assert shipped.lower_bound == max(v.bound for v in shipped.views.values())
    # The registry's files for the version, the shipped (central-share) profile among them,
    # name no canary; the planted profile of the clients' examples names every included one.
    assert TRAINING_PROFILE_FILE in shipped.files_scored
    assert "privacy.json" in shipped.files_scored and "data_uses.json" in shipped.files_scored
    assert set(shipped.files_matched.values()) == {0}
    assert shipped.views["files"].bound == 0.0
    assert planted.files_matched[PLANTED_PROFILE] == planted.included
    assert planted.views["files"].correct == planted.guesses
    assert planted.lower_bound == planted.views["files"].bound == planted.ceiling
    assert planted.view == "files" and planted.planted_profile
    for view in ("final", "rounds"):  # the same run: only the files differ
        assert planted.views[view] == shipped.views[view]
    report = write_report(state, planted)
    assert report.name.startswith("audit-planted-")  # never taken for an audit of the config
    assert not list(state.reports.glob("audit-tiny-federated-audit-*.json"))


@pytest.mark.slow
@pytest.mark.integration
def test_the_cli_writes_the_report_and_warns_when_the_ceiling_is_below_epsilon(
    tmp_path, state, capsys
):
    config = write_config(tmp_path)  # the shipped tiny config, DP on
    args = ["--config", str(config), "--state-dir", str(state.root), "--seed", str(SEED)]
    assert main([*args, "--canaries", "40", "--guesses", "4"]) == 0
    [path] = state.reports.glob("audit-tiny-federated-audit-*.json")  # the certificate's search
    report = json.loads(path.read_text())
    assert set(report["views"]) == set(VIEWS)
    assert report["lower_bound"] == max(v["bound"] for v in report["views"].values())
    assert report["ceiling"] == pytest.approx(
        ceiling(40, 4, report["delta"], view_confidence(0.95, 3))
    )
    assert report["ceiling"] < report["reported_epsilon"]
    assert report["planted_profile"] is False and TRAINING_PROFILE_FILE in report["files_scored"]
    for key in ("mode", "date", "canaries", "guesses", "confidence", "reported_epsilon"):
        assert report[key] is not None
    err = capsys.readouterr().err
    assert "cannot see an under-report" in err


# The tiny random model's logits span ~2.5 nats (unit RMSNorm, small tied embeddings): LoRA on
# attention/MLP cannot memorise single tokens (the shipped tiny config's run without DP gives
# every view a bound of 0), so this setting adds LoRA on lm_head (per token rows of B), trains
# 24 local steps at learning rate 0.05 and lifts max_update_norm for it.
CANARY_SETTING = {
    "data": {"central_fraction": 0.8},  # small clients: the canaries are most of their data
    "lora": {"target_modules": ["q_proj", "v_proj", "lm_head"]},
    "federation": {"rounds": 1, "local_steps": 24, "batch_size": 8, "max_update_norm": 1e4},
}


@pytest.mark.slow
@pytest.mark.integration
def test_without_dp_the_audit_sees_the_leak_that_dp_hides(tmp_path, state):
    # 300 canaries and 75 guesses (not the defaults): two trainings of the suite's minutes.
    settings = AuditSettings(canaries=300, guesses=75, canary_lr=0.05, seed=SEED)
    dp = {"mode": "local_dp", "noise_multiplier": 1.5}
    with_dp = run_audit(tiny(tmp_path, **CANARY_SETTING, privacy=dp), state, settings)
    no_dp = {"mode": "none", "noise_multiplier": None}
    without = run_audit(tiny(tmp_path, **CANARY_SETTING, privacy=no_dp), state, settings)
    for name, result in (("with DP", with_dp), ("without DP", without)):
        print(
            f"\n{name}: bound {result.lower_bound:.3f} ({result.view}), reported "
            f"{result.reported_epsilon}, "
            + ", ".join(f"{k} {v.correct}/{v.guesses}" for k, v in result.views.items())
            + f", {result.seconds:.0f} s"
        )
    assert with_dp.inclusion == without.inclusion  # the same canaries, the same coin flips
    assert with_dp.lower_bound <= with_dp.reported_epsilon < with_dp.ceiling
    assert without.reported_epsilon is None
    assert without.lower_bound >= with_dp.lower_bound + 1.0
    assert without.lower_bound > with_dp.reported_epsilon  # this leak would refute the DP claim
