"""The HTTP server: an export behind OpenAI's API, on FastAPI + uvicorn.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (when the tokenizer has a chat
template), `POST /v1/images/generations` (image families), `GET /v1/models`, `GET /healthz`
(200 once warm-up compilation is done, 503 before and while draining) and `GET /metrics`
(Prometheus). With an API key every `/v1/` route needs `Authorization: Bearer KEY` (401).

Language models run on the continuous-batching engine's thread; handlers only queue requests
and relay the engine's updates, streamed as server-sent events or gathered into one answer. A
client that goes away cancels its request and frees its slots. SIGTERM (or Ctrl-C) stops
accepting connections, lets the requests in flight finish within `grace` seconds, then exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import pathlib
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator

import fastapi
import numpy as np
import uvicorn
from absl import logging
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from genai_jax.errors import UserError
from genai_jax.serving import artifacts, protocol
from genai_jax.serving.engine import Engine, QueueFull, Request, Unavailable, Update
from genai_jax.serving.images import ImageGenerator
from genai_jax.serving.lm import LanguageModel
from genai_jax.serving.metrics import Metrics
from genai_jax.serving.protocol import APIError

IMAGE_BATCHES = (1, 2, 4, 8, 16)  # an images request of n is generated at the next size up


class Server:
    """Everything one served export needs; `app` is the ASGI application."""

    def __init__(self, directory: str | pathlib.Path, *, model_name: str | None = None,
                 api_key: str | None = None, slots: int = 16, max_queue: int = 256):
        directory = pathlib.Path(directory)
        self.manifest = artifacts.read_manifest(directory)
        self.name = model_name or directory.name
        self.api_key = api_key
        self.metrics = Metrics()
        self.family = self.manifest["family"]
        self.lm = self.engine = self.images = None
        if self.family == "transformer":
            self.lm = LanguageModel(directory, self.manifest)
            self.engine = Engine(self.lm, slots=slots, max_queue=max_queue, metrics=self.metrics)
        else:
            self.images = ImageGenerator.load(directory)
            if self.images.kind != "image":
                raise UserError(f"{directory} samples 2-D points, not images: there is nothing "
                                "to serve as PNG")
            self._image_lock = threading.Lock()
        self.ready = self.draining = False
        self.app = self._build_app()

    # ------------------------------------------------------------------ lifecycle

    def warm_up(self) -> None:
        """Compile what serving runs, then report ready."""
        start = time.perf_counter()
        if self.engine is not None:
            self.engine.warm_up()
            self.engine.start()
        else:
            self.images.warm_up(IMAGE_BATCHES)
        self.ready = True
        self.metrics.ready.set(1)
        logging.info("warm-up took %.1f s", time.perf_counter() - start)

    def run(self, host: str = "127.0.0.1", port: int = 8000, grace: float = 30.0) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0 after a clean drain)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
        # the first line on stdout says where (with --port=0, the port the system chose)
        print(f"serving {self.name} on http://{host}:{sock.getsockname()[1]}", flush=True)
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=grace,
                                lifespan="on", access_log=False)
        server = _Uvicorn(config, self)
        warm = threading.Thread(target=self._warm_up_or_exit, args=(server,), daemon=True)
        warm.start()
        server.run(sockets=[sock])
        if self.engine is not None:
            self.engine.stop(timeout=grace)
        self.metrics.close()
        failed = self.engine is not None and self.engine.error is not None
        return 1 if failed or getattr(self, "_warm_up_failed", False) else 0

    def _warm_up_or_exit(self, server) -> None:
        try:
            self.warm_up()
        except BaseException:
            logging.exception("warm-up failed")
            self._warm_up_failed = True
            server.should_exit = True

    # ------------------------------------------------------------------ the app

    def _build_app(self) -> fastapi.FastAPI:
        app = fastapi.FastAPI(title="genai_jax", docs_url=None, redoc_url=None)

        app.add_middleware(_Gate, server=self)

        @app.exception_handler(APIError)
        async def api_error(request, e: APIError):
            return _error(e)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, e: StarletteHTTPException):
            return _error(APIError(e.status_code, str(e.detail)))

        @app.exception_handler(Exception)
        async def server_error(request, e: Exception):
            logging.exception("request failed")
            return _error(APIError(500, f"internal error: {type(e).__name__}",
                                   kind="server_error"))

        @app.get("/healthz")
        async def healthz():
            if self.draining:
                return JSONResponse({"status": "draining"}, status_code=503)
            if not self.ready:
                return JSONResponse({"status": "warming up"}, status_code=503)
            if self.engine is not None and self.engine.error is not None:
                return JSONResponse({"status": "failed", "error": repr(self.engine.error)},
                                    status_code=503)
            return {"status": "ready", "model": self.name}

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.text(), media_type=self.metrics.content_type)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{
                "id": self.name, "object": "model", "owned_by": "genai_jax",
                "created": int(pathlib.Path(__file__).stat().st_mtime)}]}

        @app.post("/v1/completions")
        async def completions(request: fastapi.Request):
            body = await self._body(request, text=True)
            lm = self.lm
            parsed = protocol.parse_completion(body, self._encode, lm.known_tokens,
                                               lm.block_size)
            return await self._generate(request, parsed, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: fastapi.Request):
            body = await self._body(request, text=True)
            if not self.lm.has_chat_template:
                raise APIError(400, f"{self.name}'s tokenizer has no chat template: use "
                               "/v1/completions", param="messages")
            tokenizer = self.lm.tokenizer
            parsed = protocol.parse_chat(
                body, lambda m: tokenizer.encode(tokenizer.apply_chat_template(m, True)),
                self.lm.block_size)
            return await self._generate(request, parsed, chat=True)

        @app.post("/v1/images/generations")
        async def images(request: fastapi.Request):
            body = await self._body(request, text=False)
            return await self._images(body)

        return app

    async def _body(self, request: fastapi.Request, *, text: bool) -> dict:
        if not self.ready:
            raise APIError(503, "the model is still compiling: retry when /healthz says ready",
                           kind="server_error")
        if text != (self.lm is not None):
            raise APIError(404, f"{self.name} is a {self.family} model: it serves "
                           f"{'/v1/completions' if self.lm else '/v1/images/generations'}",
                           code="unsupported_route")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        protocol.check_model(body, self.name)
        return body

    def _encode(self, text: str) -> list[int]:
        try:
            ids = self.lm.tokenizer.encode_prompt(text)
        except UserError as e:
            raise APIError(400, f"prompt: {e}", param="prompt") from None
        return list(ids) if len(ids) else [self.lm.start_token]

    # ------------------------------------------------------------------ text

    async def _generate(self, http: fastapi.Request, parsed: protocol.Parsed, chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        requests = []
        for i, prompt in enumerate(parsed.prompts):
            def emit(update: Update, i=i):
                loop.call_soon_threadsafe(queue.put_nowait, (i, update))
            requests.append(Request(prompt=np.asarray(prompt, np.int32), settings=parsed.settings,
                                    emit=emit))
        sequences = parsed.settings.n * len(requests)
        if sequences > self.engine.max_queue:  # would never fit: no use retrying
            raise APIError(400, f"n x prompts = {sequences} sequences, more than this server "
                           f"queues ({self.engine.max_queue})", param="n")
        try:
            for r in requests:
                self.engine.submit(r)
        except (QueueFull, Unavailable) as e:
            for r in requests:
                self.engine.cancel(r)
            if isinstance(e, Unavailable):
                raise APIError(503, str(e), kind="server_error") from None
            raise APIError(429, str(e), code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        self.metrics.prompt_tokens.inc(sum(len(p) for p in parsed.prompts))
        n = parsed.settings.n
        total = n * len(parsed.prompts)
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        kind = "chat.completion" if chat else "text_completion"
        start = time.perf_counter()

        async def updates() -> AsyncIterator[tuple[int, Update]]:
            """The engine's updates by choice; those that queued up while the last one was
            being sent come merged (one event for several tokens: what keeps a busy server's
            streams from falling behind)."""
            done = 0
            while done < total:
                items = []
                if queue.empty():  # wait (wait_for only here: it costs a task per call)
                    try:
                        items.append(await asyncio.wait_for(queue.get(), timeout=1.0))
                    except TimeoutError:
                        if self.engine.error is not None:
                            raise RuntimeError("the engine stopped") from self.engine.error
                        continue
                while not queue.empty():
                    items.append(queue.get_nowait())
                merged: dict[int, Update] = {}
                for i, update in items:
                    if update.finish_reason == "error":
                        raise RuntimeError("the engine stopped")
                    done += update.finish_reason is not None
                    index = i * n + update.index
                    merged[index] = _merge(merged[index], update) if index in merged else update
                for index, update in merged.items():
                    yield index, update

        def cancel():
            for r in requests:
                self.engine.cancel(r)

        if parsed.stream:
            stream = self._stream(rid, kind, chat, parsed, requests, updates(), n)
            return StreamingResponse(_cancelling(stream, cancel, self.metrics, start),
                                     media_type="text/event-stream")
        choices = [protocol.Choice() for _ in range(total)]
        watch = asyncio.create_task(_cancel_on_disconnect(http, cancel))
        try:
            async for index, update in updates():
                choices[index].add(update)
        except BaseException:  # the client went away (cancelled) or the engine failed
            cancel()
            raise
        finally:
            watch.cancel()
        self.metrics.duration.labels(http.url.path).observe(time.perf_counter() - start)
        return self._answer(rid, kind, chat, parsed, requests, choices, n)

    def _prompt_text(self, parsed: protocol.Parsed, i: int) -> str:
        """Prompt `i` as echoed: the text sent, or its token ids decoded."""
        text = parsed.texts[i] if parsed.texts else None
        return text if text is not None else self.lm.tokenizer.decode(parsed.prompts[i])

    def _token_text(self, token: int) -> str:
        return self.lm.tokenizer.decode([token])

    def _answer(self, rid, kind, chat, parsed, requests, choices, n) -> dict:
        out = []
        for index, c in enumerate(choices):
            request = requests[index // n]
            if chat:
                out.append({"index": index, "finish_reason": c.finish_reason,
                            "message": {"role": "assistant", "content": c.text},
                            "logprobs": protocol.chat_logprobs(c.logprobs, self._token_text)
                            if parsed.settings.logprobs is not None else None})
                continue
            text, entries = c.text, c.logprobs
            if parsed.settings.echo:
                text = self._prompt_text(parsed, index // n) + text
                entries = (request.prompt_logprobs or []) + entries
            out.append({"index": index, "text": text, "finish_reason": c.finish_reason,
                        "logprobs": protocol.completion_logprobs(entries, self._token_text)
                        if parsed.settings.logprobs is not None else None})
        used = protocol.usage(parsed.prompts, sum(len(c.tokens) for c in choices))
        return protocol.envelope(kind, rid, self.name, out, usage=used)

    async def _stream(self, rid, kind, chat, parsed, requests, updates, n):
        kind += ".chunk" if chat else ""
        generated = 0

        def event(choices, **extra) -> str:
            chunk = protocol.envelope(kind, rid, self.name, choices, **extra)
            return f"data: {json.dumps(chunk)}\n\n"

        if chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}
                         for i in range(n)])
        offsets: dict[int, int] = {}  # completions: text sent per choice (logprobs' offsets)
        async for index, update in updates:
            if not chat and index not in offsets:
                offsets[index] = 0
                if parsed.settings.echo:  # the prompt first (its log-probabilities are known
                    text = self._prompt_text(parsed, index // n)  # once the engine sends)
                    entries = requests[index // n].prompt_logprobs
                    yield event([{"index": index, "text": text, "finish_reason": None,
                                  "logprobs": protocol.completion_logprobs(
                                      entries, self._token_text)
                                  if parsed.settings.logprobs is not None else None}])
                    offsets[index] = len(text)
            generated += len(update.tokens)
            logprobs = None
            if parsed.settings.logprobs is not None:
                logprobs = (protocol.chat_logprobs(update.logprobs, self._token_text) if chat
                            else protocol.completion_logprobs(update.logprobs, self._token_text,
                                                              offsets[index]))
            if not chat:
                offsets[index] += len(update.text)
            choice = {"index": index, "logprobs": logprobs,
                      "finish_reason": update.finish_reason}
            choice.update({"delta": {"content": update.text} if update.text else {}} if chat
                          else {"text": update.text})
            yield event([choice])
        if parsed.include_usage:
            yield event([], usage=protocol.usage(parsed.prompts, generated))
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ images

    async def _images(self, body: dict):
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, "prompt: a class label (e.g. \"3\") or a label name",
                           param="prompt")
        n = protocol.field(body, "n", int, 1, low=1, high=max(IMAGE_BATCHES))
        seed = protocol.field(body, "seed", int, None)
        fmt = body.get("response_format", "b64_json")
        if fmt != "b64_json":
            raise APIError(400, "response_format: only \"b64_json\" (no URLs are hosted)",
                           param="response_format")
        try:
            label = self.images.label_index(prompt)
        except ValueError as e:
            raise APIError(400, f"prompt: {e}", param="prompt") from None
        size = next(b for b in IMAGE_BATCHES if b >= n)
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed % 2**32

        def draw():
            with self._image_lock:
                return self.images.generate([label] * size, seed)[:n]

        start = time.perf_counter()
        images = await run_in_threadpool(draw)
        self.metrics.duration.labels("/v1/images/generations").observe(
            time.perf_counter() - start)
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(self.images.png(x)).decode()}
                         for x in images]}


class _Gate:
    """ASGI middleware: refuses `/v1/` requests while draining (503) or without the API key
    (401), and counts every answer by route and status. (Plain ASGI, not Starlette's
    BaseHTTPMiddleware, which would hide a client's disconnect from a streaming response.)"""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        self.routes = {"/healthz", "/metrics", "/v1/models", "/v1/completions",
                       "/v1/chat/completions", "/v1/images/generations"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        path, server, refusal = scope["path"], self.server, None
        if path.startswith("/v1/"):
            key = Headers(scope=scope).get("authorization")
            if server.draining:
                refusal = APIError(503, "the server is shutting down", kind="server_error")
            elif server.api_key and not hmac.compare_digest(
                    (key or "").encode(), f"Bearer {server.api_key}".encode()):
                refusal = APIError(401, "Incorrect or missing API key: send Authorization: "
                                   "Bearer KEY", code="invalid_api_key")
        try:
            if refusal is not None:
                await _error(refusal)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            route = path if path in self.routes else "other"
            server.metrics.requests.labels(route, str(status["code"])).inc()


def _merge(a: Update, b: Update) -> Update:
    return Update(a.index, a.text + b.text, a.tokens + b.tokens, a.logprobs + b.logprobs,
                  b.finish_reason or a.finish_reason)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _cancel_on_disconnect(http: fastapi.Request, cancel) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)
    cancel()


async def _cancelling(stream, cancel, metrics: Metrics, start: float):
    """`stream`, cancelling its requests when it ends early (the client went away)."""
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    finally:
        if not finished:
            cancel()
        metrics.duration.labels("stream").observe(time.perf_counter() - start)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling ours when a signal starts the drain."""

    def __init__(self, config, owner: Server):
        super().__init__(config)
        self.owner = owner

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, except that it does not raise the signal again after the drain (which
        would end the process by the signal): a drained server exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if not self.owner.draining:
            self.owner.draining = True
            print("draining: finishing the requests in flight", file=sys.stderr, flush=True)
        super().handle_exit(sig, frame)
