"""Gaussian-weighted prompt aggregation (GPA): the prompts PromptSRC keeps are a weighted
sum of the prompts at the end of each epoch, epoch ``e`` (1-based) weighted by the normal
density ``N(e; mean, std)``, the weights normalised over the run's epochs."""

from __future__ import annotations

import math

import torch
from torch import nn


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """The weight of each epoch ``e = 1 .. epochs``: ``N(e; mean, std)`` normalised to sum 1.

    Computed from the log-densities less their maximum (the density's constant factor
    cancels in the normalisation), so epochs far from ``mean`` never make every weight
    underflow to 0."""
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(logs)
    raw = [math.exp(v - top) for v in logs]
    total = sum(raw)
    return [v / total for v in raw]


class GaussianAggregate(nn.Module):
    """The running weighted sum of some parameters, one buffer each (``state_dict`` keys
    ``<name with '.' as '__'>``), so that it is saved with the training state and a run
    resumed after a kill goes on summing where it stopped."""

    def __init__(self, params: dict[str, nn.Parameter], mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std
        self._params = list(params.items())  # a plain list: the method owns (and registers) them
        for name, p in self._params:
            self.register_buffer(self._key(name), torch.zeros_like(p, dtype=torch.float32))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @torch.no_grad()
    def add(self, epoch: int, epochs: int) -> float:
        """Add the parameters as they are after ``epoch`` (0-based) of ``epochs``, with
        that epoch's weight; returns the weight."""
        weight = gpa_weights(epochs, self.mean, self.std)[epoch]
        for name, p in self._params:
            total = getattr(self, self._key(name))
            total.copy_(total + p.detach().float() * weight)
        return weight

    @torch.no_grad()
    def load_into_parameters(self) -> None:
        """Replace each parameter by its aggregate."""
        for name, p in self._params:
            p.copy_(getattr(self, self._key(name)))
