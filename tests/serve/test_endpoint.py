"""The real app: Ray Serve LLM + the vLLM CPU engine on the tiny model, over real HTTP.

Started once for the module (about 30 s on 2 cores, with the local Ray head); the answers of a
random model are noise, so the tests assert on protocol behaviour a client sees, not on text, and
on log-probs to tell which LoRA adapter answered. The app reads its adapters from a fresh
registry of its own.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import ray
from hypothesis import HealthCheck, given, settings

from cluster.core.config import RegistrySettings, load_config
from cluster.core.serve_config import RequestLogSettings, ServeConfig
from cluster.records.audit_log import holder_at
from cluster.records.registry import PRODUCTION, Registry
from cluster.records.request_log import read_entries
from serve.answers.tap import DIGEST_HEADER, MODEL_HEADER
from tests.serve.fake_engine import NOT_SERVED, assert_openai_error, served_routes
from tests.serve.harness import register, serving
from tests.serve.hostile import bodies

pytestmark = [pytest.mark.slow, pytest.mark.integration]
KEY = "sk-fedforge-test"
MODEL = "fedforge-tiny-base"


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    root = tmp_path_factory.mktemp("registry")
    return Registry(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts")


@pytest.fixture(scope="module")
def request_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("request-log")


@pytest.fixture(scope="module")
def endpoint(provisioned, registry, request_log, tmp_path_factory):
    cfg = load_config("configs/serve/tiny.yaml", ServeConfig)
    cache = tmp_path_factory.mktemp("adapter-cache")
    logged = RequestLogSettings(enabled=True, dir=str(request_log), prompt_features=True)
    cfg = cfg.model_copy(
        update={
            "registry": RegistrySettings(tracking_uri=registry.tracking_uri),
            "adapters": cfg.adapters.model_copy(update={"cache_dir": str(cache)}),
            "request_log": logged,
        }
    )
    with serving(cfg, provisioned, KEY, _metrics_export_port=cfg.metrics_port) as url:
        yield url


@pytest.fixture(scope="module")
def metrics_url() -> str:
    return f"http://127.0.0.1:{load_config('configs/serve/tiny.yaml', ServeConfig).metrics_port}"


@pytest.fixture
def client(endpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=endpoint, api_key=KEY, max_retries=0, timeout=60)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_openai_client_chat_completion_and_usage(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Route this ticket"}], max_tokens=4
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 4 and reply.usage.prompt_tokens > 0


def test_openai_client_completion(client):
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert isinstance(reply.choices[0].text, str)


def test_streaming_ends_with_done(endpoint, client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
    )
    assert chunks and chunks[-1].choices[0].finish_reason == "length"
    with httpx.stream(
        "POST",
        f"{endpoint}/chat/completions",
        headers=auth(),
        timeout=60,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "stream": True,
        },
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_models_lists_the_served_model(endpoint):
    listed = httpx.get(f"{endpoint}/models", headers=auth()).json()
    assert [m["id"] for m in listed["data"]][0] == MODEL


def test_health_needs_no_key_and_names_the_deployments_only_to_a_key(endpoint):
    anonymous = httpx.get(endpoint.removesuffix("/v1") + "/health")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    keyed = httpx.get(endpoint.removesuffix("/v1") + "/health", headers=auth())
    assert keyed.status_code == 200
    assert any("EngineServer" in name for name in keyed.json()["deployments"])


def test_cpu_engine_runs_its_model_worker_inside_the_engine_core(endpoint):
    # serve.engine's "uni" executor: a separate VLLM::Worker process would cost ~7 s of every
    # start and a cross-process hand-off per decode step (about 15% of tokens/s here).
    titles = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    assert any("VLLM::EngineCore" in t for t in titles)
    assert not any("VLLM::Worker" in t for t in titles)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}])
def test_missing_or_wrong_key_gets_401_in_openai_shape(endpoint, headers):
    for method, path, body in [
        ("POST", "/chat/completions", {"model": MODEL, "messages": []}),
        ("GET", "/models", None),
    ]:
        response = httpx.request(method, endpoint + path, headers=headers, json=body)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and "API key" in error["message"]
        assert KEY not in response.text


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": 3.7},
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": [{"content": "no role"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "word " * 2000}],
            "max_tokens": 4,
        },
        {
            "model": "no-such-model",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        },
    ],
    ids=[
        "messages-not-list",
        "no-messages",
        "no-role",
        "max-tokens-0",
        "max-tokens-huge",
        "prompt-over-context",
        "unknown-model",
    ],
)
def test_bad_chat_requests_get_4xx_with_an_error_body(endpoint, body):
    response = httpx.post(f"{endpoint}/chat/completions", headers=auth(), json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert_openai_error(response, sent=str(body))
    if body["model"] != MODEL:
        assert response.status_code == 404 and MODEL in response.json()["error"]["message"]


def test_malformed_json_gets_4xx(endpoint):
    response = httpx.post(
        f"{endpoint}/chat/completions",
        headers={**auth(), "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert 400 <= response.status_code < 500


def test_every_served_route_needs_a_key_but_health_and_nothing_else_is_served(endpoint):
    root = endpoint.removesuffix("/v1")
    routes = served_routes()
    assert {path for _, path in routes} >= {"/v1/chat/completions", "/v1/completions", "/health"}
    for method, path in routes:
        response = httpx.request(
            method, root + path.replace("{model:path}", MODEL), json={}, timeout=30
        )
        if path == "/health":
            assert response.status_code == 200
        else:
            assert response.status_code == 401, (method, path, response.text)
            assert assert_openai_error(response)["code"] == "invalid_api_key"
    # An adapter id as the model made stock Ray load a registry adapter for /tokenize.
    probe = {"model": f"{MODEL}:{ADAPTER}:1", "prompt": "hi", "input": "hi", "tokens": [1, 2]}
    for method, path in NOT_SERVED:
        for headers in ({}, auth()):
            response = httpx.request(method, root + path, headers=headers, json=probe, timeout=30)
            assert response.status_code == 404, (method, path, response.text)
            assert_openai_error(response)


SAY_HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": SAY_HI, "n": 64, "max_tokens": 4}, "n"),
        ({"messages": SAY_HI, "max_tokens": 200, "n": 4}, "n"),
        ({"messages": SAY_HI}, "max_tokens"),  # the context length would count: over the cap
        ({"messages": SAY_HI, "max_tokens": 4, "guided_json": {"type": "object"}}, "guided_json"),
        ({"messages": SAY_HI, "max_tokens": 4, "ignore_eos": True}, "ignore_eos"),
        (
            {"messages": SAY_HI, "max_tokens": 4, "logprobs": True, "top_logprobs": 20},
            "top_logprobs",
        ),
    ],
    ids=["large-n", "work-cap", "no-max-tokens", "guided-json", "vllm-extra", "top-logprobs"],
)
def test_the_contract_refuses_before_the_engine(endpoint, body, param):
    body = {"model": MODEL, **body}
    started = time.monotonic()
    response = httpx.post(f"{endpoint}/chat/completions", headers=auth(), json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert assert_openai_error(response, sent=str(body))["param"] == param
    assert time.monotonic() - started < 1  # refused at the ingress, not after generating


def test_oversized_and_deep_bodies_are_refused(endpoint):
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    response = httpx.post(f"{endpoint}/chat/completions", headers=auth(), json=huge, timeout=60)
    assert response.status_code == 413
    assert assert_openai_error(response)["code"] == "request_too_large"
    deep = b'{"model": "m", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    response = httpx.post(
        f"{endpoint}/completions",
        headers={**auth(), "Content-Type": "application/json"},
        content=deep,
        timeout=60,
    )
    assert response.status_code == 400
    assert "nests deeper" in assert_openai_error(response)["message"]


FUZZ_SETTINGS = settings(
    max_examples=80,  # per route; scripts/fuzz_serve.py runs thousands
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz_one(endpoint: str, route: str, body: bytes) -> None:
    response = httpx.post(
        f"{endpoint}{route}",
        headers={**auth(), "Content-Type": "application/json"},
        content=body,
        timeout=60,
    )
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert_openai_error(response, sent=body.decode(errors="replace"))
    else:
        errors = [line for line in response.text.splitlines() if line.startswith('data: {"error"')]
        assert not errors, errors


@FUZZ_SETTINGS
@given(body=bodies(MODEL, "chat"))
def test_hostile_chat_bodies_get_no_5xx(endpoint, body):
    fuzz_one(endpoint, "/chat/completions", body)


@FUZZ_SETTINGS
@given(body=bodies(MODEL, "completion"))
def test_hostile_completion_bodies_get_no_5xx(endpoint, body):
    fuzz_one(endpoint, "/completions", body)


def test_a_normal_request_is_answered_after_the_hostile_ones(client):
    """The fuzzing above left the engine and the ingress healthy: a plain chat request gets its
    whole answer, with usage."""
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Route this ticket"}], max_tokens=4,
        temperature=0,
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4


def test_past_the_queue_bound_requests_get_503_with_retry_after(endpoint):
    import asyncio

    async def one(client: httpx.AsyncClient):
        return await client.post(
            f"{endpoint}/completions",
            headers=auth(),
            timeout=120,
            # The random tiny model almost never draws its end token: 200 tokens each.
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 200},
        )

    async def burst():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(one(client) for _ in range(12)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"


def test_prometheus_metrics_cover_requests_errors_and_engine_latency(endpoint, client, metrics_url):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    httpx.get(f"{endpoint}/models")  # a 401
    wanted = [
        "ray_serve_num_http_error_requests_total{",  # errors by status code
        'error_code="401"',
        "ray_serve_num_http_requests_total{",
        "ray_vllm_time_to_first_token_seconds_count{",
        "ray_vllm_inter_token_latency_seconds_count{",
        "ray_vllm_num_requests_waiting{",  # queue length
    ]
    deadline = time.monotonic() + 60  # metrics are pushed to the agent every few seconds
    while True:
        text = httpx.get(f"{metrics_url}/metrics", timeout=10).text
        missing = [w for w in wanted if w not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, missing


# -- LoRA adapters from the registry ----------------------------------------------------------

ADAPTER = "ticket-router"
PROMPT = "Route this ticket"


def wait_for(predicate, timeout: float = 30, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


@pytest.fixture(scope="module")
def expected_logprobs(provisioned, tiny_adapters) -> list[float]:
    """Greedy first-token log-prob of PROMPT computed with peft, for adapter v1 and v2."""
    import torch

    from llm.lora import load_adapter
    from llm.model import load_model, load_tokenizer

    ids = load_tokenizer(str(provisioned.tiny_model))(PROMPT, return_tensors="pt").input_ids
    found = []
    for adapter in tiny_adapters:
        model = load_adapter(load_model(str(provisioned.tiny_model)), adapter).eval()
        with torch.no_grad():
            found.append(torch.log_softmax(model(ids).logits[0, -1], -1).max().item())
    assert abs(found[0] - found[1]) > 0.01, found  # else the test could not tell them apart
    return found


def first_token(client: openai.OpenAI, model: str) -> tuple[float, str, str]:
    """(greedy first-token log-prob, X-Fedforge-Model header, `model` field of the answer)."""
    raw = client.completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1
    )
    reply = raw.parse()
    return reply.choices[0].logprobs.token_logprobs[0], raw.headers[MODEL_HEADER], reply.model


def listed_ids(endpoint: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{endpoint}/models", headers=auth()).json()["data"]]


def engine_replicas() -> set[str]:
    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "EngineServer" in a["name"]
    }


@pytest.fixture(scope="module")
def versions(endpoint, registry, tiny_adapters) -> list[str]:
    """v1 and v2 of ADAPTER registered while the app serves, v1 promoted to production."""
    found = [register(registry, adapter, ADAPTER) for adapter in tiny_adapters]
    registry.promote(ADAPTER, found[0])

    listed = wait_for(lambda: ADAPTER in listed_ids(endpoint))
    assert listed, "the endpoint never listed the registered adapter"
    return found


def test_production_alias_and_versions_are_served(client, versions, expected_logprobs):
    v1, v2 = versions
    assert first_token(client, MODEL)[1:] == (MODEL, MODEL)  # also warms the log-prob path up
    started = time.monotonic()
    logprob, header, model = first_token(client, f"{ADAPTER}:{v1}")
    cold = time.monotonic() - started
    assert (header, model) == (f"{ADAPTER}:{v1}", f"{ADAPTER}:{v1}")
    assert logprob == pytest.approx(expected_logprobs[0], abs=1e-3)
    started = time.monotonic()
    assert first_token(client, ADAPTER) == (logprob, f"{ADAPTER}:{v1}", f"{ADAPTER}:{v1}")
    warm = time.monotonic() - started
    print(f"[adapters] first request (cold load) {cold:.2f} s, warm request {warm:.2f} s")
    logprob2, header2, _ = first_token(client, f"{ADAPTER}:{v2}")
    assert header2 == f"{ADAPTER}:{v2}"
    assert logprob2 == pytest.approx(expected_logprobs[1], abs=1e-3)

    chunks = list(
        client.chat.completions.create(
            model=ADAPTER, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
        )
    )
    assert chunks and {c.model for c in chunks} == {f"{ADAPTER}:{v1}"}


def test_models_lists_base_alias_and_version_ids(endpoint, versions):
    listed = httpx.get(f"{endpoint}/models", headers=auth()).json()["data"]
    assert [m["id"] for m in listed] == [MODEL, ADAPTER, *(f"{ADAPTER}:{v}" for v in versions)]
    card = httpx.get(f"{endpoint}/models/{ADAPTER}", headers=auth()).json()
    assert card["metadata"]["resolves_to"] == f"{ADAPTER}:{versions[0]}"


def test_promote_and_rollback_reroute_without_restarting(
    client, registry, versions, expected_logprobs
):
    v1, v2 = versions
    replicas = engine_replicas()
    assert replicas

    def serves(version: str, expected: float) -> float:
        started = time.monotonic()
        answered = wait_for(lambda: first_token(client, ADAPTER)[1] == f"{ADAPTER}:{version}")
        assert answered, f"'{ADAPTER}' never moved to v{version}"
        switch = time.monotonic() - started
        assert first_token(client, ADAPTER)[0] == pytest.approx(expected, abs=1e-3)
        return switch

    registry.promote(ADAPTER, v2)
    promoted = serves(v2, expected_logprobs[1])
    registry.rollback(ADAPTER)
    rolled_back = serves(v1, expected_logprobs[0])
    print(f"[adapters] routing switch: promote {promoted:.2f} s, rollback {rolled_back:.2f} s")
    refresh = load_config("configs/serve/tiny.yaml", ServeConfig).adapters.refresh_seconds
    assert max(promoted, rolled_back) < refresh + 5
    assert engine_replicas() == replicas  # same replica actors: nothing restarted


def ask_continuously(client: openai.OpenAI, stop: threading.Event, answers: list) -> None:
    """Ask ADAPTER (by alias) until `stop`, alternating streamed chats and whole completions;
    keep what each answer's headers said (or the exception that ended the loop)."""
    streamed = False
    try:
        while not stop.is_set():
            streamed = not streamed
            if streamed:
                raw = client.chat.completions.with_raw_response.create(
                    model=ADAPTER,
                    messages=[{"role": "user", "content": PROMPT}],
                    max_tokens=3,
                    stream=True,
                )
                assert list(raw.parse())
            else:
                raw = client.completions.with_raw_response.create(
                    model=ADAPTER, prompt=PROMPT, max_tokens=3
                )
            headers = raw.headers
            answers.append((headers["x-request-id"], headers[MODEL_HEADER], headers[DIGEST_HEADER]))
    except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
        answers.append(exc)


