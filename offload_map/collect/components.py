"""Discovering a pipeline's components: which modules are DiTs, encoders, VAEs, or something else.

A pipeline is a diffusers ``DiffusionPipeline`` (its ``components``), any object whose attributes are
``nn.Module``s, or an ``nn.Module`` (its children). A pipeline class may declare its components with
vllm-omni's class attributes ``_dit_modules``, ``_encoder_modules``, ``_vae_modules`` and
``_resident_modules`` (dotted paths allowed); otherwise components are classified by name
(``transformer*``, ``unet*``, ``prior``, ``dit`` are DiTs; ``text_encoder*``, ``image_encoder``, ``mllm``
are encoders; ``vae*``, ``audio_vae``, ``vqvae``, ``movq`` are VAEs). An ``nn.Module`` none of whose
children is recognised but which has block lists is itself the one DiT (its component name is ``""``).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from enum import Enum

from torch import nn

from .blocks import KNOWN_BLOCK_ATTRS, get_blocks, get_blocks_attr_names

logger = logging.getLogger("offload_map")


class Role(str, Enum):
    """What a pipeline component does; decides which components may share the device."""

    DIT = "dit"
    ENCODER = "encoder"
    VAE = "vae"
    OTHER = "other"

    def excludes(self, other: "Role") -> bool:
        """Whether a pinned component of this role must leave the device before one of ``other`` runs.

        Encoders run together (CLIP then T5) and so do VAEs; every DiT runs alone, so Wan2.2's two
        experts exclude each other. Components of role ``OTHER`` never evict and are never evicted.
        """
        if Role.OTHER in (self, other):
            return False
        if self is Role.DIT:
            return True
        return self is not other


_PROTOCOL = {"_dit_modules": Role.DIT, "_encoder_modules": Role.ENCODER, "_vae_modules": Role.VAE}
_DIT_NAMES = ("transformer", "unet", "prior", "dit", "denoiser")
_ENCODER_NAMES = ("text_encoder", "image_encoder", "mllm", "audio_encoder")
_VAE_NAMES = ("vae", "audio_vae", "vqvae", "movq")


@dataclass(frozen=True)
class Component:
    """One top-level module of a pipeline: its name (dotted path from the pipeline), module and role."""

    name: str
    module: nn.Module
    role: Role
    resident: bool = False
    auxiliary: bool = False
    _blocks: list = field(default_factory=list, repr=False, compare=False)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """``(path, block)`` of every block of the component's block lists (``blocks.get_blocks``), paths from
        the pipeline; found once, on first use.

        Raises:
            AttributeError: the class declares a block list that is not a registered child container.
        """
        if not self._blocks:
            self._blocks.append([(f"{self.name}.{path}".lstrip("."), block) for path, block in get_blocks(self.module)])
        return self._blocks[0]

    def known_blocks(self) -> list[tuple[str, nn.Module]]:
        """``blocks()``, or none where the class declares its block lists wrongly (that error is raised where the
        blocks are needed: streaming the component)."""
        try:
            return self.blocks()
        except AttributeError:
            return []


@dataclass
class PipelineModules:
    """The components of a pipeline, in discovery order, grouped by role.

    Example:
        >>> from torch import nn
        >>> pipe = nn.Module(); pipe.text_encoder = nn.Linear(2, 2); pipe.vae = nn.Linear(2, 2)
        >>> ModuleDiscovery.discover(pipe).names(Role.VAE)
        ['vae']
    """

    components: dict[str, Component] = field(default_factory=dict)

    def names(self, role: Role) -> list[str]:
        """Names of the components that play ``role``."""
        return [c.name for c in self.components.values() if c.role is role]

    def modules(self, role: Role) -> list[nn.Module]:
        """Modules of the components that play ``role``."""
        return [c.module for c in self.components.values() if c.role is role]

    @property
    def dits(self) -> list[nn.Module]:
        return self.modules(Role.DIT)

    @property
    def encoders(self) -> list[nn.Module]:
        return self.modules(Role.ENCODER)

    @property
    def vaes(self) -> list[nn.Module]:
        return self.modules(Role.VAE)

    @property
    def resident(self) -> list[nn.Module]:
        return [c.module for c in self.components.values() if c.resident]

    # vllm-omni's names for the same lists.
    @property
    def dit_names(self) -> list[str]:
        return self.names(Role.DIT)

    @property
    def encoder_names(self) -> list[str]:
        return self.names(Role.ENCODER)

    @property
    def vae_names(self) -> list[str]:
        return self.names(Role.VAE)

    @property
    def resident_modules(self) -> list[nn.Module]:
        return self.resident

    @property
    def resident_names(self) -> list[str]:
        return [c.name for c in self.components.values() if c.resident]

    @property
    def auxiliaries(self) -> list[nn.Module]:
        return [c.module for c in self.components.values() if c.auxiliary]

    @property
    def auxiliary_names(self) -> list[str]:
        return [c.name for c in self.components.values() if c.auxiliary]

    def outermost_dits(self) -> tuple[list[str], list[nn.Module]]:
        """The DiTs that no other DiT contains (a DiT nested in another is offloaded with it), as (names, modules).

        Example:
            >>> from torch import nn
            >>> pipe = nn.Module(); pipe.transformer = nn.Sequential(nn.Linear(2, 2)); pipe.dit = pipe.transformer[0]
            >>> ModuleDiscovery.discover(pipe).outermost_dits()[0]
            ['transformer']
        """
        dits = [(c.name, c.module) for c in self.components.values() if c.role is Role.DIT]
        outer = [
            (name, module)
            for name, module in dits
            if not any(other is not module and any(m is module for m in other.modules()) for _, other in dits)
        ]
        return [name for name, _ in outer], [module for _, module in outer]


class ModuleDiscovery:
    """Finds a pipeline's components (see the module docstring for the rules)."""

    @staticmethod
    def discover(pipeline: object) -> PipelineModules:
        """Return the components of ``pipeline`` (none, if it holds no ``nn.Module``: ``discover_components`` refuses
        that).

        Example:
            >>> from torch import nn
            >>> pipe = nn.Module(); pipe.transformer = nn.Linear(2, 2); pipe.text_encoder = nn.Linear(2, 2)
            >>> list(ModuleDiscovery.discover(pipe).components)
            ['transformer', 'text_encoder']
        """
        found = PipelineModules()
        seen: set[int] = set()
        declared = _declared_components(pipeline)
        pairs = (
            declared if declared is not None else [(n, m, _role_by_name(n), False, False) for n, m in _named_modules(pipeline)]
        )
        for name, module, role, resident, auxiliary in pairs:
            if id(module) in seen:
                continue
            seen.add(id(module))
            found.components[name] = Component(name, module, role, resident, auxiliary)
        if declared is not None:
            for name, module in _named_modules(pipeline):
                if id(module) not in seen:
                    seen.add(id(module))
                    found.components[name] = Component(name, module, Role.OTHER)
        if isinstance(pipeline, nn.Module) and declared is None and _is_lone_dit(pipeline, found):
            found = PipelineModules({"": Component("", pipeline, Role.DIT)})
        return found


