"""An async client for OpenAI-compatible judge servers (`vllm serve` first), built on the `openai` package.

What it adds to the plain client: round-robin over several servers (a retry moves on to the next one),
one concurrency limit for everything in flight on an event loop, exponential backoff, a start-up health
check whose error names the URL, and a disk cache of replies so re-scoring the same edit costs nothing.
It never raises for a failed request: the reply carries the error, and the judge turns it into
`valid=False` for that sample.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import ssl
import tempfile
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import Field, field_validator

from editrl.base import ServiceUnavailable, StrictModel

log = logging.getLogger("editrl.rewards.vlm_judge")

Messages = list[dict[str, Any]]


class JudgeUnavailable(ServiceUnavailable):
    """The recipe's judge server cannot be used (unreachable, wrong key, model not served); names the URL.

    An outage, not a recipe mistake: the CLI reports it as one line, and the fix is the server or `base_urls`.
    """


class ClientOptions(StrictModel):
    """Connection options shared by every judge (the `options` of a judge reward in a recipe)."""

    model: str
    base_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000/v1"], min_length=1)
    api_key_env: str | None = None  # the *name* of an environment variable holding the key
    max_concurrency: int = Field(16, ge=1)
    timeout: float = Field(60.0, gt=0)  # seconds per request
    retries: int = Field(3, ge=0)  # extra attempts after the first
    backoff: float = Field(0.5, ge=0)  # seconds before the first retry, doubled for each next one
    health_check: bool = True
    cache_dir: str | None = "~/.cache/editrl/judge"  # None turns the reply cache off

    @field_validator("base_urls")
    @classmethod
    def _strip(cls, urls: list[str]) -> list[str]:
        return [u.rstrip("/") for u in urls]


@dataclass
class Reply:
    """What the server said, or why it said nothing. `positions`: (token, top log-probs) per generated token."""

    content: str | None = None
    positions: list[tuple[str, list[tuple[str, float]]]] | None = None
    error: str | None = None
    url: str | None = None
    attempts: int = 0
    cached: bool = False


@dataclass
class Request:
    """One judge call. `messages` is built only on a cache miss (encoding frames is the costly part)."""

    key: str  # hash of the media and prompt; the client adds model and sampling parameters
    messages: Callable[[], Messages]
    params: dict[str, Any] = field(default_factory=dict)  # the rest of the JSON body (max_tokens, ...)


class ReplyCache:
    """One JSON file per reply, written atomically, sharded by the first two hex digits of the key."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Reply | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring unreadable judge cache entry %s", path)
            return None
        positions = [(tok, [tuple(p) for p in top]) for tok, top in data.get("positions") or []] or None
        return Reply(content=data.get("content"), positions=positions, url=data.get("url"), cached=True)

    def put(self, key: str, reply: Reply) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(reply).items() if k in ("content", "positions", "url")}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump(data, f)
        os.replace(f.name, path)


def _reply_from(completion: Any, url: str, attempts: int) -> Reply:
    if isinstance(completion, str):  # the SDK hands back the text of a reply that is not JSON
        return Reply(error=f"reply from {url} is not JSON: {completion[:80]!r}", url=url, attempts=attempts)
    choices = getattr(completion, "choices", None) or []
    if not choices:
        return Reply(error=f"reply from {url} has no choices", url=url, attempts=attempts)
    choice = choices[0]
    content = getattr(choice.message, "content", None) if getattr(choice, "message", None) else None
    logprobs = getattr(choice, "logprobs", None)
    positions = None
    try:
        if logprobs is not None and getattr(logprobs, "content", None):
            positions = [
                (str(p.token), [(str(t.token), float(t.logprob)) for t in (p.top_logprobs or [])]) for p in logprobs.content
            ]
    except (AttributeError, TypeError, ValueError) as e:
        return Reply(error=f"reply from {url} has malformed log-probabilities ({e})", url=url, attempts=attempts)
    if content is not None and not isinstance(content, str):
        return Reply(error=f"reply from {url} has a {type(content).__name__} as its text", url=url, attempts=attempts)
    return Reply(content=content, positions=positions, url=url, attempts=attempts)


