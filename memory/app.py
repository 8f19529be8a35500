"""The HTTP face of the service: routes under /v1, body formats, auth, and errors as 4xx.

Endpoints are ``async def`` and do their work inline: every operation is a few numpy calls or one
SQLite transaction, and running them all on the event loop thread means the collections need no
locks. Bodies are read by hand (not by FastAPI's body parameters) so that one route accepts both
JSON and the binary format of :mod:`memory.wire`.

No ``from __future__ import annotations`` here: route signatures use limits from the settings
(``Query(le=settings.max_k)``), which FastAPI can only see if annotations are evaluated eagerly.
"""

import hmac
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memory import schemas, wire
from memory.errors import Conflict, InsufficientStorage, InvalidInput, NotFound
from memory.service import MemoryService
from memory.settings import Settings
from memory.store import WriteKey

log = logging.getLogger(__name__)

JSON = "application/json"
IDEMPOTENCY_KEY = r"^[A-Za-z0-9_.-]{1,64}:[0-9]{1,18}$"

try:
    VERSION = version("lagent")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0"


class PayloadTooLarge(Exception):
    """A body over the limit (413)."""


class UnsupportedMediaType(Exception):
    """A body that is neither JSON nor the binary format (415)."""


class BearerAuth:
    """Pure ASGI middleware: every HTTP request must carry ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        check_token(token)
        self.app = app
        self.expected = token.encode()

    def _allowed(self, header: bytes) -> bool:
        """``Bearer <token>``, the scheme in any case (RFC 7235), the token exactly."""
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(b" "), self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not self._allowed(given):
                reply = JSONResponse(
                    {
                        "detail": "missing or wrong bearer token "
                        "(send 'Authorization: Bearer <token>')"
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_token(token: str) -> str:
    """A token is at least one visible character and no white space: a blank one would be matched
    by a header that carries no token at all."""
    if not token or not token.strip() or any(c.isspace() for c in token):
        raise ValueError("the service token must be non-empty and contain no white space")
    return token


class BodyLimit:
    """Pure ASGI middleware: bodies over ``limit`` bytes get 413, whether declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.limit:
            reply = JSONResponse(
                {
                    "detail": f"body of {int(declared)} bytes exceeds the limit "
                    f"of {self.limit} bytes"
                },
                status_code=413,
            )
            await reply(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise PayloadTooLarge(f"body exceeds the limit of {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


BINARY_BODY = {
    "type": "string",
    "format": "binary",
    # The prefix alone is 8 bytes: a shorter body (an empty one too) is malformed, a 400.
    "minLength": wire.PREFIX_BYTES,
    "description": "The binary format of memory/wire.py: b'MWB1', a uint32 header length, a JSON "
    "header of array names, dtypes and shapes, then the arrays. Bytes that do not follow it are "
    "refused with 400; arrays that do, but break the rules of the JSON body, with 422.",
}


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI requestBody for a route that takes either JSON (this model) or the binary format."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": model.model_json_schema()},
                wire.CONTENT_TYPE: {"schema": BINARY_BODY},
            },
        }
    }


