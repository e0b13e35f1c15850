"""The components' forwards in one call of the pipeline: how often each runs (for the budget policy), and which
runs next (so that it can come onto the device while the one before finishes)."""

from __future__ import annotations

from collections.abc import Callable

from ..collect.components import Role


class CallWatch:
    """Counts each component's forwards per call of the pipeline, tells ``listeners`` when a call ends, and predicts
    the component that runs next from the last call (``next_other``).

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

    Prediction: a call that has run as the last one so far runs on as it did. Only an encoder's successor is
    predicted: a DiT's forwards per call follow the number of steps, which changes from call to call, so what
    runs after a DiT's forward is not known until it runs.

        >>> watch = CallWatch({"clip": Role.ENCODER, "t5": Role.ENCODER, "dit": Role.DIT})
        >>> for name in ["clip", "t5", "dit", "dit", "clip"]:
        ...     watch.forward(name)
        >>> watch.next_other()  # the last call ran T5 after CLIP
        't5'
        >>> watch.forward("t5"); watch.next_other()
        'dit'
        >>> watch.forward("dit"); watch.next_other() is None  # a DiT's successor is not predicted
        True
    """

    def __init__(self, roles: dict[str, Role]) -> None:
        self.roles = roles
        self.first: str | None = None
        self.counts: dict[str, int] = {}
        self.order: list[str] = []  # this call's forwards so far
        self.last: list[str] = []  # the last complete call's forwards
        self.on_track = False  # whether this call has run as the last one so far
        self.listeners: list[Callable[[dict[str, int]], None]] = []

    def forward(self, name: str) -> None:
        """Component ``name`` is about to run."""
        if self.first is None:
            self.first = name
        elif name == self.first and any(self._denoises(n) != self._denoises(name) for n in self.counts):
            finished, self.counts = self.counts, {}
            self.last, self.order, self.on_track = self.order, [], True
            for listener in self.listeners:
                listener(finished)
        position = len(self.order)
        self.on_track = self.on_track and position < len(self.last) and self.last[position] == name
        self.order.append(name)
        self.counts[name] = self.counts.get(name, 0) + 1

    def next_other(self) -> str | None:
        """The component expected to run right after the current forward, if it is another one and the current one
        is an encoder (see the class docstring); else None."""
        position = len(self.order)
        if not self.on_track or position >= len(self.last) or self.roles[self.order[-1]] is not Role.ENCODER:
            return None
        following = self.last[position]
        return following if following != self.order[-1] else None

    def _denoises(self, name: str) -> bool:
        return self.roles[name] is Role.DIT
