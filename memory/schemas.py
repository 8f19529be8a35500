"""JSON bodies of the API, as pydantic models: they validate input and document it in OpenAPI.

Array-valued fields are plain lists here; shapes, dtypes and finiteness are checked once the lists
are numpy arrays, by the same code that checks binary bodies (:mod:`memory.transitions`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from memory.wire import COLLECTION_NAME, COLLECTION_NAME_RULE


def _number(value: Any) -> Any:
    """JSON numbers only: pydantic's lax mode would take ``true`` or ``"2"`` for a number, which
    the schema (type number/integer) refuses; 2.0 for an integer stays fine, as in JSON Schema."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


# Bounds go before the validator, so that OpenAPI gets them as minimum/maximum.
NUMBER = BeforeValidator(_number)
Float = Annotated[float, NUMBER]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), NUMBER]
Id = Annotated[int, Field(ge=0, le=2**63 - 1), NUMBER]
Priority = Annotated[float, Field(ge=0), NUMBER]
Size = Annotated[int, Field(ge=1, le=4096), NUMBER]
Row = Annotated[list[Float], Field(min_length=1)]
"""One state (D >= 1 values); D itself is the collection's, which a static schema cannot say."""
CollectionName = Annotated[
    str, Field(pattern=COLLECTION_NAME, description=COLLECTION_NAME_RULE)
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN anywhere: a 422 naming it


class CollectionCreate(_Body):
    name: CollectionName
    dim: Size = Field(description="Observation size D.")
    capacity: Annotated[int, Field(ge=1, le=100_000_000), NUMBER] | None = Field(
        default=None,
        description="Transitions kept; the oldest are evicted first beyond it "
        "(server default if omitted).",
    )
    embedding_dim: Size | None = Field(
        default=None,
        description="If set, every stored row carries an embedding of this size, and search "
        "compares embeddings instead of observations.",
    )
    priority_alpha: Float = Field(
        default=0.6, ge=0.0, le=1.0, description="Prioritization exponent."
    )


class TransitionBatch(_Body):
    obs: list[Row] = Field(min_length=1, description="[B, D] observations, B >= 1.")
    actions: list[Int64] = Field(min_length=1, description="[B] discrete actions.")
    rewards: list[Float] = Field(min_length=1, description="[B] rewards.")
    next_obs: list[Row] = Field(min_length=1, description="[B, D] next observations.")
    dones: list[StrictBool | Float] = Field(
        min_length=1, description="[B] terminated flags: true/false or 1/0."
    )
    embeddings: Annotated[list[Row], Field(min_length=1)] | None = Field(
        default=None,
        description="[B, E] search vectors, for collections created with embedding_dim.",
    )
    episode_returns: list[Float] | None = Field(
        default=None,
        description="[B] optional: the return of the episode each row belongs to, so that a "
        "search can prefer neighbours from successful episodes (omitted: unknown).",
    )
    priorities: list[Priority] | None = Field(
        default=None,
        description="[B] optional initial sampling priorities (e.g. an actor's |TD error| for its "
        "own rows), finite and >= 0, clipped to [1e-6, 1e6]; omitted: the collection's running "
        "maximum, as for any new row.",
    )


class PriorityUpdate(_Body):
    ids: list[Id] = Field(description="Ids from a sampled batch.")
    priorities: list[Priority] = Field(
        description="New priorities (e.g. |TD error|), finite and >= 0; each is clipped to "
        "[1e-6, 1e6] before the collection's alpha power."
    )


class SearchQuery(_Body):
    states: Annotated[list[Row], Field(min_length=1)] | Row = Field(
        description="[Q, D] query states (Q >= 1), or one state [D]."
    )


class Health(BaseModel):
    status: str
    version: str
    collections: int


class CollectionInfo(BaseModel):
    name: str
    dim: int
    embedding_dim: int | None
    capacity: int
    eviction: str
    priority_alpha: float
    size: int
    next_id: int
    oldest_id: int
    created_at: float
    search: dict[str, Any]


class CollectionList(BaseModel):
    collections: list[CollectionInfo]


class StoreResult(BaseModel):
    collection: str
    first_id: int | None = Field(description="Id of the first stored row; ids are consecutive.")
    count: int | None
    duplicate: bool = Field(
        description="True if this idempotency key was stored before: nothing new stored."
    )


class TransitionRows(BaseModel):
    ids: list[int]
    obs: list[list[float]]
    actions: list[int]
    rewards: list[float]
    next_obs: list[list[float]]
    dones: list[float]
    episode_returns: list[float | None] = Field(
        description="The return of each row's episode, as its writer stored it (null: unknown)."
    )


class ReplayBatchJSON(TransitionRows):
    weights: list[float] = Field(description="Importance weights (all 1 for uniform sampling).")


class SearchResultJSON(TransitionRows):
    distances: list[float] = Field(description="Euclidean distance to the query.")
    query_index: list[int] = Field(description="Which query each row answers (k rows per query).")


class PriorityResult(BaseModel):
    updated: int
    evicted: int = Field(description="Ids skipped because they were evicted since sampling.")


class Problem(BaseModel):
    detail: Any
