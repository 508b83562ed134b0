"""``attnlab serve``: trained models behind an HTTP API, with micro-batching, and a page to see attention.

    attnlab serve --checkpoint runs/de-en --checkpoint shakespeare=runs/shakespeare

An ASGI app (FastAPI) run by uvicorn. Endpoints (JSON in, JSON out):

    POST /v1/translate  {"model"?, "text": [...], "beam": 4, "alpha": 0.6, "n_best": 1, "attention": false}
    POST /v1/generate   {"model"?, "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}
    GET  /v1/models     names, kinds, sizes, vocabularies, training summaries, the server's limits
    GET  /health        liveness and per-model queue and batch counts
    GET  /              the page (serve_page.html): translate or generate, and see every attention map

**Micro-batching.** Each model has one decoding worker, a thread of its own, fed by a collector
task on the event loop: the first waiting request opens a batch, which takes the requests that come
until ``batch_wait_ms`` has passed since that request came or since the worker became free,
whichever is later (or until ``batch_tokens`` source tokens × beam are gathered); requests with the
same search settings are decoded together, as ``Translator.translate`` decodes one list, then each
gets its own results, in its own order. The event loop never runs the model. A batch that fails is
decoded again request by request, so only the request that fails gets an error.
Generation requests queue the same way but are sampled one at a time: each carries its own seed,
and a merged draw would not give the text its seed promises.

**Errors** are JSON, ``{"error": {"code", "message", ...}}``, with the limit's name and value when
a limit was hit: 422 for a body that is not JSON or not the schema (wrong types, unknown fields,
not UTF-8, nested too deep) and for settings over a maximum (beam, n_best, max_new_tokens); 413
for a body, sentence count, sentence length (characters or tokens) over a limit; 404 for an
unknown model; 401 without the API key; 415 for a POST that is not ``application/json``; 503 when
a model's queue is full.

**Security by default.** The server binds to 127.0.0.1. Any other address needs ``api_key``
(checked on every /v1 request, ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``) or an
explicit ``no_auth``. Without a key, requests must name a loopback host in their Host header (421
otherwise: a page on another site cannot reach the service through DNS rebinding), and a POST must be
``application/json`` (which a cross-site form cannot send). No endpoint reads or writes a file
named by a request: the models are loaded at start-up, from the command line's paths.

**Shutdown.** On SIGTERM or SIGINT the server stops accepting connections, finishes the requests
in flight, stops the workers and returns (``attnlab serve`` exits 0).
"""

import asyncio
import contextlib
import hmac
import importlib.util
import json
import re
import secrets
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..decode.generate import generate
from ..decode.load import KINDS, LoadedModel, load_checkpoint
from ..decode.nbest import translate_n_best
from ..decode.translate import DecodeConfig, Translator
from ..inspect.explain import attention_maps
from .serve_config import ServeConfig, check_bind, is_loopback

__all__ = ["ServeConfig", "ServedModel", "ServiceError", "check_bind", "load_models", "create_app", "run_server",
           "serve"]

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# -- the models -------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """One loaded model under its name, with what /v1/models says about it."""

    name: str
    loaded: LoadedModel
    training: dict[str, Any] | None = None  # the run's summary.json, when there is one
    int8: bool = False  # translation decodes on int8 weights (--int8)

    @property
    def kind(self) -> str:
        return self.loaded.kind

    @cached_property
    def translator(self) -> Translator:
        """The model's translator, made once (an int8 one quantizes its weights once, here)."""
        return Translator(self.loaded.model, self.loaded.src_vocab, self.loaded.tgt_vocab, int8=self.int8)

    @property
    def max_len(self) -> int:
        return self.loaded.model.config.max_len

    def describe(self) -> dict[str, Any]:
        loaded = self.loaded
        src, tgt = loaded.src_vocab, loaded.tgt_vocab
        vocabulary: dict[str, Any] = {"source": {"kind": src.kind, "size": len(src)}, "shared": src is tgt}
        if src is not tgt:
            vocabulary["target"] = {"kind": tgt.kind, "size": len(tgt)}
        info: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "config": loaded.model.config.to_dict(),
            "vocabulary": vocabulary,
            "training": self.training,
        }
        if self.kind == "translation":
            info["int8"] = self.int8
            with contextlib.suppress(ValueError):  # older checkpoints may not name their languages
                info["languages"] = dict(zip(("source", "target"), loaded.languages))
        return info


