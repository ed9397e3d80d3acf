"""The two MAPPO actors served here, sized for CPU inference.

Each actor cuts its bar matrix into patches of consecutive bars, embeds every patch with one
shared linear layer (a ViT-style patch embedding: cheaper on CPU than a 1-D convolution), and
runs a two-layer MLP trunk into a 3-way policy head (short / neutral / long) and a value head.
Dropout sits after both trunk layers so Monte-Carlo dropout can be asked for at serving time;
``mc_dropout`` runs all passes as one batched forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

ACTIONS: tuple[str, ...] = ("short", "neutral", "long")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    bars: int
    features: int
    patch: int
    embed: int = 16
    hidden: int = 64
    dropout: float = 0.1
    #: Extra hidden-to-hidden trunk layers after the first (0 for the shipped actors): a deeper,
    #: slower model with the same inputs and outputs, e.g. the "twice as slow" test release.
    depth: int = 0

    @property
    def input_shape(self) -> tuple[int, int]:
        return (self.bars, self.features)

    def architecture(self) -> dict[str, Any]:
        return {"class": "PatchActor", **asdict(self)}


SPECS: dict[str, ModelSpec] = {
    "strategic": ModelSpec("strategic", bars=48, features=13, patch=4),
    "tactical": ModelSpec("tactical", bars=60, features=7, patch=5),
}


class PatchActor(nn.Module):
    """Actor network: (B, bars, features) -> policy logits (B, 3) and value (B,)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.bars % spec.patch:
            raise ValueError(f"{spec.name}: bars={spec.bars} is not a multiple of {spec.patch}")
        self.patches = spec.bars // spec.patch
        self.patch_width = spec.patch * spec.features
        self.dropout_p = spec.dropout
        self.n_actions = len(ACTIONS)
        self.embed = nn.Linear(self.patch_width, spec.embed)
        self.fc1 = nn.Linear(self.patches * spec.embed, spec.hidden)
        self.deep = nn.ModuleList([nn.Linear(spec.hidden, spec.hidden) for _ in range(spec.depth)])
        self.fc2 = nn.Linear(spec.hidden, spec.hidden)
        self.policy = nn.Linear(spec.hidden, len(ACTIONS))
        self.value = nn.Linear(spec.hidden, 1)

    def _encode(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        patches = torch.relu(self.embed(x.reshape(batch, self.patches, self.patch_width)))
        hidden = torch.relu(self.fc1(patches.reshape(batch, -1)))
        for layer in self.deep:
            hidden = torch.relu(layer(hidden))
        return hidden

    def _heads(self, hidden: Tensor, dropout_active: bool) -> tuple[Tensor, Tensor]:
        hidden = F.dropout(hidden, self.dropout_p, dropout_active)
        hidden = torch.relu(self.fc2(hidden))
        hidden = F.dropout(hidden, self.dropout_p, dropout_active)
        return self.policy(hidden), self.value(hidden).squeeze(-1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self._encode(x), self.training)

    @torch.jit.export
    def mc_dropout(self, x: Tensor, passes: int) -> tuple[Tensor, Tensor]:
        """Dropout-active logits (passes, B, 3) and values (passes, B) in one batched pass.

        The part before the first dropout is deterministic, so it runs once and only the
        trunk after it is repeated ``passes`` times along the batch dimension.
        """
        hidden = self._encode(x)
        batch = hidden.shape[0]
        logits, value = self._heads(hidden.repeat(passes, 1), True)
        return logits.reshape(passes, batch, self.n_actions), value.reshape(passes, batch)


def build(
    name: str,
    state_dict: dict[str, Tensor] | None = None,
    seed: int = 0,
    *,
    spec: ModelSpec | None = None,
) -> PatchActor:
    """Build actor ``name`` in eval mode from ``state_dict``, or from ``seed`` when none.

    ``spec`` overrides the shipped ``SPECS[name]`` (same inputs and outputs, another size).
    """
    spec = spec or SPECS[name]
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = PatchActor(spec)
    finally:
        torch.random.set_rng_state(generator_state)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()
