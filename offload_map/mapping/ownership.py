"""Which device map entry owns which tensor: the map's one rule, used to size a map and to bind it.

A tensor belongs to the entry with the longest module path that contains the module holding it. A tensor
held in several places (a tied weight, a shared buffer) is owned once: by its first place's entry, or by a
``"gpu"`` entry among its places (a resident copy serves every place); two different moving entries cannot
share one tensor, since it can only move once.
"""

from __future__ import annotations

import difflib

from ..collect.components import Role
from ..collect.tensors import TensorRef
from .placement import Placement


def within(path: str, outer: str) -> bool:
    """Whether module ``path`` is module ``outer`` or inside it (``""``, the root, holds every path).

    Example:
        >>> within("transformer.blocks.0", "transformer"), within("transformer_2.blocks.0", "transformer")
        (True, False)
    """
    return not outer or path == outer or path.startswith(outer + ".")


def owning_component(path: str, components: "dict[str, Role]") -> str:
    """The component that contains module ``path`` (``""`` is the root component of a lone DiT).

    Raises:
        KeyError: no component contains ``path``.

    Example:
        >>> owning_component("transformer.blocks.0", {"transformer": Role.DIT, "vae": Role.VAE})
        'transformer'
    """
    best = None
    for name in components:
        if within(path, name):
            if best is None or len(name) > len(best):
                best = name
    if best is None:
        raise KeyError(f"device map path {path!r} is in no component; components are {list(components)}")
    return best


def owner_entry(module_path: str, entries: "dict[str, object]") -> str | None:
    """The entry (a key of ``entries``) with the longest path containing ``module_path``; None if none does."""
    path = module_path
    while True:
        if path in entries:
            return path
        if not path:
            return None
        path = path.rpartition(".")[0]


def assign_tensors(entries: "dict[str, Placement]", tensors: list[TensorRef]) -> dict[str, list[TensorRef]]:
    """Entry path -> the tensors it owns (see the module docstring), every entry present.

    Raises:
        ValueError: some tensors are covered by no entry, or a tensor is shared by two moving entries.

    Example:
        >>> from torch import nn
        >>> from offload_map.collect.components import ModuleDiscovery
        >>> from offload_map.collect.tensors import collect_tensors
        >>> dit = nn.Module(); dit.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
        >>> owned = assign_tensors({"": Placement.GPU, "blocks.1": Placement.LAYER_WINDOW},
        ...                        collect_tensors(ModuleDiscovery.discover(dit)))
        >>> {path: [t.qualname for t in refs] for path, refs in owned.items()}
        {'': ['blocks.0.weight', 'blocks.0.bias'], 'blocks.1': ['blocks.1.weight', 'blocks.1.bias']}
    """
    owned: dict[str, list[TensorRef]] = {path: [] for path in entries}
    uncovered = []
    for ref in tensors:
        owner = owner_entry(ref.module_path, entries)
        if owner is None:
            uncovered.append(ref.qualname)
            continue
        for alias in ref.aliases:
            other = owner_entry(alias.module_path, entries)
            if other is None or other == owner or entries[owner] is Placement.GPU:
                continue
            if entries[other] is not Placement.GPU:
                raise ValueError(
                    f"{ref.qualname} is shared with {other!r} ({alias.name}), but {owner!r} is {entries[owner].value!r} "
                    f"and {other!r} is {entries[other].value!r}: a shared tensor can only move once. Place one of them 'gpu'"
                )
            owner = other  # a resident copy serves both places
        owned[owner].append(ref)
    if uncovered:
        raise ValueError(
            f"{len(uncovered)} tensors are covered by no device map entry, e.g. {uncovered[:3]}; "
            "add an entry for their component (or one of its modules)"
        )
    return owned


def entry_module(path: str, components: dict, roles: "dict[str, Role]"):
    """The module that entry ``path`` names, given the discovered ``components`` (name -> ``Component``) and the
    map's component ``roles``.

    Raises:
        ValueError: the path is malformed, lies in no component, or names no module of the pipeline.
    """
    if path and "" in path.split("."):
        raise ValueError(
            f"device map entry {path!r} has an empty name between dots; write module paths like 'transformer.blocks.0'"
        )
    try:
        comp = owning_component(path, roles)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    rel = path[len(comp) + 1 :] if comp else path
    module = components[comp].module
    try:
        return module.get_submodule(rel) if rel else module
    except AttributeError:
        known = [f"{comp}.{name}".lstrip(".") for name, _ in module.named_modules() if name]
        close = difflib.get_close_matches(path, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"device map entry {path!r} names no module of the pipeline (component {comp!r} has no {rel!r}){hint}"
        ) from None
