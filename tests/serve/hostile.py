"""Hypothesis strategies for hostile request bodies on /v1/chat/completions and /v1/completions.

A body starts as a valid request (small max_tokens, so an admitted one costs the engine little)
and is then bent: fields replaced by arbitrary JSON, unknown, vLLM-only and removed fields added,
messages and prompts of every wrong shape, out-of-range numbers, deep nesting, raw bytes that are
not JSON. Shared by tests/serve/test_hostile_bodies.py (fake engine), tests/serve/test_endpoint.py
(the real app) and scripts/fuzz_serve.py (the long run).
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

# Allow-listed names, vLLM extras, removed ones and plain unknowns: all must be answered < 500.
FIELD_NAMES = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "best_of",
    "logprobs", "top_logprobs", "temperature", "top_p", "stop", "seed", "stream",
    "stream_options", "logit_bias", "presence_penalty", "frequency_penalty", "response_format",
    "user", "echo", "suffix", "tools", "tool_choice", "guided_json", "guided_regex",
    "guided_choice", "structured_outputs", "ignore_eos", "min_tokens", "top_k",
    "chat_template", "chat_template_kwargs", "prompt_logprobs", "allowed_token_ids",
    "truncate_prompt_tokens", "kv_transfer_params", "vllm_xargs", "priority", "request_id",
    "prompt_embeds", "bad_words", "cache_salt", "mm_processor_kwargs",
]  # fmt: skip
ROLES = ["system", "developer", "user", "assistant", "tool", "function", "", "root"]

numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 10),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(-3, 3),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=40))
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
texts = st.text(max_size=200) | st.sampled_from(["hi", "Route this ticket", "\x00\ud7ff", "{{x}}"])
content = st.one_of(
    texts,
    st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}),
        max_size=3,
    ),
    json_values,
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": content}),
        st.dictionaries(
            st.sampled_from(["role", "content", "name", "tool_calls"]), json_values, max_size=4
        ),
        json_values,
    ),
    max_size=4,
)
prompts = st.one_of(
    texts,
    st.lists(texts, max_size=4),
    st.lists(st.integers(-5, 2**40), max_size=8),
    st.lists(st.lists(st.integers(-5, 60_000), max_size=4), max_size=3),
    json_values,
)


def _bent(valid: dict):
    overlay = st.dictionaries(
        st.sampled_from(FIELD_NAMES) | st.text(max_size=12), json_values | numbers, max_size=3
    )
    dropped = st.sets(st.sampled_from(sorted(valid)), max_size=2)
    return st.tuples(overlay, dropped).map(
        lambda od: {k: v for k, v in {**valid, **od[0]}.items() if k not in od[1]}
    )


def _valid(model: str, kind: str):
    common = {
        "model": st.just(model),
        "max_tokens": st.integers(1, 4),
        "temperature": st.floats(0, 2),
        "n": st.integers(1, 2),
        "stream": st.booleans(),
    }
    if kind == "chat":
        first = st.fixed_dictionaries({"role": st.just("user"), "content": texts.filter(bool)})
        return st.fixed_dictionaries(
            {**common, "messages": st.lists(first, min_size=1, max_size=2)}
        )
    return st.fixed_dictionaries({**common, "prompt": texts.filter(bool)})


def bodies(model: str, kind: str) -> st.SearchStrategy[bytes]:
    """Raw request bodies for `kind` ("chat" or "completion"), most of them hostile."""
    valid = _valid(model, kind)
    shaped = valid.flatmap(
        lambda body: st.one_of(
            st.just(body),
            _bent(body),
            st.just(body).map(lambda b: {**b, "messages": None})
            if kind == "chat"
            else st.just(body),
        )
    )
    wrong_shapes = (
        valid.flatmap(lambda b: messages.map(lambda m: {**b, "messages": m}))
        if kind == "chat"
        else valid.flatmap(lambda b: prompts.map(lambda p: {**b, "prompt": p}))
    )
    as_json = st.one_of(shaped, wrong_shapes, json_values).map(lambda b: json.dumps(b).encode())
    deep = st.integers(10, 5000).map(lambda d: b'{"messages": ' + b"[" * d + b"]" * d + b"}")
    raw = st.binary(max_size=64) | st.sampled_from([b"", b"{", b"null", b'{"n": NaN}', b"\xff"])
    return st.one_of(as_json, as_json, as_json, deep, raw)
