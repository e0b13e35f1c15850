"""Undoing a list of things so that an interrupted undo can be finished by calling it again."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def undo_each(pending: list[T], undo: Callable[[T], None]) -> None:
    """``undo`` every item of ``pending``, last first, taking each off the list only once undone: after an interrupt
    (Ctrl-C) the rest stays for the next call. An item whose undo raises an error is taken off too, and does not stop
    the others; the first error is raised once all were tried.

    Example:
        >>> pending, done = [1, 2, 3], []
        >>> undo_each(pending, done.append)
        >>> done, pending
        ([3, 2, 1], [])
    """
    error = None
    while pending:
        try:
            undo(pending[-1])
        except Exception as err:
            error = error or err
        pending.pop()
    if error is not None:
        raise error
