"""Answers name the model id that answered, as clients know it.

For an adapter the engine answers with its internal id (`<base>:<name>:<version>`); clients know
`<name>` and `<name>:<version>`. Like OpenAI's aliases (ask `gpt-4o`, get `gpt-4o-2024-08-06`),
the `model` field of a successful answer becomes the version that answered, `<name>:<version>`,
and the `X-Fedforge-Model` header carries the same id, streaming or not; `X-Fedforge-Adapter-Sha256`
the digest of that version's adapter files as registered (what the engine loaded: the registry
checks it on every download).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Response
from fastapi.responses import JSONResponse, StreamingResponse

MODEL_HEADER = "X-Fedforge-Model"
DIGEST_HEADER = "X-Fedforge-Adapter-Sha256"


async def _replaced(chunks: AsyncIterator[str | bytes], old: str, new: str):
    # vLLM serializes stream chunks with pydantic's compact JSON: `"model":"<id>"` verbatim.
    old_field, new_field = f'"model":"{old}"', f'"model":"{new}"'
    async for chunk in chunks:
        if isinstance(chunk, bytes):
            yield chunk.replace(old_field.encode(), new_field.encode())
        else:
            yield chunk.replace(old_field, new_field)


def relabel(
    response: Response, engine_id: str, answering_id: str, adapter_sha256: str = ""
) -> Response:
    """`response` with `model` and the headers set to what answered; errors pass unchanged."""
    if response.status_code != 200:
        return response
    if isinstance(response, StreamingResponse):
        if engine_id != answering_id:
            response.body_iterator = _replaced(response.body_iterator, engine_id, answering_id)
    elif isinstance(response, JSONResponse) and engine_id != answering_id:
        content = json.loads(response.body)
        if content.get("model") == engine_id:
            content["model"] = answering_id
        response = JSONResponse(content, status_code=response.status_code)
    response.headers[MODEL_HEADER] = answering_id
    if adapter_sha256:
        response.headers[DIGEST_HEADER] = adapter_sha256
    return response
