"""OpenAI's chat-completions API as data: a request body checked and turned into pixlocal's
messages and sampling settings, the answers' JSON shapes (completion, chunk, usage, error),
and stop strings. No I/O here: the server (serve_app.py) reads, loads images, and sends.

Shapes follow https://platform.openai.com/docs/api-reference/chat: an error is
`{"error": {"message", "type", "param", "code"}}`; `param` names the field as a path
(`messages[0].content[1].image_url`) so that a client can point at it."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# Request fields this server reads; any other field is ignored (as vLLM and llama.cpp do),
# except the ones in UNSUPPORTED, refused when set to something but their default.
UNSUPPORTED = {  # field -> the values that mean "not used"
    "n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,),
}
MAX_STOPS = 16
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An answer other than 200: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": " ".join(str(self).split()), "type": self.type,
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's options)."""
    max_tokens: int = 4096  # per answer
    max_images: int = 8  # per request
    max_image_bytes: int = 20 * 2**20  # encoded, per image
    max_image_pixels: int = 25_000_000  # decoded, per image
    allow_urls: bool = False  # http(s) image URLs (the server fetches them)
    url_timeout: float = 15.0  # seconds for one image download


@dataclass(frozen=True)
class ImageRef:
    """An image part to load: where it was in the request, and its URL."""
    param: str
    url: str


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]  # pixlocal's shape; image parts hold an ImageRef
    images: list[ImageRef]
    max_tokens: int | None  # None: what the context leaves, up to Limits.max_tokens
    sampling: dict[str, Any]  # temperature, top_p, top_k, seed (pixlocal.generate.stream)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_request(body: object, models: list[str], limits: Limits) -> ChatRequest:
    """A /v1/chat/completions body -> ChatRequest; ApiError 400 (or 404 for an unknown
    model) naming the field."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: a string (GET /v1/models lists them)", "model")
    if model not in models:
        raise ApiError(404, f"the model '{model}' does not exist on this server (it serves "
                       f"{', '.join(models)})", param="model", code="model_not_found")
    for key, defaults in UNSUPPORTED.items():
        if key in body and body[key] not in defaults:
            raise bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("only response_format {'type': 'text'} is supported", "response_format",
                  "unsupported_parameter")
    images: list[ImageRef] = []
    messages = _messages(body.get("messages"), images)
    if len(images) > limits.max_images:
        raise bad(f"{len(images)} images in one request; this server takes at most "
                  f"{limits.max_images}", "messages")
    for ref in images:
        _check_url(ref, limits)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _integer(body, key, 1, None)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad(f"'{key}' is {max_tokens}; this server answers with at most "
                  f"{limits.max_tokens} tokens", key)
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:  # keep only the most likely token: greedy
        temperature, top_p = 0.0, 1.0
    seed = _integer(body, "seed", None, None)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False),
                                                       bool):
        raise bad("'stream_options' must be {'include_usage': true|false}", "stream_options")
    return ChatRequest(
        model=model, messages=messages, images=images, max_tokens=max_tokens,
        sampling={"temperature": temperature, "top_p": top_p,
                  "top_k": _integer(body, "top_k", 0, None) or 0,
                  "seed": None if seed is None else seed % 2**63},
        stop=_stops(body.get("stop")), stream=stream,
        include_usage=stream and bool(options.get("include_usage")))


def _messages(raw: object, images: list[ImageRef]) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' is required: a non-empty list of {'role', 'content'} objects",
                  "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'", where)
        role = ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad(f"{where}.role {m.get('role')!r} is not supported (system, developer, "
                      "user or assistant)", f"{where}.role")
        out.append({"role": role, "content": _content(m.get("content"), where, role, images)})
    return out


def _content(content: object, where: str, role: str, images: list[ImageRef]) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad(f"{where}.content must be a string or a non-empty list of parts",
                  f"{where}.content")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{at}.text must be a string", f"{at}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{at}: images are only allowed in user messages", at)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise bad(f"{at}.image_url must be {{'url': 'data:image/...;base64,...'}}",
                          f"{at}.image_url")
            ref = ImageRef(f"{at}.image_url", url)
            images.append(ref)
            parts.append({"type": "image", "image": ref})
        else:
            found = f"type {kind!r}" if isinstance(part, dict) else f"a {type(part).__name__}"
            raise bad(f"{at}: unsupported content part ({found}); use 'text' or 'image_url'",
                      f"{at}.type")
    if role != "user":  # system and assistant messages are text: one string
        return "".join(p["text"] for p in parts)
    return parts


def _check_url(ref: ImageRef, limits: Limits) -> None:
    scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url[:12] else ""
    if scheme == "data":
        return
    if scheme in ("http", "https"):
        if not limits.allow_urls:
            raise bad(f"{ref.param}: image URLs are off on this server (it would fetch them "
                      "itself); send the image as a data: URI, or start the server with "
                      "--allow-image-urls", ref.param, "image_url_not_allowed")
        return
    raise bad(f"{ref.param}: an image must be a data: URI"
              f"{' or an http(s) URL' if limits.allow_urls else ''}, not {ref.url[:40]!r}",
              ref.param)


def _integer(body: dict[str, Any], key: str, lo: int | None, hi: int | None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(f"'{key}' must be an integer, not {v!r:.40}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"'{key}' is {v}; it must be at least {lo}" if lo is not None and v < lo
                  else f"'{key}' is {v}; it must be at most {hi}", key)
    return v


def _number(body: dict[str, Any], key: str, lo: float, hi: float, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad(f"'{key}' must be a number, not {v!r:.40}", key)
    if not lo <= v <= hi:
        raise bad(f"'{key}' is {v}; it must be between {lo:g} and {hi:g}", key)
    return float(v)


def _stops(raw: object) -> list[str]:
    stops = [raw] if isinstance(raw, str) else raw if raw is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' has {len(stops)} strings; at most {MAX_STOPS}", "stop")
    return stops


class StopText:
    """Text in, text out, up to the first stop string (which is not returned). Text that might
    begin a stop string is held back until the next piece tells."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is certainly before any stop string, whether a stop string was seen)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - hold:]
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# ---- answers ---------------------------------------------------------------------------------

def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion(cid: str, created: int, model: str, text: str, finish: str,
               use: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use}


def chunk(cid: str, created: int, model: str, delta: dict[str, Any] | None,
          finish: str | None = None, use: dict[str, Any] | None = None,
          with_usage: bool = False) -> dict[str, Any]:
    """One chat.completion.chunk; delta None: the usage chunk (no choices)."""
    d: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                         "model": model, "choices": [] if delta is None else
                         [{"index": 0, "delta": delta, "logprobs": None,
                           "finish_reason": finish}]}
    if with_usage:
        d["usage"] = use
    return d


def models_list(ids: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": i, "object": "model", "created": created,
                                        "owned_by": "pixlocal"} for i in ids]}
