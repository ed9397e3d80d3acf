"""Pydantic models describing the HTTP API (OpenAPI document and the naive baseline).

The served predict endpoints decode bodies themselves (see ``codec``) for speed; these
models document the same wire format.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

Matrix = list[list[float]]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Matrix | list[Matrix] = Field(
        description="One matrix (bars x features) or a batch of them (B x bars x features)"
    )
    mc_passes: int | None = Field(
        None, ge=0, description="Monte-Carlo dropout passes (0 or absent: none)"
    )


class McDropout(BaseModel):
    passes: int
    mean: list[float] = Field(description="Mean action probabilities over the passes")
    std: list[float] = Field(description="Standard deviation of the action probabilities")
    value_mean: float
    value_std: float


class Prediction(BaseModel):
    action: str = Field(description="short | neutral | long")
    action_index: int
    confidence: float = Field(description="Probability of the chosen action")
    probabilities: list[float] = Field(description="Ordered as 'actions'")
    value: float = Field(description="Value head output")
    mc_dropout: McDropout | None = None


class PredictResponse(BaseModel):
    model: str
    version: str
    actions: list[str]
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable reason")
    detail: str


class ModelVersion(BaseModel):
    version: str | None
    sha256: str | None
    ready: bool


class VersionResponse(BaseModel):
    service_version: str
    color: str
    env: str
    models: dict[str, ModelVersion]


class DrainResponse(BaseModel):
    draining: bool
    in_flight: int
    drained: bool