def test_every_logged_answer_matches_the_alias_history_while_production_moves(
    client, registry, versions, request_log
):
    """Promote and roll back under a stream of requests: every answer is in the request log
    with the version and adapter digest its headers named, and that version held `production`
    (by the audit log) at some moment between the ingress' last registry read and the answer."""
    v1, v2 = versions
    digests = {v: registry.get(ADAPTER, v).adapter_sha256 for v in versions}
    refresh = load_config("configs/serve/tiny.yaml", ServeConfig).adapters.refresh_seconds
    stop, answers = threading.Event(), []
    callers = [
        threading.Thread(target=ask_continuously, args=(client, stop, answers)) for _ in range(2)
    ]
    for caller in callers:
        caller.start()
    try:
        for move in ("promote", "rollback", "promote", "rollback"):
            time.sleep(2 * refresh + 1)
            if move == "promote":
                registry.promote(ADAPTER, v2, reason="under-traffic test")
            else:
                registry.rollback(ADAPTER, reason="under-traffic test")
        time.sleep(2 * refresh + 1)
    finally:
        stop.set()
        for caller in callers:
            caller.join(timeout=60)
    time.sleep(1)  # a streamed answer is logged as its last chunk leaves the ingress

    failures = [a for a in answers if isinstance(a, Exception)]
    assert not failures, failures
    logged = {e.request_id: e for e in read_entries(request_log).entries}
    history = registry.history(ADAPTER)
    seen_versions = set()
    assert len(answers) > 20, len(answers)
    for request_id, header, digest in answers:
        entry = logged[request_id]  # every answer a caller got is in the log
        assert (
            entry.model == ADAPTER and entry.answered_by == header == f"{ADAPTER}:{entry.version}"
        )
        assert entry.adapter_sha256 == digest == digests[entry.version]
        assert entry.complete and entry.prompt_tokens and entry.completion_tokens
        assert entry.features and entry.prompt is None
        # The versions production held from one refresh (and a second of slack) before the
        # request until it was answered.
        start = entry.timestamp - timedelta(seconds=refresh + 1)
        end = entry.timestamp + timedelta(milliseconds=entry.latency_ms)
        held = {holder_at(history, PRODUCTION, start).new}
        moves = [e for e in history if e.alias == PRODUCTION]
        held |= {e.new for e in moves if start < datetime.fromisoformat(e.time) <= end}
        assert entry.version in held, (entry, held)
        seen_versions.add(entry.version)
    assert seen_versions == {v1, v2}  # the traffic spanned the moves
    print(f"[request log] {len(answers)} answers checked against {len(history)} audit entries")


def test_unknown_adapter_gets_openai_404_listing_ids(client, versions):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model=f"{ADAPTER}:999", prompt="hi", max_tokens=1)
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    for known in (MODEL, ADAPTER, *(f"{ADAPTER}:{v}" for v in versions)):
        assert known in error["message"]


def test_a_version_above_max_lora_rank_is_left_out(endpoint, registry, tiny_adapters):
    # Last in the file: the listing tests above expect only ADAPTER's versions.
    max_rank = load_config("configs/serve/tiny.yaml", ServeConfig).engine.max_lora_rank
    wide = register(registry, tiny_adapters[0], "too-wide", lora_rank=max_rank * 2)
    narrow = register(registry, tiny_adapters[0], "too-wide")  # registered after `wide`:
    assert wait_for(lambda: f"too-wide:{narrow}" in listed_ids(endpoint))  # both were read
    assert f"too-wide:{wide}" not in listed_ids(endpoint)
    response = httpx.post(
        f"{endpoint}/completions",
        headers=auth(),
        timeout=60,
        json={"model": f"too-wide:{wide}", "prompt": "hi", "max_tokens": 1},
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
