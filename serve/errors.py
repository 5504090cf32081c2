"""The one error shape of the endpoint: OpenAI's `{"error": {message, type, param, code}}`.

Every refusal the ingress makes (401, 404, 400, 429, 503) is built here, so clients written for
OpenAI's API read fedforge's errors the same way.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)
