"""Drift detection on synthetic traffic: its false-positive rate, its power, its report.

Prompts come from seeded generators in the demo task's style (llm/demo_task/tickets.jsonl):
support tickets built from greetings, issues, contexts and closings. Features are computed once
per pool; each trial draws its reference and window from the pools with its own seed.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from cluster.commands.drift_stats import (
    SKETCH,
    DriftResult,
    FeatureTest,
    _gaussian_kernel,
    _mmd2,
    compare,
    plot,
)
from cluster.records.prompt_features import SCALAR_FEATURES, PromptFeatures, prompt_features

GREETINGS = ("", "Hello, ", "Hi team, ", "Dear support, ", "Good morning. ", "Hey there, ")
GREETINGS += ("Urgent: ", "Quick question: ")
CLOSINGS = ("", " Please help.", " Thanks in advance.", " What should I do?")
CLOSINGS += (" Can you fix this today?", " This is really frustrating.")
CONTEXTS = ("", " with my Nimbus order", " for order {n}", " on the Orbit plan", " since {day}")
DAYS = ("Monday", "Tuesday", "Friday", "last week", "yesterday")
TICKET_ISSUES = (
    "I want to delete my account",
    "I was charged twice for my subscription",
    "I received the wrong item in the box",
    "can I change the delivery date of my order",
    "I want to change my billing address on the invoice",
    "the app crashes when I open settings",
    "I cannot connect the device to wifi",
    "please send me a receipt for my payment",
    "the update failed halfway through installation",
    "I cannot log in with my username",
    "I need a refund for last month's payment",
    "the search results are empty even for exact names",
    "someone else logged into my account",
    "the tracking number does not work",
    "I need to change the email address on my profile",
    "the package arrived damaged",
    "delivery is a week late",
    "my invoice shows the wrong amount",
    "my profile name shows someone else's name",
    "two-factor codes never arrive by text",
    "notifications stopped after the last update",
    "half of my order is missing",
    "how do I reset my password",
    "the discount code was not applied at checkout",
)
# A topic the training prompts never mention: developers asking about an API, often with code.
API_ISSUES = (
    "the webhook endpoint returns HTTP 500 when the payload has nested arrays",
    "our API token expires after {n} seconds instead of one hour",
    "the Python SDK raises KeyError: 'cursor' on the second page of results",
    "rate limiting kicks in at {n} requests per minute although our tier allows more",
    "the GraphQL schema changed and the field `createdAt` is now null",
    "batch uploads over {n} MB time out with a 504 from the gateway",
    "OAuth redirect fails with invalid_grant after the consent screen",
    "pagination skips records when we sort by updated_at descending",
)
SNIPPETS = (
    "\n```python\nresp = client.orders.list(limit={n}, cursor=page['next'])\n"
    "for row in resp['data']:\n    sync(row['id'])\n```",
    '\n```bash\ncurl -X POST https://api.example.com/v2/hooks -H "Authorization: Bearer $TOKEN" '
    "-d '{{\"retries\": {n}}}'\n```",
    '\n```json\n{{"error": {{"code": {n}, "message": "upstream timeout"}}}}\n```',
)
PREFIX = "Route this support ticket: "


def ticket(rng: random.Random) -> str:
    """A prompt from the training distribution."""
    return _compose(rng, rng.choice(TICKET_ISSUES))


def api_question(rng: random.Random) -> str:
    """A prompt from the shifted distribution: a new topic, longer, often with code."""
    text = _compose(rng, rng.choice(API_ISSUES))
    if rng.random() < 0.7:
        text += rng.choice(SNIPPETS).format(n=rng.randint(2, 5000))
    return text


def _compose(rng: random.Random, issue: str) -> str:
    context = rng.choice(CONTEXTS).format(n=rng.randint(1000, 99999), day=rng.choice(DAYS))
    greeting = rng.choice(GREETINGS)
    body = issue.format(n=rng.randint(2, 5000)) + context
    if greeting.endswith(". ") or not greeting:
        body = body[0].upper() + body[1:]
    return f"{PREFIX}{greeting}{body}.{rng.choice(CLOSINGS)}"


def rotate_letters(text: str) -> str:
    """Every letter moved 13 places, case kept: other words of exactly the same shape, so every
    scalar feature is unchanged and only what the words are (the sketch) differs."""
    return text.translate(ROT13)


ROT13 = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "nopqrstuvwxyzabcdefghijklmNOPQRSTUVWXYZABCDEFGHIJKLM",
)


def _pool(make, size: int, seed: int) -> list[PromptFeatures]:
    rng = random.Random(seed)
    return [prompt_features(make(rng)) for _ in range(size)]


@pytest.fixture(scope="module")
def tickets() -> list[PromptFeatures]:
    return _pool(ticket, 3000, seed=1)


@pytest.fixture(scope="module")
def api_questions() -> list[PromptFeatures]:
    return _pool(api_question, 1000, seed=2)


def _draw(pool: list[PromptFeatures], sizes: tuple[int, ...], rng: np.random.Generator):
    """Disjoint samples without replacement: exchangeable, so the null holds exactly."""
    chosen = rng.choice(len(pool), sum(sizes), replace=False)
    bounds = np.cumsum((0, *sizes))
    return [[pool[i] for i in chosen[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _mixed_window(tickets, api_questions, share: float, size: int, rng: np.random.Generator):
    new = round(share * size)
    (old_part,) = _draw(tickets, (size - new,), rng)
    (new_part,) = _draw(api_questions, (new,), rng)
    return old_part, new_part


TRIALS = 100
ALPHA = 0.05


def test_unchanged_traffic_raises_at_most_an_alpha_share_of_false_alarms(tickets):
    """100 independent windows from the training distribution. Each report says "drift" with
    probability at most alpha = 0.05, so false alarms are at most Binomial(100, 0.05): mean 5,
    P(> 10) ~= 1.1%. The trials are seeded, so this is a fixed check, not a flaky one; it would
    fail for a detector whose real rate were ~0.1 or more (P(<= 10 | 0.1) ~= 0.58, and falling
    fast above)."""
    false_alarms = 0
    for trial in range(TRIALS):
        rng = np.random.default_rng(1000 + trial)
        reference, window = _draw(tickets, (300, 200), rng)
        false_alarms += compare(reference, window, ALPHA, permutations=200, seed=trial).drift
    assert false_alarms <= 10


def test_a_new_topic_is_detected(tickets, api_questions):
    detected = 0
    for trial in range(TRIALS):
        rng = np.random.default_rng(2000 + trial)
        (reference,) = _draw(tickets, (300,), rng)
        (window,) = _draw(api_questions, (200,), rng)
        detected += compare(reference, window, ALPHA, permutations=200, seed=trial).drift
    assert detected >= 95


def test_half_the_traffic_on_a_new_topic_is_detected(tickets, api_questions):
    detected = 0
    for trial in range(20):
        rng = np.random.default_rng(3000 + trial)
        (reference,) = _draw(tickets, (300,), rng)
        old, new = _mixed_window(tickets, api_questions, 0.5, 200, rng)
        result = compare(reference, old + new, ALPHA, permutations=200, seed=trial)
        detected += SKETCH in result.drifted and result.drift
    assert detected == 20


def test_the_sketch_alone_sees_a_topic_shift_with_the_same_shape():
    rng = random.Random(4)
    reference = [prompt_features(ticket(rng)) for _ in range(300)]
    texts = [ticket(rng) for _ in range(200)]
    shifted = [rotate_letters(t) if i % 2 else t for i, t in enumerate(texts)]
    window = [prompt_features(t) for t in shifted]
    assert [f.scalars for f in window[1::2]] == [prompt_features(t).scalars for t in texts[1::2]]
    assert compare(reference, window, ALPHA, permutations=200).drifted == (SKETCH,)


def test_a_fixed_seed_gives_the_same_report(tickets):
    reference, window = _draw(tickets, (300, 200), np.random.default_rng(5))
    first = compare(reference, window)
    assert first == compare(reference, window)
    assert json.loads(json.dumps(first.to_json())) == first.to_json()


def test_large_sides_are_subsampled_for_the_kernel_but_counted_in_full(tickets):
    reference, window = _draw(tickets, (1600, 1200), np.random.default_rng(6))
    result = compare(reference, window)
    assert (result.reference_n, result.window_n) == (1600, 1200)
    assert [t.name for t in result.tests] == [*SCALAR_FEATURES, SKETCH]
    assert result.threshold == pytest.approx(0.01 / 9)


def test_unbiased_mmd_matches_its_definition():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(6, 4)), rng.normal(1.0, size=(5, 4))
    kernel = _gaussian_kernel(np.concatenate([x, y]))
    kxx, kyy, kxy = kernel[:6, :6], kernel[6:, 6:], kernel[:6, 6:]
    expected = (kxx.sum() - 6) / 30 + (kyy.sum() - 5) / 20 - 2 * kxy.mean()  # diagonals are 1
    assert _mmd2(kernel, np.arange(6)[None, :])[0] == pytest.approx(expected)


@pytest.mark.parametrize("sizes", [(1, 5), (5, 1), (0, 5)])
def test_tiny_inputs_are_refused(tickets, sizes):
    reference, window = tickets[: sizes[0]], tickets[100 : 100 + sizes[1]]
    with pytest.raises(ValueError, match="at least 2"):
        compare(reference, window)


def test_too_few_permutations_for_the_threshold_are_refused(tickets):
    with pytest.raises(ValueError, match="use at least 900"):
        compare(tickets[:10], tickets[10:20], alpha=0.01, permutations=500)


def test_the_verdict_names_drifted_features():
    tests = tuple(_test(name, 0.5) for name in SCALAR_FEATURES[:-1]) + (
        _test(SCALAR_FEATURES[-1], 1e-6),
        _test(SKETCH, 1e-4),
    )
    result = DriftResult(tests, 0.01, 0.01 / 9, 300, 200)
    assert result.drifted == (SCALAR_FEATURES[-1], SKETCH)
    assert result.summary() == (
        "drift: non_ascii_fraction, sketch "
        "(p < 0.00111 after Bonferroni over 9 tests at alpha 0.01)"
    )
    calm = DriftResult(tests[:-2], 0.01, 0.01 / 7, 300, 200)
    assert not calm.drift
    assert calm.summary().startswith("no drift (every p >= 0.00143")


def _test(name: str, p_value: float) -> FeatureTest:
    return FeatureTest(name, 0.1, p_value, None, None, None)


def test_plot_writes_a_png(tmp_path, tickets, api_questions):
    reference, window = tickets[:300], tickets[300:400] + api_questions[:100]
    result = compare(reference, window, ALPHA, permutations=200)
    path = plot(result, reference, window, tmp_path / "drift" / "report.png", "adapter v3")
    assert path == tmp_path / "drift" / "report.png"
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in path.parent.iterdir()] == ["report.png"]  # no temp file left
