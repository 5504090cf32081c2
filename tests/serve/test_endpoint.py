"""The real app: Ray Serve LLM + the vLLM CPU engine on the tiny model, over real HTTP.

Started once for the module (about 45-60 s on 2 cores); the answers of a random model are noise,
so the tests assert on protocol behaviour a client sees, not on text.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import ray
from ray import serve

from cluster.config import load_config
from serve.config import ServeConfig
from serve.deploy import deploy

pytestmark = [pytest.mark.slow, pytest.mark.integration]
KEY = "sk-fedforge-test"
MODEL = "fedforge-tiny"


@pytest.fixture(scope="module")
def endpoint(provisioned, tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("FEDFORGE_API_KEYS", KEY)
    cfg = load_config("configs/serve/tiny.yaml", ServeConfig)
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=cfg.metrics_port
    )
    try:
        yield deploy(cfg, provisioned)
    finally:
        serve.shutdown()
        ray.shutdown()
        monkeypatch.undo()


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
    assert [m["id"] for m in listed["data"]] == [MODEL]


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
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]},
        {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
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
    assert response.json()["error"]["message"]
    if body["model"] != MODEL:
        assert response.status_code == 404 and MODEL in response.json()["error"]["message"]


def test_malformed_json_gets_4xx(endpoint):
    response = httpx.post(
        f"{endpoint}/chat/completions",
        headers={**auth(), "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert 400 <= response.status_code < 500


def test_past_the_queue_bound_requests_get_503_with_retry_after(endpoint):
    import asyncio

    async def one(client: httpx.AsyncClient):
        return await client.post(
            f"{endpoint}/completions",
            headers=auth(),
            timeout=120,
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True},
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
