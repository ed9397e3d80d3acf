"""Loading, verifying, warming up and running the TorchScript artifacts."""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grandmodel_service.domain import DomainError, InputDomain
from grandmodel_service.manifest import Manifest, ManifestError, sha256_hex

log = logging.getLogger(__name__)

# Request bodies arrive as immutable bytes; the forward pass never writes to its input.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
# TorchScript is in maintenance mode upstream but remains the simplest self-contained,
# Python-free artifact format that torch 2.13 loads; silence its deprecation notice.
warnings.filterwarnings(
    "ignore", message=r".*torch\.jit\..*deprecated", category=DeprecationWarning
)


class ModelLoadError(RuntimeError):
    """An artifact was refused: unreadable, tampered with, or not reproducing its goldens."""


@dataclass(frozen=True)
class BatchOutput:
    """Per-sample results of one forward pass, as float32 numpy arrays."""

    probabilities: np.ndarray  # (B, 3)
    value: np.ndarray  # (B,)
    mc_passes: int = 0
    mc_mean: np.ndarray | None = None  # (B, 3)
    mc_std: np.ndarray | None = None  # (B, 3)
    mc_value_mean: np.ndarray | None = None  # (B,)
    mc_value_std: np.ndarray | None = None  # (B,)

    def __len__(self) -> int:
        return int(self.probabilities.shape[0])

    def first_non_finite(self) -> int | None:
        """Index of the first sample with a NaN or Inf anywhere in its outputs, or None."""
        arrays = [self.probabilities, self.value]
        if self.mc_mean is not None:
            arrays += [self.mc_mean, self.mc_std, self.mc_value_mean, self.mc_value_std]  # type: ignore[list-item]
        # Fast path: a NaN or Inf anywhere makes the sum non-finite (a finite sum of finite
        # values that overflows only sends us to the exact check below).
        if math.isfinite(sum(float(a.sum()) for a in arrays)):
            return None
        finite = np.ones(len(self), dtype=bool)
        for array in arrays:
            finite &= np.isfinite(array.reshape(len(self), -1)).all(axis=1)
        return None if finite.all() else int(np.argmin(finite))

    def slice(self, start: int, stop: int) -> BatchOutput:
        def part(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[start:stop]

        return BatchOutput(
            self.probabilities[start:stop],
            self.value[start:stop],
            self.mc_passes,
            part(self.mc_mean),
            part(self.mc_std),
            part(self.mc_value_mean),
            part(self.mc_value_std),
        )


def run_forward(
    module: torch.nn.Module | torch.jit.ScriptModule, inputs: np.ndarray
) -> BatchOutput:
    """Deterministic forward pass: softmax probabilities and values."""
    with torch.inference_mode():
        logits, value = module(torch.from_numpy(inputs))
        return BatchOutput(torch.softmax(logits, dim=-1).numpy(), value.numpy())


def run_mc_dropout(module: torch.jit.ScriptModule, inputs: np.ndarray, passes: int) -> BatchOutput:
    """Deterministic forward plus ``passes`` dropout-active passes in one batched call."""
    with torch.inference_mode():
        x = torch.from_numpy(inputs)
        logits, value = module(x)
        mc_logits, mc_value = module.mc_dropout(x, passes)
        mc_probs = torch.softmax(mc_logits, dim=-1)
        mc_std, mc_mean = torch.std_mean(mc_probs, dim=0, correction=0)
        value_std, value_mean = torch.std_mean(mc_value, dim=0, correction=0)
        return BatchOutput(
            torch.softmax(logits, dim=-1).numpy(),
            value.numpy(),
            passes,
            mc_mean.numpy(),
            mc_std.numpy(),
            value_mean.numpy(),
            value_std.numpy(),
        )


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    module: torch.jit.ScriptModule
    domain: InputDomain

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.manifest.input_shape

    def predict(self, inputs: np.ndarray) -> BatchOutput:
        return run_forward(self.module, inputs)

    def predict_mc(self, inputs: np.ndarray, passes: int) -> BatchOutput:
        return run_mc_dropout(self.module, inputs, passes)


def golden_mismatch(model: LoadedModel, atol: float) -> str | None:
    """Replay the manifest's golden samples; describe the first mismatch, or None."""
    samples = model.manifest.golden
    if not samples:
        return "manifest has no golden samples"
    try:
        inputs = np.asarray([s.input for s in samples], dtype=np.float32)
    except ValueError as exc:
        return f"golden inputs are malformed: {exc}"
    if inputs.shape[1:] != model.input_shape:
        return f"golden inputs have shape {inputs.shape[1:]}, manifest says {model.input_shape}"
    out = model.predict(inputs)
    for index, sample in enumerate(samples):
        if not (np.isfinite(out.probabilities[index]).all() and np.isfinite(out.value[index])):
            return f"golden sample {index} gives a non-finite output"
        if model.domain.violation(inputs[index : index + 1]) is not None:
            where = model.domain.violation(inputs[index : index + 1])
            assert where is not None
            return f"golden sample {index}: {model.domain.describe(where)}"
        prob_error = float(np.max(np.abs(out.probabilities[index] - sample.probabilities)))
        value_error = abs(float(out.value[index]) - sample.value)
        action = model.manifest.actions[int(np.argmax(out.probabilities[index]))]
        if prob_error > atol or value_error > atol or action != sample.action:
            return (
                f"golden sample {index} does not reproduce: max|dp|={prob_error:.3g}, "
                f"|dvalue|={value_error:.3g}, action {action} vs {sample.action}, atol={atol:g}"
            )
    return None


def load_model(
    manifest_path: Path,
    expected_name: str,
    *,
    atol_override: float | None = None,
    warmup_iterations: int = 3,
    warmup_batch: int = 64,
) -> LoadedModel:
    """Load, verify (sha256 and goldens) and warm up one artifact, or raise ModelLoadError."""
    try:
        manifest = Manifest.read(manifest_path)
    except ManifestError as exc:
        raise ModelLoadError(str(exc)) from exc
    if manifest.name != expected_name:
        raise ModelLoadError(f"{manifest_path} describes {manifest.name!r}, not {expected_name!r}")
    if manifest.input_dtype != "float32":
        raise ModelLoadError(f"{manifest_path}: unsupported input dtype {manifest.input_dtype}")
    try:
        # Hash and load the same bytes so the file cannot change between check and use.
        data = manifest.artifact_path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read artifact {manifest.artifact_path}: {exc}") from exc
    digest = sha256_hex(data)
    if digest != manifest.sha256:
        raise ModelLoadError(
            f"sha256 mismatch for {manifest.artifact_path}: manifest says {manifest.sha256}, "
            f"file has {digest}"
        )
    try:
        module = torch.jit.load(  # type: ignore[no-untyped-call]
            io.BytesIO(data), map_location="cpu"
        )
    except Exception as exc:  # torch raises a variety of errors for corrupt archives
        raise ModelLoadError(f"cannot load {manifest.artifact_path}: {exc}") from exc
    module.eval()
    try:
        domain = InputDomain.from_manifest(manifest.input_domain, manifest.input_shape[-1])
    except DomainError as exc:
        raise ModelLoadError(f"{manifest_path}: {exc}") from exc
    model = LoadedModel(manifest, module, domain)
    try:
        mismatch = golden_mismatch(model, atol_override or manifest.atol)
    except Exception as exc:
        raise ModelLoadError(f"golden replay of {manifest.name} failed: {exc!r}") from exc
    if mismatch:
        raise ModelLoadError(f"{manifest.name} {manifest.version}: {mismatch}")
    rng = np.random.default_rng(0)
    for _ in range(warmup_iterations):
        for batch in (1, warmup_batch):
            model.predict(rng.standard_normal((batch, *model.input_shape), dtype=np.float32))
        model.predict_mc(rng.standard_normal((2, *model.input_shape), dtype=np.float32), 4)
    return model