def discover_components(pipeline: object) -> PipelineModules:
    """``ModuleDiscovery.discover``, refusing a pipeline with nothing to place.

    Raises:
        TypeError: the pipeline holds no ``nn.Module`` at all.
    """
    found = ModuleDiscovery.discover(pipeline)
    if not found.components:
        raise TypeError(
            f"{type(pipeline).__name__} holds no nn.Module: pass a diffusers pipeline, an object whose "
            "attributes are nn.Modules, or an nn.Module"
        )
    return found


def _is_lone_dit(module: nn.Module, found: PipelineModules) -> bool:
    # A DiT passed on its own: its class declares (or the registry knows) its block lists, or none of its
    # children looks like a pipeline component and it has block lists or no children at all.
    cls = type(module)
    if hasattr(cls, "_layerwise_offload_blocks_attrs") or cls.__name__ in KNOWN_BLOCK_ATTRS:
        return True
    if any(c.role is not Role.OTHER for c in found.components.values()):
        return False
    return not found.components or bool(get_blocks_attr_names(module))


def _named_modules(pipeline: object) -> list[tuple[str, nn.Module]]:
    components = getattr(pipeline, "components", None)
    if isinstance(components, dict):
        items = components.items()
    elif isinstance(pipeline, nn.Module):
        items = pipeline.named_children()
    else:
        items = getattr(pipeline, "__dict__", {}).items()
    return [(n, m) for n, m in items if isinstance(m, nn.Module) and not n.startswith("_")]


def _declared_components(pipeline: object) -> list[tuple[str, nn.Module, Role, bool, bool]] | None:
    cls = type(pipeline)
    if not any(hasattr(cls, attr) for attr in (*_PROTOCOL, "_resident_modules", "_auxiliary_modules")):
        return None
    resident = set(getattr(cls, "_resident_modules", ()) or ())
    auxiliary = set(getattr(cls, "_auxiliary_modules", ()) or ())
    out = []
    for attr, role in (*_PROTOCOL.items(), ("_resident_modules", Role.OTHER), ("_auxiliary_modules", Role.OTHER)):
        for path in getattr(cls, attr, ()) or ():
            try:
                module = operator.attrgetter(path)(pipeline)
            except AttributeError:
                logger.warning("%s.%s names %r, which the pipeline does not have; skipped", cls.__name__, attr, path)
                continue
            if isinstance(module, nn.Module):
                out.append((path, module, role, path in resident, path in auxiliary))
    return out


def _role_by_name(name: str) -> Role:
    base = name.rsplit(".", 1)[-1]
    for names, role in ((_DIT_NAMES, Role.DIT), (_ENCODER_NAMES, Role.ENCODER), (_VAE_NAMES, Role.VAE)):
        if any(base == n or base.startswith(n + "_") for n in names):
            return role
    return Role.OTHER
