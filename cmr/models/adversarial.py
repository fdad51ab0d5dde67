"""The adversarial parts: gradient reversal, discriminators and the "imagine" generator.

Every discriminator sits behind a gradient reversal layer (GRL). In the forward pass the GRL
is the identity; in the backward pass it multiplies the gradient by -lambda. So with a single
loss and a single optimizer the discriminator descends on its classification loss while the
encoders in front of it ascend on it (they learn to fool it). No alternating generator /
discriminator steps and no second optimizer are needed, which is what lets the whole model
train as one engine under DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from cmr.config import ConfigError
from cmr.models.layers import build_mlp, l2_normalize


@dataclasses.dataclass
class AdversarialConfig:
    modality: bool = True  # modality discriminator: image vs text embeddings
    imagine: bool = True  # generator (text -> imagined image embedding) + its discriminator
    disc_hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [512, 256])
    generator_hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [512, 256])
    negative_slope: float = 0.2  # LeakyReLU
    # GRL strength: "constant" keeps lambda_max; "dann" ramps 0 -> lambda_max over training.
    lambda_schedule: Literal["constant", "dann"] = "dann"
    lambda_max: float = 1.0
    dann_gamma: float = 10.0

    def validate(self) -> None:
        for name in ("disc_hidden_dims", "generator_hidden_dims"):
            dims = getattr(self, name)
            if any(d < 1 for d in dims):
                raise ConfigError(name, f"every size must be >= 1, got {dims}")
        if self.negative_slope < 0:
            raise ConfigError("negative_slope", f"must be >= 0, got {self.negative_slope}")
        if self.lambda_max < 0:
            raise ConfigError("lambda_max", f"must be >= 0, got {self.lambda_max}")
        if self.dann_gamma <= 0:
            raise ConfigError("dann_gamma", f"must be > 0, got {self.dann_gamma}")

    def lambda_at(self, progress: float) -> float:
        """GRL lambda at ``progress`` = fraction of training done, in [0, 1]."""
        if self.lambda_schedule == "constant":
            return self.lambda_max
        return self.lambda_max * dann_lambda(progress, self.dann_gamma)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """The DANN ramp 2 / (1 + exp(-gamma * p)) - 1: 0 at the start, close to 1 at the end.

    Starting at 0 keeps a still-random discriminator from pushing the encoders around.
    """
    if not 0.0 <= progress <= 1.0:  # also rejects NaN
        raise ValueError(f"training progress must be in [0, 1], got {progress}")
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * (-ctx.lambda_), None


class GradientReversal(nn.Module):
    """Identity forward, -lambda * grad backward. Set ``lambda_`` at any time (e.g. every step)."""

    def __init__(self, lambda_: float = 1.0):
        super().__init__()
        self.lambda_ = float(lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGradient.apply(x, self.lambda_)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}"


class Discriminator(nn.Module):
    """GRL -> MLP -> one logit. ``forward(a, b)`` scores two batches in one pass."""

    def __init__(self, embed_dim: int, hidden_dims: list[int], negative_slope: float):
        super().__init__()
        self.grl = GradientReversal()
        self.mlp = build_mlp([embed_dim, *hidden_dims, 1], negative_slope)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One pass over the concatenation: the MLP has no batch statistics, so this equals two
        # separate passes but launches half the kernels.
        logits = self.mlp(self.grl(torch.cat([a, b]))).squeeze(-1)
        return logits[: a.shape[0]], logits[a.shape[0] :]


class ImagineGenerator(nn.Module):
    """Text embedding -> "imagined" image embedding, on the unit sphere like the real ones."""

    def __init__(self, embed_dim: int, hidden_dims: list[int], negative_slope: float):
        super().__init__()
        self.mlp = build_mlp([embed_dim, *hidden_dims, embed_dim], negative_slope)

    def forward(self, txt_emb: torch.Tensor) -> torch.Tensor:
        return l2_normalize(torch.tanh(self.mlp(txt_emb)))
