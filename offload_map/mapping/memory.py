"""The one device-memory formula: what a placement holds on the device at its peak.

Used by the compiler (fitting a window into a budget), the planner (a plan's memory) and the runtime (the
figure an out-of-memory message names), so the three can never disagree.
"""

from __future__ import annotations

from .sizes import human_bytes

# Share of a budget kept free for activations when deciding that a whole pipeline fits it.
ACTIVATION_SHARE = 0.1
# Compressed blocks (``compression``) are copied in pieces of at most CODE_PIECE bytes through STAGING_BUFFERS
# device buffers of one piece each (``runtime.coded_host``, ``runtime.fp8_host``, ``runtime.slots.Staging``),
# taken in turn: while the decode stream decodes one, the copy stream fills the other, so a decode waiting for
# the compute stream's kernels to leave room does not stop the link. Each piece costs the host a copy, a decode
# launch and four events: SD3.5-medium's lossless step, which the host paces on the H200, took a median 0.937x as
# long with 128 MiB pieces as with 64 MiB ones (25 rounds, ``interleaved_sd35-medium_pieces.jsonl``); with 256 MiB
# (one piece a block) a decode waits for its block's whole copy.
CODE_PIECE = 128 << 20
STAGING_BUFFERS = 2


class BudgetTooSmall(ValueError):
    """The budget cannot hold even the smallest plan; ``minimum`` says what can."""

    def __init__(self, budget: int, minimum: int) -> None:
        super().__init__(
            f"a device budget of {human_bytes(budget)} is below the minimum of {human_bytes(minimum)} "
            "(resident weights + one slot for the largest block and its component's pinned weights outside the "
            "blocks, + activations where measured, + staging buffers where blocks are compressed); give at least "
            "that much"
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


def staging_footprint(largest_block: int) -> int:
    """Device bytes of a compressed component's staging buffers, as a map is compiled (before anything is coded): a
    piece's code is taken to be as large as its raw bytes. The runtime sizes them from the code itself."""
    return STAGING_BUFFERS * min(largest_block, CODE_PIECE)


def fits_entirely(total_bytes: int, budget: int) -> bool:
    """Whether weights of ``total_bytes`` can all stay resident within ``budget``, with ``ACTIVATION_SHARE`` of it
    left for activations."""
    return total_bytes <= (1 - ACTIVATION_SHARE) * budget