def _binary_doc(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for a route that answers JSON (this model) or binary, as Accept asks."""
    return {
        200: {
            "model": model,
            "content": {wire.CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            "description": f"JSON, or the binary format when Accept is {wire.CONTENT_TYPE}.",
        }
    }


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.Problem, "description": text}
    for status, text in {
        400: "Malformed binary body.",
        401: "Missing or wrong bearer token.",
        404: "Unknown collection.",
        409: "Conflicts with stored state (e.g. sampling an empty collection, or an "
        "idempotency key that cannot be a retry).",
        413: "Body too large.",
        415: "Body is neither JSON nor binary.",
        422: "Invalid input: the message names the field and the rule.",
    }.items()
}


def _lists_to_arrays(body: BaseModel) -> dict[str, np.ndarray]:
    arrays = {}
    for name, value in body:
        if value is None:
            continue
        try:
            arrays[name] = np.asarray(value)
        except (ValueError, OverflowError) as exc:
            raise InvalidInput(f"{name}: not a rectangular array of numbers ({exc})") from None
        if arrays[name].dtype == object:
            raise InvalidInput(f"{name}: not a rectangular array of numbers")
    return arrays


async def _arrays_from(request: Request, model: type[BaseModel]) -> dict[str, np.ndarray]:
    """Named numpy arrays from a JSON body (validated by ``model``) or a binary body."""
    body = await request.body()
    media = request.headers.get("content-type", JSON).split(";")[0].strip().lower()
    if media == wire.CONTENT_TYPE:
        arrays, _ = wire.decode(body)
        return arrays
    if media != JSON and not media.endswith("+json"):
        raise UnsupportedMediaType(f"content type {media!r}: send {JSON} or {wire.CONTENT_TYPE}")
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [
                {**e, "loc": ("body", *e["loc"])}
                for e in exc.errors(include_url=False, include_context=False, include_input=False)
            ]
        ) from None
    return _lists_to_arrays(parsed)


def _reply(request: Request, arrays: dict[str, np.ndarray]) -> Response:
    if wire.CONTENT_TYPE in request.headers.get("accept", ""):
        return Response(wire.encode(arrays), media_type=wire.CONTENT_TYPE)
    return JSONResponse({name: _json_list(a) for name, a in arrays.items()})


def _json_list(array: np.ndarray) -> list[Any]:
    """``array`` as lists; NaN (an unknown episode return) becomes null, which JSON can hold."""
    if array.dtype.kind == "f" and np.isnan(array).any():
        return np.where(np.isnan(array), None, array.astype(object)).tolist()
    return array.tolist()


def _check_reply_size(rows: int, dim: int, limit: int) -> None:
    """Refuse up front an answer too big to build (a transition is about 8 * dim + 32 bytes)."""
    if rows * (8 * dim + 32) > limit:
        raise InvalidInput(f"{rows} rows of dim {dim} exceed the {limit}-byte answer limit")


ExceptionHandler = Callable[[Request, Any], Coroutine[Any, Any, Response]]


def _error_handlers() -> dict[int | type[Exception], ExceptionHandler]:
    def answer(status: int) -> ExceptionHandler:
        async def handler(_: Request, exc: Exception) -> Response:
            return JSONResponse({"detail": str(exc)}, status_code=status)

        return handler

    async def invalid_request(_: Request, exc: Exception) -> Response:
        # FastAPI's own handler echoes each bad input back; NaN or Infinity there cannot be encoded
        # as JSON and turned a 422 into a 500 that dropped the connection. Name the field instead.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()  # type: ignore[attr-defined]
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's errors (404 no such route, 405 method not allowed) as JSON; a 405 lists in
        ``Allow`` every method of the path (RFC 9110), not only those of the first route that
        matched it (``/transitions`` has GET and POST)."""
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # From the schema: routers included in the app are not plain routes to ask.
            methods = {
                method.upper()
                for template, operations in request.app.openapi()["paths"].items()
                if compile_path(template)[0].match(request.url.path)
                for method in operations
            }
            if methods:
                headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    return {
        HTTPException: http_error,
        RequestValidationError: invalid_request,
        wire.WireError: answer(400),
        NotFound: answer(404),
        Conflict: answer(409),
        PayloadTooLarge: answer(413),
        UnsupportedMediaType: answer(415),
        InvalidInput: answer(422),
        InsufficientStorage: answer(507),
    }


def create_app(settings: Settings) -> FastAPI:
    """The app; the service (log, rings, indexes) opens with the app's lifespan."""
    state: dict[str, MemoryService] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["service"] = MemoryService(settings)
        try:
            yield
        finally:
            state.pop("service").close()

    def service() -> MemoryService:
        return state["service"]

    app = FastAPI(
        title="Memory service",
        version=VERSION,
        description="Durable replay memory and similar-state search for learning agents. "
        f"Every array-valued endpoint takes and gives JSON, or {wire.CONTENT_TYPE} bodies in the "
        "format of memory/wire.py (a small JSON header of dtypes and shapes, then raw arrays).",
        lifespan=lifespan,
        exception_handlers=_error_handlers(),
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.token is not None:
        check_token(settings.token)  # refused now, not at the first request
    if settings.token:  # added last, so it runs first: no body is read for a stranger
        app.add_middleware(BearerAuth, token=settings.token)
    v1 = APIRouter(prefix="/v1", responses=_ERRORS)
    Name = Annotated[str, Path(pattern=schemas.COLLECTION_NAME)]
    Rows = Annotated[int, Query(ge=1, le=settings.max_sample)]

    @v1.get("/health", response_model=schemas.Health, tags=["service"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": VERSION, "collections": len(service().collections)}

    @v1.get("/stats", tags=["service"])
    async def stats() -> dict[str, Any]:
        """Counters and sizes of the service and every collection; ``memory``: the budget, what
        the collections reserve against it at full capacity, and what they hold now (bytes)."""
        return service().stats()

    @v1.get("/collections", response_model=schemas.CollectionList, tags=["collections"])
    async def list_collections() -> dict[str, Any]:
        return {"collections": [c.describe() for c in service().collections.values()]}

    @v1.post(
        "/collections",
        response_model=schemas.CollectionInfo,
        status_code=201,
        tags=["collections"],
        responses={
            200: {"model": schemas.CollectionInfo, "description": "Exists with these settings."},
            507: {
                "model": schemas.Problem,
                "description": "Refused: at full capacity the collection would take the service "
                "beyond its memory budget (--max-memory-mb); GET /v1/stats shows what is reserved.",
            },
        },
    )
    async def create_collection(body: schemas.CollectionCreate) -> JSONResponse:
        """Create a collection; the same request again answers 200, different settings 409."""
        collection, created = service().create(
            body.name, body.dim, body.capacity, body.embedding_dim, body.priority_alpha
        )
        return JSONResponse(collection.describe(), status_code=201 if created else 200)

    @v1.get("/collections/{name}", response_model=schemas.CollectionInfo, tags=["collections"])
    async def describe_collection(name: Name) -> dict[str, Any]:
        return service().get(name).describe()

    @v1.get("/collections/{name}/stats", tags=["collections"])
    async def collection_stats(name: Name) -> dict[str, Any]:
        return service().get(name).stats()

    @v1.post(
        "/collections/{name}/transitions",
        response_model=schemas.StoreResult,
        tags=["replay"],
        openapi_extra=_body_doc(schemas.TransitionBatch),
    )
    async def store_transitions(
        name: Name,
        request: Request,
        idempotency_key: Annotated[  # str, not str | None: the schema must not offer null
            str,
            Header(
                pattern=IDEMPOTENCY_KEY,
                description="'<client id>:<sequence number>', scoped per collection: the "
                "sequence numbers one client sends to a collection must increase. The client's "
                "latest key again (a batch re-sent after a lost answer) is acknowledged with "
                "duplicate true and not stored again; a lower one, or the key the client last "
                "used in another collection, cannot be a retry and is refused with 409.",
            ),
        ] = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Store a batch durably (one SQLite transaction) before answering."""
        svc = service()
        svc.get(name)  # 404 before reading a body meant for nothing
        arrays = await _arrays_from(request, schemas.TransitionBatch)
        key = None
        if idempotency_key is not None:
            client_id, seq = idempotency_key.rsplit(":", 1)
            key = WriteKey(client_id, int(seq))
        return asdict(svc.store(name, arrays, key))

    @v1.get(
        "/collections/{name}/transitions",
        tags=["replay"],
        responses=_binary_doc(schemas.TransitionRows),
    )
    async def read_transitions(
        name: Name,
        request: Request,
        first_id: Annotated[
            int,
            Query(
                ge=0,
                le=2**62,
                description="First id to return; rows evicted before it are skipped.",
            ),
        ] = 0,
        limit: Rows = 1000,
    ) -> Response:
        """Stored rows in id order: to inspect a collection or copy it elsewhere."""
        collection = service().get(name)
        _check_reply_size(limit, collection.row.dim, settings.max_reply_bytes)
        return _reply(request, collection.read(first_id, limit))

    @v1.get(
        "/collections/{name}/sample",
        tags=["replay"],
        responses=_binary_doc(schemas.ReplayBatchJSON),
    )
    async def sample(
        name: Name,
        request: Request,
        batch_size: Rows = 32,
        prioritized: bool = False,
        beta: Annotated[
            float, Query(ge=0.0, le=1.0, description="Importance-weight exponent.")
        ] = 0.4,
        batches: Annotated[
            int,
            Query(
                ge=1,
                le=64,
                description="Batches back to back in one answer "
                "(batch_size * batches rows), to prefetch several at once.",
            ),
        ] = 1,
        seed: Annotated[  # int, not int | None: the schema must not offer null
            int,
            Query(
                ge=0,
                le=2**63 - 1,
                description="Seed of this request's draws (default: the service's own generator). "
                "With end_id, the same request always answers the same rows.",
            ),
        ] = None,  # type: ignore[assignment]
        end_id: Annotated[  # int, not int | None: the schema must not offer null
            int,
            Query(
                ge=1,
                le=2**62,
                description="Draw only from rows with ids below this one (the collection's "
                "next_id when the caller asked), so that rows stored since cannot change the "
                "answer; 409 if it is beyond the ids stored so far.",
            ),
        ] = None,  # type: ignore[assignment]
    ) -> Response:
        """Replay batches, drawn with replacement (uniformly, or in proportion to priority)."""
        if batch_size * batches > settings.max_sample:
            raise InvalidInput(f"batch_size * batches must be at most {settings.max_sample}")
        svc = service()
        collection = svc.get(name)
        _check_reply_size(batch_size * batches, collection.row.dim, settings.max_reply_bytes)
        rng = svc.rng if seed is None else np.random.default_rng(seed)
        return _reply(
            request, collection.sample(batch_size, prioritized, beta, rng, batches, end_id)
        )

    @v1.post(
        "/collections/{name}/priorities",
        response_model=schemas.PriorityResult,
        tags=["replay"],
        openapi_extra=_body_doc(schemas.PriorityUpdate),
    )
    async def update_priorities(name: Name, request: Request) -> dict[str, int]:
        """Set priorities of sampled rows by id (binary arrays 'ids' int64 and 'priorities')."""
        collection = service().get(name)
        arrays = await _arrays_from(request, schemas.PriorityUpdate)
        if set(arrays) != {"ids", "priorities"}:
            raise InvalidInput(
                f"expected arrays ids and priorities, got {', '.join(sorted(arrays)) or 'none'}"
            )
        return collection.update_priorities(arrays["ids"], arrays["priorities"])

    @v1.post(
        "/collections/{name}/search",
        tags=["search"],
        responses=_binary_doc(schemas.SearchResultJSON),
        openapi_extra=_body_doc(schemas.SearchQuery),
    )
    async def search(
        name: Name,
        request: Request,
        k: Annotated[
            int, Query(ge=1, le=settings.max_k, description="Neighbours per query state.")
        ] = 5,
    ) -> Response:
        """The k stored transitions nearest to each query state (binary array 'states' [Q, D])."""
        collection = service().get(name)
        arrays = await _arrays_from(request, schemas.SearchQuery)
        if set(arrays) != {"states"}:
            raise InvalidInput(
                f"expected one array 'states', got {', '.join(sorted(arrays)) or 'none'}"
            )
        queries = len(arrays["states"]) if arrays["states"].ndim > 1 else 1
        _check_reply_size(queries * k, collection.row.dim, settings.max_reply_bytes)
        return _reply(request, collection.search(arrays["states"], k, settings.max_queries))

    app.include_router(v1)
    return app
