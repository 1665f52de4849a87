"""The OpenAI-compatible request bodies this server accepts, and its JSON errors.

Every field is either honoured or refused: an unknown field is a 400 naming it (`extra="forbid"`), and numbers and
booleans are strict (`true` is not 1, "16" is not 16)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_BODY_BYTES = 1 << 20
ECHO_CHARS = 64  # a name from the request is echoed in an error up to this many characters


def bounded(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` cut to `limit` characters with an ellipsis: what an error echoes of a client's string."""
    return text if len(text) <= limit else text[:limit] + "..."


def _refuse(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


class Strict(BaseModel):
    """A request object: unknown fields refused, NaN and Infinity refused."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")


class Message(Strict):
    """A chat message; `developer` is taken as `system`; content is a string or a list of text parts (joined by newlines, as vLLM does)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def text_parts(cls, value: Any) -> Any:
        """[{"type": "text", "text": ...}, ...] -> their texts joined by newlines; any other part type is refused."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                what = f"{bounded(kind)!r} parts are" if isinstance(kind, str) else "a part without a string `type` is"
                raise _refuse("unsupported_part", f"{what} not supported (text only)")
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise _refuse("bad_text_part", 'a text part is {"type": "text", "text": STRING}')
            texts.append(part["text"])
        return "\n".join(texts)

    def for_template(self) -> dict[str, str]:
        """The message as the chat template takes it."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(Strict):
    include_usage: StrictBool = False  # a last chunk with the request's usage and no choices


class JsonSchema(Strict):
    """response_format.json_schema; `strict` is accepted either way: the schema is always enforced."""

    name: str | None = None
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def schema_given(self) -> ResponseFormat:
        """json_schema comes with type json_schema, and only with it."""
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise _refuse("json_schema", "json_schema is given with type json_schema, and only with it")
        return self

    def wanted(self) -> dict | None:
        """The JSON schema replies must match (json_object: any object), None for text."""
        if self.type == "json_object":
            return {"type": "object"}
        return None if self.json_schema is None else self.json_schema.schema_


class Common(Strict):
    """Fields both endpoints take; policy/tau/criterion are this server's MoBiLE extensions."""

    model: str | None = None
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: StrictInt = Field(1, ge=1, le=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # only empty: a bias is refused (see `refused`)
    response_format: ResponseFormat | None = None
    user: str | None = None  # an end user's id: accepted, and like OpenAI's it changes nothing in the reply
    policy: Literal["big", "little", "mobile", "exact"] | None = None
    tau: StrictFloat | None = Field(None, ge=0.0)
    criterion: Literal["max_prob", "entropy", "margin", "learned"] | None = None

    @field_validator("stop")
    @classmethod
    def nonempty_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        """An empty stop string would end every reply before its first character: refused."""
        if value == "" or (isinstance(value, list) and "" in value):
            raise _refuse("empty_stop", "an empty stop string would stop every reply before it starts")
        return value

    @field_validator("logit_bias")
    @classmethod
    def no_bias(cls, value: dict | None) -> dict | None:
        """logit_bias is not applied; only an empty one is accepted."""
        if value:
            raise _refuse("unsupported", "not supported by this server (only an empty object is accepted)")
        return value

    def stops(self) -> list[str]:
        """The stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Common):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt (text or ids) or several
    max_tokens: StrictInt = Field(16, ge=0)  # 0: score the prompt only (with echo); 16 without it, as OpenAI's legacy endpoint
    echo: StrictBool = False  # the prompt's text (and, with logprobs, its tokens' scores) before the completion
    logprobs: StrictInt | None = Field(None, ge=0, le=20)  # per token: its log-probability and this many top alternatives
    best_of: StrictInt | None = Field(None, ge=1, le=1)  # equal to n (1): one candidate, the one returned
    suffix: str | None = None  # refused unless null: the model does not insert text

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, value: str | None) -> str | None:
        """Insertion (text after the completion) is not supported."""
        if value is not None:
            raise _refuse("unsupported", "not supported by this server (no insertion: send the text before the gap as the prompt)")
        return value


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)  # None: up to the context, within --max-tokens-cap (as vLLM and llama-server)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: StrictBool = False  # each generated token's log-probability (choices[].logprobs.content)
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)  # with logprobs: this many most probable alternatives per token


def error(status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style JSON error."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


def validation_message(err: dict) -> str:
    """One of pydantic's errors as `field: what is wrong` (an unknown field: named as not supported)."""
    where = bounded(".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body")
    if err.get("type") == "extra_forbidden":
        return f"{where}: not supported by this server"
    return f"{where}: {err.get('msg', 'invalid request')}"


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
