"""The one device-memory formula: what a placement holds on the device at its peak.

Used by the compiler (fitting a window into a budget), the planner (a plan's memory) and the runtime (the
figure an out-of-memory message names), so the three can never disagree.
"""

from __future__ import annotations

from .sizes import human_bytes

# Share of a budget kept free for activations when deciding that a whole pipeline fits it.
ACTIVATION_SHARE = 0.1


class BudgetTooSmall(ValueError):
    """The budget cannot hold even the smallest plan; ``minimum`` says what can."""

    def __init__(self, budget: int, minimum: int) -> None:
        super().__init__(
            f"a device budget of {human_bytes(budget)} is below the minimum of {human_bytes(minimum)} "
            "(resident weights + one slot for the largest block, + activations where measured); give at least that much"
        )
        self.budget = budget
        self.minimum = minimum


def device_footprint(resident: int, slot: int, window: int, activations: int = 0) -> int:
    """Device bytes at the peak: ``resident`` weights, ``window`` slots of ``slot`` bytes (the largest streamed
    part of a block), and the ``activations`` a forward needs beyond its weights.

    Example:
        >>> device_footprint(resident=1000, slot=300, window=2, activations=50)
        1650
    """
    return resident + window * slot + activations


def fits_entirely(total_bytes: int, budget: int) -> bool:
    """Whether weights of ``total_bytes`` can all stay resident within ``budget``, with ``ACTIVATION_SHARE`` of it
    left for activations."""
    return total_bytes <= (1 - ACTIVATION_SHARE) * budget
