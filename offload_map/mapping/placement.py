"""The vocabulary of a device map: where a module's weights live."""

from __future__ import annotations

from enum import Enum


class Placement(str, Enum):
    """Where a module's weights live while the pipeline runs.

    - ``GPU`` (``"gpu"``): resident on the target device for the whole run.
    - ``CPU_PINNED`` (``"cpu-pinned"``): a component that lives in pinned host memory; it is copied to the
      device just before it runs and dropped from it when a component it excludes runs. Entries inside it
      (its blocks ``"layer-window"``, modules kept ``"gpu"``) take their own tensors; it moves the rest.
    - ``LAYER_WINDOW`` (``"layer-window"``): one block of a component's block list (a DiT's, a text
      encoder's), streamed through a small ring of device slots while the neighbouring blocks compute.

    Example:
        >>> Placement.parse("gpu", "entry 'vae'")
        <Placement.GPU: 'gpu'>
    """

    GPU = "gpu"
    CPU_PINNED = "cpu-pinned"
    LAYER_WINDOW = "layer-window"

    @classmethod
    def parse(cls, value: "str | Placement", where: str) -> "Placement":
        """Return the placement named by ``value``; ``where`` names the entry for the error message."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(p.value) for p in cls)
            raise ValueError(f"{where}: unknown placement {value!r}; expected one of {valid}") from None
