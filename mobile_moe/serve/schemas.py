"""The OpenAI-compatible request bodies this server accepts, and its JSON errors."""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_BODY_BYTES = 1 << 20


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Common(BaseModel):
    """Fields both endpoints take; policy/tau/criterion are this server's MoBiLE extensions."""

    model_config = ConfigDict(allow_inf_nan=False)  # JSON's NaN/Infinity literals: "should be a finite number", not a range error

    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    policy: Literal["big", "little", "mobile"] | None = None
    tau: float | None = Field(None, ge=0.0)
    criterion: Literal["max_prob", "entropy", "margin", "learned"] | None = None


class CompletionRequest(Common):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt (text or ids) or several
    max_tokens: int = Field(16, ge=0)  # 0: score the prompt only (with echo)
    echo: bool = False  # the prompt's text (and, with logprobs, its tokens' scores) before the completion
    logprobs: int | None = Field(None, ge=0, le=20)  # per token: its log-probability and this many top alternatives


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """An OpenAI-style JSON error."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def invalid_json_message(err: dict, body: object) -> str:
    """FastAPI's json_invalid error as json's own message: what is wrong, at which line, column and character."""
    loc = err.get("loc", ())
    pos = loc[-1] if loc and isinstance(loc[-1], int) else None
    what = (err.get("ctx") or {}).get("error", "JSON decode error")
    if pos is None:
        return f"request body is not valid JSON: {what}"
    doc = body.decode("utf-8", "replace") if isinstance(body, bytes) else body if isinstance(body, str) else ""
    line = doc.count("\n", 0, pos) + 1
    column = pos - doc.rfind("\n", 0, pos)  # 1-based, as json.JSONDecodeError counts
    return f"request body is not valid JSON: {what}: line {line} column {column} (char {pos})"