class JudgeClient:
    """Sends chat requests to `base_urls` in turn, at most `max_concurrency` at once per event loop."""

    def __init__(self, options: ClientOptions, transport: Any = None) -> None:
        """`transport` replaces the network (an httpx2 transport, openai's HTTP layer): tests replay recorded
        replies through it. The health check uses it synchronously, the requests asynchronously."""
        self.options = options
        self.api_key = self._api_key()
        self.transport = transport
        self.cache = ReplyCache(options.cache_dir) if options.cache_dir else None
        self.stats: Counter[str] = Counter()
        self._ssl = ssl.create_default_context()
        self._turn = itertools.count()
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def _api_key(self) -> str:
        name = self.options.api_key_env
        if name is None:
            return "EMPTY"  # vLLM without --api-key accepts any key; openai's client insists on one
        value = os.environ.get(name)
        if not value:
            raise JudgeUnavailable(f"judge api_key_env names ${name}, which is not set")
        return value

    def check(self) -> None:
        """Every server is up, accepts the key and serves `model`; else one error naming the URL."""
        import openai

        for url in self.options.base_urls:
            http = openai.DefaultHttpxClient(transport=self.transport) if self.transport is not None else None
            client = openai.OpenAI(
                base_url=url, api_key=self.api_key, timeout=min(self.options.timeout, 10.0), max_retries=0, http_client=http
            )
            try:
                served = [m.id for m in client.models.list() if isinstance(getattr(m, "id", None), str)]
            except openai.AuthenticationError:
                raise JudgeUnavailable(
                    f"judge server {url} rejected the API key (from ${self.options.api_key_env})"
                ) from None
            except openai.APIConnectionError as e:
                raise JudgeUnavailable(
                    f"judge server {url} is not reachable ({e.__cause__ or e}); start it, e.g. "
                    f"`python -m vllm.entrypoints.openai.api_server --model {self.options.model}`, or fix base_urls"
                ) from None
            except openai.APIStatusError as e:
                raise JudgeUnavailable(f"judge server {url} answered HTTP {e.status_code} to GET /models") from None
            except (openai.OpenAIError, ValueError, TypeError, AttributeError) as e:  # a reply that is not a model list
                raise JudgeUnavailable(
                    f"judge server {url} answered GET /models with something other than a list of models "
                    f"({type(e).__name__}: {' '.join(str(e).split())[:80]}): is base_urls an OpenAI-compatible server?"
                ) from None
            finally:
                client.close()
            if self.options.model not in served:
                raise JudgeUnavailable(
                    f"judge server {url} does not serve model {self.options.model!r}; it serves: {', '.join(served) or 'nothing'}"
                )

    def cache_key(self, request: Request) -> str:
        payload = json.dumps([self.options.model, request.params, request.key], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.options.max_concurrency)
        return self._semaphores[loop]

    async def complete_many(self, requests: list[Request]) -> list[Reply]:
        """All requests concurrently (bounded); replies in request order, failures as `Reply.error`."""
        import openai

        keys = [self.cache_key(r) for r in requests]
        replies: list[Reply | None] = [self.cache.get(k) if self.cache is not None else None for k in keys]
        self.stats["requests"] += len(requests)
        self.stats["cache_hits"] += sum(r is not None for r in replies)
        misses = [i for i, r in enumerate(replies) if r is None]
        if not misses:
            return replies  # type: ignore[return-value]
        clients = {
            url: openai.AsyncOpenAI(
                base_url=url,
                api_key=self.api_key,
                timeout=self.options.timeout,
                max_retries=0,  # retries are ours: they move to the next server and are counted
                # One SSL context for every batch: building one per client costs ~0.1 s of CPU.
                http_client=openai.DefaultAsyncHttpxClient(verify=self._ssl, transport=self.transport),
            )
            for url in self.options.base_urls
        }
        try:
            fresh = await asyncio.gather(*(self._complete(clients, requests[i], keys[i]) for i in misses))
        finally:
            await asyncio.gather(*(c.close() for c in clients.values()))
        for i, reply in zip(misses, fresh):
            replies[i] = reply
        return replies  # type: ignore[return-value]

    async def _complete(self, clients: dict[str, Any], request: Request, key: str) -> Reply:
        try:
            messages = request.messages()
        except Exception as e:  # a frame that cannot be encoded fails this sample only
            self.stats["failures"] += 1
            return Reply(error=f"cannot build the request: {e}")
        reply = await self._send(clients, messages, request.params)
        if reply.error is None and self.cache is not None:
            self.cache.put(key, reply)
        return reply

    async def _send(self, clients: dict[str, Any], messages: Messages, params: dict[str, Any]) -> Reply:
        import openai
        from openai.types.chat import ChatCompletion

        opts = self.options
        error, url = "", opts.base_urls[0]
        for attempt in range(opts.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(opts.backoff * 2 ** (attempt - 1))
            url = opts.base_urls[next(self._turn) % len(opts.base_urls)]
            try:
                async with self._semaphore():
                    # `post` sends the body as is: `chat.completions.create` would first walk every
                    # base64 image through the SDK's parameter transform (most of the client's CPU
                    # time), and the vLLM fields (structured_outputs, ...) are not in its signature.
                    completion = await clients[url].post(
                        "/chat/completions",
                        cast_to=ChatCompletion,
                        body={"model": opts.model, "messages": messages, **params},
                    )
                return _reply_from(completion, url, attempt + 1)
            except openai.APITimeoutError:
                error = f"timeout after {opts.timeout:g}s at {url}"
            except openai.APIConnectionError as e:
                error = f"connection error at {url}: {e.__cause__ or e}"
            except openai.APIStatusError as e:
                error = f"HTTP {e.status_code} from {url}: {_short(e)}"
                if e.status_code < 500 and e.status_code not in (408, 429):
                    break  # the request itself is wrong: the same request will fail again
            except (openai.OpenAIError, ValueError) as e:  # ValueError: a body that claims to be JSON and is not
                error = f"bad reply from {url}: {e}"
                break
        self.stats["failures"] += 1
        return Reply(error=f"{error} (after {attempt + 1} attempt{'s' if attempt else ''})", url=url, attempts=attempt + 1)


def _short(e: Any) -> str:
    """The server's own error message (vLLM: {"error": {"message": ...}} or {"message": ...})."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        msg = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if msg:
            return str(msg)[:200]
    return str(e)[:200]
