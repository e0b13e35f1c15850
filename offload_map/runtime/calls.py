"""Counting how often each component runs in one call of the pipeline, for the budget policy."""

from __future__ import annotations

from collections.abc import Callable

from ..collect.components import Role


class CallWatch:
    """Counts each component's forwards per call of the pipeline and tells ``listeners`` when a call ends.

    A call begins with the first component that ever ran and ends when that component runs again after one on the
    other side of the denoising loop ran: the text encoder after a DiT (encoding a negative prompt runs the
    encoders twice within one call), or, when prompt embeddings come from elsewhere and a DiT runs first, the DiT
    after the VAE (or any component that is not a DiT).

    Example:
        >>> watch, calls = CallWatch({"te": Role.ENCODER, "dit": Role.DIT}), []
        >>> watch.listeners.append(calls.append)
        >>> for name in ["te", "te", "dit", "dit", "dit", "te"]:
        ...     watch.forward(name)
        >>> calls
        [{'te': 2, 'dit': 3}]
        >>> watch, calls = CallWatch({"dit": Role.DIT, "vae": Role.VAE}), []
        >>> watch.listeners.append(calls.append)
        >>> for name in ["dit", "dit", "vae", "dit"]:
        ...     watch.forward(name)
        >>> calls
        [{'dit': 2, 'vae': 1}]
    """

    def __init__(self, roles: dict[str, Role]) -> None:
        self.roles = roles
        self.first: str | None = None
        self.counts: dict[str, int] = {}
        self.listeners: list[Callable[[dict[str, int]], None]] = []

    def forward(self, name: str) -> None:
        """Component ``name`` is about to run."""
        if self.first is None:
            self.first = name
        elif name == self.first and any(self._denoises(n) != self._denoises(name) for n in self.counts):
            finished, self.counts = self.counts, {}
            for listener in self.listeners:
                listener(finished)
        self.counts[name] = self.counts.get(name, 0) + 1

    def _denoises(self, name: str) -> bool:
        return self.roles[name] is Role.DIT