def _parse_checkpoint_arg(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` or ``PATH``."""
    name, sep, path = spec.partition("=")
    if sep and MODEL_NAME.match(name):
        return name, path
    return None, spec


def _training_summary(path: Path, directory: Path) -> dict[str, Any] | None:
    """The run's summary.json: in ``path`` when it is a run directory, else two levels above the
    checkpoint (a run keeps its checkpoints in ``ckpt/NAME``)."""
    for run in (path, directory.parent.parent):
        summary = run / "summary.json"
        if summary.is_file():
            try:
                data = json.loads(summary.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                return None
            return data if isinstance(data, dict) else None
    return None


def load_models(specs: Sequence[str], device: str = "cpu", int8: bool = False) -> list[ServedModel]:
    """Load each ``[NAME=]PATH`` (a run or checkpoint directory); the name defaults to the folder's.

    ``int8``: translation models decode on int8 weights (CPU only); language models stay float32.
    """
    if not specs:
        raise ValueError("give at least one --checkpoint RUN to serve")
    served: list[ServedModel] = []
    for spec in specs:
        name, path = _parse_checkpoint_arg(spec)
        path_obj = Path(path)
        name = name or path_obj.resolve().name
        if not MODEL_NAME.match(name):
            raise ValueError(f"{name!r} cannot name a model (letters, digits, '.', '_', '-'); "
                             f"name it with --checkpoint NAME={path}")
        if any(s.name == name for s in served):
            raise ValueError(f"two models are named {name!r}: name them with --checkpoint NAME=PATH")
        loaded = load_checkpoint(path_obj, device=device)
        model = ServedModel(name, loaded, _training_summary(path_obj, loaded.directory),
                            int8=int8 and loaded.kind == "translation")
        if model.int8:
            model.translator  # quantize now: a refused device or a slow first request is no surprise later
        served.append(model)
    return served


# -- errors -----------------------------------------------------------------------------------


class ServiceError(Exception):
    """An error answered to the client: HTTP status, a short code, a message, and details."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


def _limit_error(status: int, limit: str, maximum: int, got: int, message: str) -> ServiceError:
    return ServiceError(status, "limit_exceeded", message, limit=limit, max=maximum, got=got)


# -- requests ---------------------------------------------------------------------------------


def _request_models():
    """The request schemas (pydantic, strict: "4" is not a number, unknown fields are refused)."""
    from pydantic import BaseModel, ConfigDict, Field

    class TranslateRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")
        model: str | None = None
        text: list[str] = Field(min_length=1)
        beam: int = Field(4, ge=1)
        alpha: float = Field(0.6, ge=0.0, allow_inf_nan=False)
        n_best: int = Field(1, ge=1)
        attention: bool = False

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")
        model: str | None = None
        prompt: str = Field(min_length=1)
        max_new_tokens: int = Field(200, ge=1)
        temperature: float = Field(0.8, gt=0.0, allow_inf_nan=False)
        top_k: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        seed: int | None = Field(None, ge=0, lt=2**63)

    return TranslateRequest, GenerateRequest


def _parse(schema: Any, body: bytes) -> Any:
    """Validate a JSON body against a schema; every problem is a 422 that says where it is."""
    from pydantic import ValidationError

    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServiceError(422, "invalid_json", f"the body is not UTF-8 (byte {e.start}: {e.reason})") from None
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        problems = [{"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"], "type": err["type"]}
                    for err in e.errors(include_url=False, include_input=False)[:20]]
        if any(p["type"] == "json_invalid" for p in problems):
            raise ServiceError(422, "invalid_json", f"the body is not valid JSON: {problems[0]['message']}") from None
        first = problems[0]
        where = f"'{first['field']}': " if first["field"] else ""
        raise ServiceError(422, "invalid_request", f"{where}{first['message']}", problems=problems) from None


@dataclass
class _TranslateJob:
    text: list[str]
    beam: int
    alpha: float
    n_best: int
    attention: bool

    @property
    def search(self) -> tuple[int, float, int]:
        """Requests with the same search settings are decoded together."""
        return self.beam, self.alpha, self.n_best


@dataclass
class _GenerateJob:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int


@dataclass
class _Queued:
    job: _TranslateJob | _GenerateJob
    cost: int
    arrival: float
    future: asyncio.Future


# -- decoding (in a model's worker thread) ------------------------------------------------------


def _round_maps(maps: dict[str, list[torch.Tensor]], digits: int = 4) -> dict[str, list]:
    return {kind: [w.round(decimals=digits).tolist() for w in layers] for kind, layers in maps.items()}


def _translate_jobs(served: ServedModel, jobs: list[_TranslateJob], batch_size: int) -> list[dict[str, Any]]:
    """Decode the sentences of several requests with one search setting as one set of batches,
    exactly as ``Translator.translate`` does for one list; then answer each request its own."""
    translator = served.translator
    beam, alpha, n_best = jobs[0].search
    config = DecodeConfig(beam_size=beam, alpha=alpha, batch_size=batch_size)
    sentences = [s for job in jobs for s in job.text]
    todo = [i for i, s in enumerate(sentences) if s.strip()]  # a blank sentence translates to ""
    sources = translator.encode_source([sentences[i] for i in todo])
    ranked: list[list[tuple[list[int], float | None]]] = [[([], None)] for _ in sentences]
    for batch in config.batches([len(source) for source in sources]):  # as Translator.translate forms them
        chunk = [sources[j] for j in batch]
        if n_best == 1:  # the very call `attnlab translate` makes
            found = [[(ids, None)] for ids in translator.translate_ids(chunk, config)]
        else:
            found = [[(h.tokens, h.score) for h in hyps] for hyps in translate_n_best(translator, chunk, config, n_best)]
        for j, hyps in zip(batch, found):
            ranked[todo[j]] = hyps

    decode = translator.tgt_vocab.decode
    answers, start = [], 0
    for job in jobs:
        mine = ranked[start : start + len(job.text)]
        answer: dict[str, Any] = {"translations": [decode(hyps[0][0]) for hyps in mine]}
        if job.n_best > 1:
            answer["alternatives"] = [
                [{"text": decode(ids), "score": None if score is None else round(score, 4)} for ids, score in hyps]
                for hyps in mine
            ]
        if job.attention:
            answer["attention"] = [_attention(served, sentence, hyps[0][0]) if sentence.strip() else None
                                   for sentence, hyps in zip(job.text, mine)]
        answers.append(answer)
        start += len(job.text)
    return answers


def _attention(served: ServedModel, sentence: str, target_ids: list[int]) -> dict[str, Any]:
    loaded = served.loaded
    found = attention_maps(loaded.model, loaded.src_vocab, loaded.tgt_vocab, sentence, target_ids)
    return {"src_tokens": found.src_tokens, "tgt_tokens": found.tgt_tokens,
            "output_tokens": found.output_tokens, **_round_maps(found.maps)}


def _generate_job(served: ServedModel, job: _GenerateJob) -> dict[str, Any]:
    model, vocab = served.loaded.model, served.loaded.src_vocab
    prompt = torch.tensor([job.prompt_ids], device=next(model.parameters()).device)  # (1, t)
    out = generate(model, prompt, job.max_new_tokens, temperature=job.temperature, top_k=job.top_k,
                   top_p=job.top_p, seed=job.seed)[0].tolist()  # (t + new,)
    return {"text": vocab.decode(out), "completion": vocab.decode(out[len(job.prompt_ids) :]), "seed": job.seed}


def _answer(served: ServedModel, group: list[Any], batch_size: int) -> list[dict[str, Any]]:
    """The answers to a group of jobs that are decoded together (one generation job is alone)."""
    if isinstance(group[0], _GenerateJob):
        return [_generate_job(served, job) for job in group]
    return _translate_jobs(served, group, batch_size)


def _run_batch(served: ServedModel, jobs: list[_TranslateJob | _GenerateJob], batch_size: int) -> list[Any]:
    """Answer every job of a batch: a result, or the exception that its own decoding raised."""
    results: list[Any] = [None] * len(jobs)
    groups: dict[Any, list[int]] = {}
    for i, job in enumerate(jobs):
        key = job.search if isinstance(job, _TranslateJob) else ("generate", i)
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        group = [jobs[i] for i in members]
        try:
            answers: list[Any] = _answer(served, group, batch_size)
        except Exception:  # one request's failure must not take the others down: decode each alone
            answers = []
            for job in group:
                try:
                    answers.extend(_answer(served, [job], batch_size))
                except Exception as error:
                    answers.append(error)
        for i, answer in zip(members, answers):
            results[i] = answer
    return results


# -- the worker: one per model --------------------------------------------------------------------


@dataclass
class _Stats:
    requests: int = 0
    sentences: int = 0
    batches: int = 0
    largest_batch: int = 0  # in requests
    failed: int = 0


class ModelWorker:
    """A model's queue, the collector task that forms batches, and the one thread that decodes."""

    def __init__(self, served: ServedModel, config: ServeConfig) -> None:
        self.served = served
        self.config = config
        self.stats = _Stats()
        self._pending: deque[_Queued] = deque()
        self._pending_cost = 0
        self._executor: ThreadPoolExecutor | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"attnlab-{self.served.name}")
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batch-{self.served.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queued in self._pending:
            if not queued.future.done():
                queued.future.set_exception(ServiceError(503, "shutting_down", "the server is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)

    async def submit(self, job: _TranslateJob | _GenerateJob, cost: int) -> Any:
        if self._wake is None:
            raise ServiceError(503, "not_ready", "the server is starting or stopping")
        if len(self._pending) >= self.config.max_queued:
            raise ServiceError(503, "busy", f"model {self.served.name!r} has {len(self._pending)} requests waiting; "
                               "try again shortly", limit="max_queued", max=self.config.max_queued)
        loop = asyncio.get_running_loop()
        queued = _Queued(job, cost, loop.time(), loop.create_future())
        self._pending.append(queued)
        self._pending_cost += cost
        self._wake.set()
        result = await queued.future
        if isinstance(result, BaseException):
            self.stats.failed += 1
            raise ServiceError(500, "decoding_failed", f"decoding failed: {type(result).__name__}: {result}")
        return result

    def _mergeable(self) -> bool:
        return self.config.batching and self.served.kind == "translation"

    def _take(self) -> list[_Queued]:
        """The next batch: the oldest request, then those that fit the token budget."""
        batch = [self._pending.popleft()]
        cost = batch[0].cost
        while self._mergeable() and self._pending and cost + self._pending[0].cost <= self.config.batch_tokens:
            batch.append(self._pending.popleft())
            cost += batch[-1].cost
        self._pending_cost -= cost
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        wait = self.config.batch_wait_ms / 1000
        free_since = loop.time()  # when the worker last became free
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            if self._mergeable():
                # Wait for company until `wait` has passed since the first request came or since the
                # worker became free, whichever is later: the clients just answered send their next
                # requests then, and they join the ones that came while the last batch decoded
                # (without this, steady load splits into cohorts that never merge).
                deadline = max(self._pending[0].arrival, free_since) + wait
                while self._pending_cost < self.config.batch_tokens and (left := deadline - loop.time()) > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except TimeoutError:
                        break
            batch = self._take()
            jobs = [q.job for q in batch]
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            self.stats.requests += len(batch)
            self.stats.sentences += sum(len(j.text) if isinstance(j, _TranslateJob) else 1 for j in jobs)
            try:
                results = await loop.run_in_executor(
                    self._executor, _run_batch, self.served, jobs, self.config.decode_batch_size)
            except Exception as error:  # the worker itself failed (not one request): answer everyone
                results = [error] * len(batch)
            for queued, result in zip(batch, results):
                if not queued.future.done():  # a client that went away has its future cancelled
                    queued.future.set_result(result)
            free_since = loop.time()


# -- the app ----------------------------------------------------------------------------------


def _page() -> str:
    return resources.files("attnlab.app").joinpath("serve_page.html").read_text(encoding="utf-8")


class _Guard:
    """ASGI middleware in front of every route: the API key, the Host header, the body's size and
    type. The body is read here (at most ``max_body_bytes``) and handed on whole."""

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app = app
        self.config = config
        self.key = config.api_key.encode() if config.api_key else None
        self.check_host = not config.api_key and is_loopback(config.host)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self._check(scope, headers)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._buffered_body(headers, receive)
        except ServiceError as error:
            await _send_error(send, error)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: dict, headers: dict[str, str]) -> None:
        if self.check_host:
            host = headers.get("host", "")
            if not is_loopback(_host_name(host)) and _host_name(host) != self.config.host:
                raise ServiceError(421, "wrong_host", f"this server answers loopback host names only, not {host!r}")
        if self.key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("x-api-key", "")
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), self.key):
                raise ServiceError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY' "
                                   "or 'X-API-Key: KEY'")
        if scope["method"] == "POST":
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise ServiceError(415, "unsupported_media_type",
                                   f"send the body as application/json, not {content_type or 'no content type'!r}")

    async def _buffered_body(self, headers: dict[str, str], receive: Callable) -> Callable:
        limit = self.config.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _limit_error(413, "max_body_bytes", limit, int(declared),
                               f"the body has {int(declared)} bytes, more than the limit of {limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ServiceError(400, "disconnected", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _limit_error(413, "max_body_bytes", limit, size, f"the body has more than the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _host_name(header: str) -> str:
    """The name in a Host header: "[::1]:8000" -> "::1", "localhost:8000" -> "localhost"."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


async def _send_error(send: Callable, error: ServiceError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="attnlab"'))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(models: Sequence[ServedModel], config: ServeConfig = ServeConfig()) -> Any:
    """The ASGI app serving ``models`` (a FastAPI app wrapped in the security and size guard)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    if not models:
        raise ValueError("no models to serve")
    TranslateRequest, GenerateRequest = _request_models()
    workers = {m.name: ModelWorker(m, config) for m in models}
    page = _page()
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for worker in workers.values():
            worker.start()
        yield
        for worker in workers.values():
            await worker.stop()

    app = FastAPI(title="attnlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.workers = workers

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> Response:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(ServiceError(error.status_code, codes.get(error.status_code, "http_error"),
                                         str(error.detail)).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    def worker_for(name: str | None, kind: str) -> ModelWorker:
        if name is None:
            for worker in workers.values():
                if worker.served.kind == kind:
                    return worker
            raise ServiceError(404, "unknown_model", f"no {KINDS[kind][2]} is served; models: {sorted(workers)}")
        worker = workers.get(name)
        if worker is None:
            raise ServiceError(404, "unknown_model", f"no model named {name!r}; models: {sorted(workers)}")
        if worker.served.kind != kind:
            use = "/v1/generate" if worker.served.kind == "lm" else "/v1/translate"
            raise ServiceError(422, "wrong_model_kind", f"model {name!r} is a {KINDS[worker.served.kind][2]}: use {use}")
        return worker

    async def respond(payload: dict[str, Any], large: bool) -> Response:
        """JSON out; a large body (attention maps) is rendered off the event loop."""
        if not large:
            return JSONResponse(payload)
        body = await asyncio.to_thread(json.dumps, payload, ensure_ascii=False, separators=(",", ":"))
        return Response(body, media_type="application/json")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> Response:
        return HTMLResponse(page, headers={
            "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                                       "frame-ancestors 'none'",
            "x-content-type-options": "nosniff",
        })

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({
            "status": "ok",
            "uptime_s": round(time.time() - started, 1),
            "models": {name: {"queued": w.queued, **asdict(w.stats)} for name, w in workers.items()},
        })

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({
            "models": [w.served.describe() for w in workers.values()],
            "limits": config.limits(),
            "batching": {"enabled": config.batching, "wait_ms": config.batch_wait_ms,
                         "batch_tokens": config.batch_tokens},
        })

    @app.post("/v1/translate")
    async def translate(request: Request) -> Response:
        body = _parse(TranslateRequest, await request.body())
        worker = worker_for(body.model, "translation")
        served = worker.served
        text = body.text
        if len(text) > config.max_sentences:
            raise _limit_error(413, "max_sentences", config.max_sentences, len(text),
                               f"{len(text)} sentences in one request; the limit is {config.max_sentences}")
        longest = max(range(len(text)), key=lambda i: len(text[i]))
        if len(text[longest]) > config.max_chars:
            raise _limit_error(413, "max_chars", config.max_chars, len(text[longest]),
                               f"sentence {longest + 1} has {len(text[longest])} characters; the limit is {config.max_chars}")
        if body.beam > config.max_beam:
            raise _limit_error(422, "max_beam", config.max_beam, body.beam,
                               f"beam {body.beam} is over the limit of {config.max_beam}")
        if body.n_best > body.beam:
            raise ServiceError(422, "invalid_request", f"n_best ({body.n_best}) cannot exceed the beam ({body.beam})")
        if body.attention and len(text) > config.max_attention_sentences:
            raise _limit_error(413, "max_attention_sentences", config.max_attention_sentences, len(text),
                               f"attention maps for {len(text)} sentences; the limit is "
                               f"{config.max_attention_sentences} per request")
        lengths = await asyncio.to_thread(lambda: [len(ids) for ids in served.loaded.src_vocab.encode_batch(text)])
        max_tokens = min(config.max_tokens, served.max_len - 1)
        longest = max(range(len(text)), key=lambda i: lengths[i])
        if lengths[longest] > max_tokens:
            raise _limit_error(413, "max_tokens", max_tokens, lengths[longest],
                               f"sentence {longest + 1} has {lengths[longest]} tokens; the limit is {max_tokens} "
                               f"(the server's max_tokens and the model's {served.max_len} positions)")
        job = _TranslateJob(list(text), body.beam, body.alpha, body.n_best, body.attention)
        answer = await worker.submit(job, cost=(sum(lengths) + len(text)) * body.beam)
        return await respond({**answer, "model": served.name}, large=body.attention)

    @app.post("/v1/generate")
    async def generate_text(request: Request) -> Response:
        body = _parse(GenerateRequest, await request.body())
        worker = worker_for(body.model, "lm")
        vocab = worker.served.loaded.src_vocab
        if len(body.prompt) > config.max_chars:
            raise _limit_error(413, "max_chars", config.max_chars, len(body.prompt),
                               f"the prompt has {len(body.prompt)} characters; the limit is {config.max_chars}")
        if body.max_new_tokens > config.max_new_tokens:
            raise _limit_error(422, "max_new_tokens", config.max_new_tokens, body.max_new_tokens,
                               f"max_new_tokens {body.max_new_tokens} is over the limit of {config.max_new_tokens}")
        ids = vocab.encode(body.prompt)
        unknown = sorted({c for c in body.prompt if vocab.token_to_id(c) is None}) if vocab.kind == "char" else []
        if unknown or vocab.unk_id in ids:
            raise ServiceError(422, "unknown_characters", "the prompt holds characters the model's vocabulary "
                               f"lacks: {''.join(unknown)!r}" if unknown else "the prompt holds unknown tokens")
        seed = secrets.randbits(63) if body.seed is None else body.seed  # returned, so any draw can be repeated
        job = _GenerateJob(ids, body.max_new_tokens, body.temperature, body.top_k, body.top_p, seed)
        answer = await worker.submit(job, cost=1)
        return JSONResponse({**answer, "model": worker.served.name})

    return _Guard(app, config)


# -- running it -------------------------------------------------------------------------------


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM or SIGINT ends it cleanly: stop accepting, finish the
        requests in flight, shut the app down, and return (uvicorn would raise the signal again
        afterwards, which ends the process with the signal's status instead of 0)."""

        def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
            super().__init__(config)
            self.on_ready = on_ready
            self.stopped_by: list[int] = []  # the signals that stopped it

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # listening, with the signal handlers in place: say so
                self.on_ready()

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self.stopped_by = list(self._captured_signals)
                    self._captured_signals.clear()

    return Server


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (port 0: a free one, chosen by the system)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def run_server(models: Sequence[ServedModel], config: ServeConfig, announce: Callable[[str], None] | None = None) -> int:
    """Serve ``models`` until SIGTERM or SIGINT; returns 0 after a clean shutdown."""
    import uvicorn

    check_bind(config)
    app = create_app(models, config)
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    uv_config = uvicorn.Config(
        app, lifespan="on", access_log=config.access_log, log_level="info" if config.access_log else "warning",
        limit_concurrency=config.max_connections, timeout_graceful_shutdown=config.graceful_timeout_s,
        timeout_keep_alive=5, server_header=False,
    )
    host = f"[{config.host}]" if ":" in config.host else config.host
    names = ", ".join(f"{m.name} ({m.kind})" for m in models)
    say = announce or (lambda line: print(line, flush=True))
    server = _server_class()(uv_config, on_ready=lambda: say(
        f"serving {names} on http://{host}:{port} (batching {'on' if config.batching else 'off'}, "
        f"{'API key required' if config.api_key else 'no API key'})"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise RuntimeError("the server did not start (see the messages above)")
    if server.stopped_by:
        print("stopped: finished the requests in flight", file=sys.stderr, flush=True)
    return 0


def serve(specs: Sequence[str], config: ServeConfig, device: str = "cpu", int8: bool = False) -> int:
    """``attnlab serve``: check the address rule, load the models (``[NAME=]PATH`` each), serve them."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"attnlab serve needs {' and '.join(missing)}: pip install 'attnlab[serve]'")
    check_bind(config)  # before the models load: a refused address should not cost a minute
    return run_server(load_models(specs, device, int8), config)
