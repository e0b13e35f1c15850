"""Finding block lists (``offload_map.blocks``) and pipeline components (``offload_map.module_collector``).

1. Registry: every class named in ``KNOWN_BLOCK_ATTRS`` exists in diffusers, and a tiny random-weight
   instance of it has exactly the registered block lists, which hold most of its parameters.
2. Protocol: ``_layerwise_offload_blocks_attrs`` (and the deprecated ``_layerwise_offload_blocks_attr``)
   is obeyed, and a wrong declaration is an error, never a silent fall-back.
3. Heuristic: without a declaration or a registry entry, the big lists of same-typed blocks are found.
4. Discovery: components are classified by name or by vllm-omni's ``_dit_modules`` & co.
"""

from __future__ import annotations

import functools
import logging
import warnings
from types import SimpleNamespace

import diffusers
import pytest
import torch
from torch import nn

from offload_map import Role, dispatch_pipeline
from offload_map.collect.blocks import (
    KNOWN_BLOCK_ATTRS,
    get_blocks,
    get_blocks_attr_names,
)
from offload_map.module_collector import ModuleDiscovery

# ---------------------------------------------------------------------------------------------------------
# Tiny configs: constructor kwargs for every class of the registry. Small widths (hidden 32, 2 heads of 16),
# two blocks per list, so that each model builds in milliseconds with random weights.
# ---------------------------------------------------------------------------------------------------------

_WAN = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32, freq_dim=16,
    ffn_dim=64, num_layers=2, rope_max_seq_len=32,
)  # fmt: skip
_HUNYUAN = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
    num_refiner_layers=1, patch_size=1, text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
)  # fmt: skip
_UNET = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16)

TINY_CONFIGS: dict[str, dict] = {
    "FluxTransformer2DModel": dict(
        in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ),
    "Flux2Transformer2DModel": dict(
        in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
    ),
    "ChromaTransformer2DModel": dict(
        in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=32,
        approximator_layers=1,
    ),
    "HunyuanVideoTransformer3DModel": dict(_HUNYUAN),
    "HunyuanVideoFramepackTransformer3DModel": dict(_HUNYUAN, image_proj_dim=32),
    "SD3Transformer2DModel": dict(
        sample_size=8, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=8,
    ),
    "QwenImageTransformer2DModel": dict(
        in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ),
    "LTXVideoTransformer3DModel": dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=2, caption_channels=32,
    ),
    "CogVideoXTransformer3DModel": dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, max_text_seq_length=8,
    ),
    "CogView4Transformer2DModel": dict(
        in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2, text_embed_dim=32,
        time_embed_dim=32, condition_dim=8, pos_embed_max_size=8, sample_size=8, rope_axes_dim=(8, 8),
    ),
    "PixArtTransformer2DModel": dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, norm_num_groups=1,
        cross_attention_dim=32, sample_size=8, caption_channels=32,
    ),
    "SanaTransformer2DModel": dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=8,
    ),
    "AuraFlowTransformer2DModel": dict(
        sample_size=8, in_channels=4, out_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        pos_embed_max_size=16,
    ),
    "MochiTransformer3DModel": dict(
        num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=32, in_channels=4,
        text_embed_dim=32, time_embed_dim=16, max_sequence_length=8,
    ),
    "AllegroTransformer3DModel": dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=32, sample_height=8, sample_width=8, sample_frames=4, caption_channels=32,
    ),
    "StableAudioDiTModel": dict(
        sample_size=8, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        num_key_value_attention_heads=1, cross_attention_dim=32, time_proj_dim=16, global_states_input_dim=32,
        cross_attention_input_dim=32,
    ),
    "WanTransformer3DModel": dict(_WAN),
    "WanVACETransformer3DModel": dict(_WAN, vace_layers=[0], vace_in_channels=8),  # 1 VACE block per 2, as 8 per 40
    "SkyReelsV2Transformer3DModel": dict(_WAN),
    "Lumina2Transformer2DModel": dict(
        sample_size=8, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1, num_attention_heads=2,
        num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(16, 16, 16), cap_feat_dim=32,
    ),
    "UNet2DConditionModel": dict(
        _UNET, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "UNet3DConditionModel": dict(
        _UNET, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    ),
    # Its GroupNorms have a fixed 32 groups, hence the wider channels.
    "UNetSpatioTemporalConditionModel": dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16,
        num_attention_heads=(2, 4), addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, num_frames=2,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    ),
    "UNetMotionModel": dict(
        _UNET, num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=4,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
    ),
}  # fmt: skip

# The share of parameters the registered block lists must hold in the tiny model. At real sizes the blocks
# hold 80-99% of a DiT; at width 32 the embedders weigh relatively more, so 50% is the general floor.
# Exceptions, each because of parameters outside the registered lists:
MIN_BLOCK_SHARE: dict[str, float] = {
    # the token refiner (context_embedder) and the guidance/text embedders are wide compared to width 32
    "HunyuanVideoTransformer3DModel": 0.4,
    "HunyuanVideoFramepackTransformer3DModel": 0.4,
    # UNet3D has transformer_in outside the lists
    "UNet3DConditionModel": 0.4,
}
DEFAULT_MIN_BLOCK_SHARE = 0.5


@functools.cache
def build_tiny(class_name: str) -> nn.Module:
    """A tiny, randomly initialised instance of the diffusers class ``class_name`` (cached: treat as read-only)."""
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        pytest.fail(f"KNOWN_BLOCK_ATTRS names {class_name!r}, which diffusers {diffusers.__version__} does not have")
    if class_name not in TINY_CONFIGS:
        pytest.fail(f"KNOWN_BLOCK_ATTRS names {class_name!r}; add a tiny config for it to TINY_CONFIGS")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.simplefilter("ignore")  # diffusers' deprecation chatter from inside constructors
        return cls(**TINY_CONFIGS[class_name]).eval()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------
# 1. Registry
# ---------------------------------------------------------------------------------------------------------


def test_every_registry_entry_has_a_tiny_config_and_every_tiny_config_a_registry_entry():
    assert sorted(TINY_CONFIGS) == sorted(KNOWN_BLOCK_ATTRS)


@pytest.mark.parametrize("class_name", list(KNOWN_BLOCK_ATTRS))
def test_registered_class_exists_in_diffusers(class_name):
    if not hasattr(diffusers, class_name):
        pytest.fail(f"KNOWN_BLOCK_ATTRS names {class_name!r}, which diffusers {diffusers.__version__} does not have")


@pytest.mark.parametrize("class_name", list(KNOWN_BLOCK_ATTRS))
def test_registered_block_lists_are_found_and_hold_the_bulk_of_the_model(class_name):
    model = build_tiny(class_name)
    expected = list(KNOWN_BLOCK_ATTRS[class_name])

    assert get_blocks_attr_names(model) == expected

    blocks = get_blocks(model)
    paths = [path for path, _ in blocks]
    # every list contributes all of its blocks, list by list in registry order; a single module (a UNet's
    # mid_block) is one block
    expected_paths = []
    for name in expected:
        container = dict(model.named_children())[name]
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            expected_paths.append(name)
            continue
        assert len(container) >= 1, f"{class_name}.{name} is empty in the tiny config"
        expected_paths += [f"{name}.{child}" for child, _ in container.named_children()]
    assert paths == expected_paths
    # each block is the registered submodule at its path
    registered = dict(model.named_modules())
    for path, block in blocks:
        assert registered.get(path) is block, f"{class_name}: {path} is not a registered submodule"
    # together they hold most of the parameters
    share = sum(n_params(block) for _, block in blocks) / n_params(model)
    floor = MIN_BLOCK_SHARE.get(class_name, DEFAULT_MIN_BLOCK_SHARE)
    assert share > floor, f"{class_name}: the registered blocks hold {share:.0%} of the parameters, not > {floor:.0%}"


def test_registry_is_looked_up_by_class_name_and_its_names_must_exist():
    # A class that merely shares a registered name gets the registry's names, which it must have.
    impostor = type("WanTransformer3DModel", (nn.Module,), {})()
    impostor.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
    with pytest.raises(AttributeError, match=r"WanTransformer3DModel.*'blocks'"):
        get_blocks_attr_names(impostor)


def test_a_class_declaration_takes_precedence_over_the_registry():
    def init(self):
        nn.Module.__init__(self)
        self.transformer_blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.single_transformer_blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    cls = type(
        "FluxTransformer2DModel",
        (nn.Module,),
        {"__init__": init, "_layerwise_offload_blocks_attrs": ["single_transformer_blocks"]},
    )
    assert get_blocks_attr_names(cls()) == ["single_transformer_blocks"]


# ---------------------------------------------------------------------------------------------------------
# 2. The class-attribute protocol
# ---------------------------------------------------------------------------------------------------------


def _list(n: int = 3, dim: int = 8) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(dim, dim) for _ in range(n))


class TwoLists(nn.Module):
    _layerwise_offload_blocks_attrs = ["a", "b"]

    def __init__(self):
        super().__init__()
        self.b = _list(2)  # registered first: the declaration, not registration order, decides
        self.a = _list(3)


def test_declared_lists_are_returned_in_declared_order():
    model = TwoLists()
    assert get_blocks_attr_names(model) == ["a", "b"]
    assert [p for p, _ in get_blocks(model)] == ["a.0", "a.1", "a.2", "b.0", "b.1"]


def test_declared_tuple_is_accepted_and_returned_as_a_list():
    class Tupled(TwoLists):
        _layerwise_offload_blocks_attrs = ("b", "a")

    assert get_blocks_attr_names(Tupled()) == ["b", "a"]


def test_legacy_single_name_works_with_a_deprecation_warning():
    class Legacy(nn.Module):
        _layerwise_offload_blocks_attr = "blocks"

        def __init__(self):
            super().__init__()
            self.blocks = _list()

    with pytest.warns(DeprecationWarning, match="_layerwise_offload_blocks_attrs"):
        assert get_blocks_attr_names(Legacy()) == ["blocks"]


def test_new_declaration_wins_over_the_legacy_one_without_warning():
    class Both(TwoLists):
        _layerwise_offload_blocks_attr = "a"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_blocks_attr_names(Both()) == ["a", "b"]


def test_declared_name_that_is_missing_raises_naming_class_and_attribute():
    class Misdeclared(nn.Module):
        _layerwise_offload_blocks_attrs = ["blocks", "single_blocks"]

        def __init__(self):
            super().__init__()
            self.blocks = _list()

    with pytest.raises(AttributeError) as info:
        get_blocks_attr_names(Misdeclared())
    assert "Misdeclared" in str(info.value) and "'single_blocks'" in str(info.value)


def test_declared_name_that_is_a_property_raises_instead_of_falling_back():
    # The MAGI-2 shape: the real blocks are registered under another child; `blocks` is only a property.
    class Magi(nn.Module):
        _layerwise_offload_blocks_attrs = ["blocks"]

        def __init__(self):
            super().__init__()
            self.videodit_blocks = nn.Module()
            self.videodit_blocks.layers = _list(4)
            self.head = nn.Linear(8, 8)

        @property
        def blocks(self) -> nn.ModuleList:
            return self.videodit_blocks.layers

    with pytest.raises(AttributeError) as info:
        get_blocks_attr_names(Magi())
    message = str(info.value)
    assert "Magi" in message and "'blocks'" in message and "not a registered child" in message
    with pytest.raises(AttributeError):
        get_blocks(Magi())


def test_declared_name_that_is_a_plain_python_list_raises():
    class PlainList(nn.Module):
        _layerwise_offload_blocks_attrs = ["blocks"]

        def __init__(self):
            super().__init__()
            self.owner = _list()
            self.__dict__["blocks"] = list(self.owner)  # visible as an attribute, invisible to the module tree

    with pytest.raises(AttributeError, match="PlainList.*'blocks'"):
        get_blocks_attr_names(PlainList())


def test_declared_string_instead_of_a_list_raises_type_error():
    class Stringy(nn.Module):
        _layerwise_offload_blocks_attrs = "blocks"

        def __init__(self):
            super().__init__()
            self.blocks = _list()

    with pytest.raises(TypeError, match=r"Stringy.*\['blocks'\]"):
        get_blocks_attr_names(Stringy())


def test_a_declared_list_that_is_a_single_module_counts_as_one_block():
    class WithMid(nn.Module):
        _layerwise_offload_blocks_attrs = ["down", "mid", "up"]

        def __init__(self):
            super().__init__()
            self.down, self.mid, self.up = _list(2), nn.Linear(8, 8), _list(2)

    model = WithMid()
    assert [p for p, _ in get_blocks(model)] == ["down.0", "down.1", "mid", "up.0", "up.1"]
    assert dict(get_blocks(model))["mid"] is model.mid


# ---------------------------------------------------------------------------------------------------------
# 3. The heuristic (plain nn.Modules: no declaration, no registry entry)
# ---------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


class SingleBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)


def test_heuristic_finds_one_big_list_of_same_typed_blocks():
    model = nn.Module()
    model.embed = nn.Linear(16, 32)
    model.blocks = nn.ModuleList(Block(32) for _ in range(4))
    model.norm_out = nn.LayerNorm(32)
    model.proj_out = nn.Linear(32, 16)
    assert get_blocks_attr_names(model) == ["blocks"]
    assert len(get_blocks(model)) == 4


def test_heuristic_takes_two_lists_that_together_hold_most_parameters_in_declaration_order():
    # neither list holds half of the parameters alone; the larger one is declared second
    model = nn.Module()
    model.embed = nn.Linear(64, 64)  # ~9%
    model.double_blocks = nn.ModuleList(Block(32) for _ in range(2))  # ~37%
    model.single_blocks = nn.ModuleList(SingleBlock(64) for _ in range(5))  # ~45%
    model.proj_out = nn.Linear(64, 64)
    total = n_params(model)
    assert 2 * n_params(model.double_blocks) < total and 2 * n_params(model.single_blocks) < total
    assert n_params(model.single_blocks) > n_params(model.double_blocks)

    assert get_blocks_attr_names(model) == ["double_blocks", "single_blocks"]
    paths = [p for p, _ in get_blocks(model)]
    assert paths == ["double_blocks.0", "double_blocks.1"] + [f"single_blocks.{i}" for i in range(5)]


def test_heuristic_keeps_a_second_list_that_holds_a_large_share_too():
    model = nn.Module()
    model.embed = nn.Linear(16, 16)
    model.double_blocks = nn.ModuleList(Block(32) for _ in range(6))  # ~54%
    model.single_blocks = nn.ModuleList(Block(32) for _ in range(5))  # ~45%
    assert 2 * n_params(model.double_blocks) > n_params(model)
    assert get_blocks_attr_names(model) == ["double_blocks", "single_blocks"]


def test_a_block_list_named_like_a_module_method_yields_its_blocks():
    model = nn.Module()
    model.double = nn.ModuleList(Block(32) for _ in range(3))  # nn.Module.double() shadows the child
    model.head = nn.Linear(8, 8)
    assert get_blocks_attr_names(model) == ["double"]
    assert [p for p, _ in get_blocks(model)] == ["double.0", "double.1", "double.2"]


def test_heuristic_ignores_a_list_of_mixed_module_types():
    model = nn.Module()
    model.embed = nn.Linear(8, 8)
    model.layers = nn.ModuleList([Block(32), SingleBlock(32), Block(32), SingleBlock(32)])
    assert get_blocks_attr_names(model) == []


def test_heuristic_ignores_lists_of_fewer_than_two_blocks():
    model = nn.Module()
    model.blocks = nn.ModuleList([Block(32)])
    model.head = nn.Linear(4, 4)
    assert get_blocks_attr_names(model) == []


def test_heuristic_ignores_lists_holding_half_of_the_parameters_or_less():
    model = nn.Module()
    model.blocks = nn.ModuleList(SingleBlock(8) for _ in range(3))
    model.head = nn.Linear(64, 64)
    assert get_blocks_attr_names(model) == []


def test_heuristic_finds_nothing_in_a_model_without_lists():
    model = nn.Module()
    model.embed = nn.Linear(8, 32)
    model.body = Block(32)
    model.head = nn.Linear(32, 8)
    assert get_blocks_attr_names(model) == []
    assert get_blocks(model) == []
    assert get_blocks_attr_names(nn.Linear(4, 4)) == []


# ---------------------------------------------------------------------------------------------------------
# 4. Discovery
# ---------------------------------------------------------------------------------------------------------


def _roles(found) -> dict[str, Role]:
    return {name: comp.role for name, comp in found.components.items()}


def test_diffusers_like_object_components_are_classified_by_name():
    pipe = SimpleNamespace()
    pipe.transformer = nn.Linear(4, 4)
    pipe.transformer_2 = nn.Linear(4, 4)
    pipe.text_encoder = nn.Linear(4, 4)
    pipe.text_encoder_2 = nn.Linear(4, 4)
    pipe.image_encoder = nn.Linear(4, 4)
    pipe.vae = nn.Linear(4, 4)
    pipe.controlnet = nn.Linear(4, 4)
    pipe.scheduler = object()  # not a module
    pipe.tokenizer = "a tokenizer"  # not a module
    pipe.transformer_ema = pipe.transformer  # the same module under a second name
    pipe._private = nn.Linear(4, 4)  # private attributes are not components

    found = ModuleDiscovery.discover(pipe)

    assert _roles(found) == {
        "transformer": Role.DIT,
        "transformer_2": Role.DIT,
        "text_encoder": Role.ENCODER,
        "text_encoder_2": Role.ENCODER,
        "image_encoder": Role.ENCODER,
        "vae": Role.VAE,
        "controlnet": Role.OTHER,
    }
    assert list(found.components) == list(_roles(found))  # discovery order is attribute order
    assert found.dits == [pipe.transformer, pipe.transformer_2]
    assert found.encoders == [pipe.text_encoder, pipe.text_encoder_2, pipe.image_encoder]
    assert found.vaes == [pipe.vae]
    assert found.names(Role.OTHER) == ["controlnet"]
    assert found.resident == []


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("unet", Role.DIT), ("prior", Role.DIT), ("dit", Role.DIT), ("denoiser", Role.DIT), ("transformer_3", Role.DIT),
        ("mllm", Role.ENCODER), ("audio_encoder", Role.ENCODER), ("text_encoder_3", Role.ENCODER),
        ("vae", Role.VAE), ("audio_vae", Role.VAE), ("vqvae", Role.VAE), ("movq", Role.VAE),
        ("transformerx", Role.OTHER), ("safety_checker", Role.OTHER),
    ],
)  # fmt: skip
def test_role_by_component_name(name, role):
    pipe = SimpleNamespace(**{name: nn.Linear(2, 2)})
    assert _roles(ModuleDiscovery.discover(pipe)) == {name: role}


def test_a_diffusers_pipeline_is_read_through_its_components():
    from tiny_pipelines import make_wan22_pipeline

    pipe = make_wan22_pipeline()
    found = ModuleDiscovery.discover(pipe)
    assert _roles(found) == {
        "vae": Role.VAE,
        "text_encoder": Role.ENCODER,
        "transformer": Role.DIT,
        "transformer_2": Role.DIT,
    }
    assert found.dits == [pipe.transformer, pipe.transformer_2]


def test_nn_module_pipeline_components_are_its_children():
    pipe = nn.Module()
    pipe.text_encoder = nn.Linear(4, 4)
    pipe.transformer = nn.Module()
    pipe.transformer.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
    pipe.vae = nn.Linear(4, 4)
    pipe.safety_checker = nn.Linear(4, 4)

    found = ModuleDiscovery.discover(pipe)

    assert _roles(found) == {
        "text_encoder": Role.ENCODER,
        "transformer": Role.DIT,
        "vae": Role.VAE,
        "safety_checker": Role.OTHER,
    }
    assert found.components["transformer"].module is pipe.transformer


class OmniPipeline(nn.Module):
    """vllm-omni's protocol: dotted paths, resident modules, one declared path that is not there."""

    _dit_modules = ["model.dit", "model.dit_refiner"]
    _encoder_modules = ["model.text_encoder"]
    _vae_modules = ["vae"]
    _resident_modules = ["model.text_encoder", "adapter"]

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.dit = nn.Module()
        self.model.dit.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.model.text_encoder = nn.Linear(4, 4)
        self.vae = nn.Linear(4, 4)
        self.adapter = nn.Linear(4, 4)
        self.transformer = nn.Linear(4, 4)  # undeclared: its name does not make it a DiT


def test_vllm_omni_protocol_with_dotted_paths_and_resident_modules(caplog):
    pipe = OmniPipeline()
    with caplog.at_level(logging.WARNING, logger="offload_map"):
        found = ModuleDiscovery.discover(pipe)

    comps = found.components
    assert comps["model.dit"].module is pipe.model.dit and comps["model.dit"].role is Role.DIT
    assert comps["model.text_encoder"].role is Role.ENCODER and comps["model.text_encoder"].resident
    assert comps["vae"].role is Role.VAE and not comps["vae"].resident
    assert comps["adapter"].role is Role.OTHER and comps["adapter"].resident
    assert list(comps)[:4] == ["model.dit", "model.text_encoder", "vae", "adapter"]
    # what the protocol does not declare is OTHER, whatever its name
    assert comps["transformer"].role is Role.OTHER
    assert found.names(Role.DIT) == ["model.dit"]
    assert found.names(Role.ENCODER) == ["model.text_encoder"]
    assert found.names(Role.VAE) == ["vae"]
    assert found.resident == [pipe.model.text_encoder, pipe.adapter]
    assert "model.dit_refiner" not in comps

    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "model.dit_refiner" in r.getMessage()]
    assert len(warned) == 1
    assert "OmniPipeline" in warned[0].getMessage() and "_dit_modules" in warned[0].getMessage()


def test_vllm_omni_protocol_on_a_plain_object():
    class Pipe:
        _dit_modules = ["dit"]

        def __init__(self):
            self.dit = nn.Linear(4, 4)
            self.text_encoder = nn.Linear(4, 4)
            self.scheduler = object()

    assert _roles(ModuleDiscovery.discover(Pipe())) == {"dit": Role.DIT, "text_encoder": Role.OTHER}


def test_an_nn_module_that_is_itself_a_dit_is_the_single_component():
    dit = nn.Module()
    dit.x_embedder = nn.Linear(8, 32)
    dit.blocks = nn.ModuleList(Block(32) for _ in range(3))
    dit.proj_out = nn.Linear(32, 8)

    found = ModuleDiscovery.discover(dit)

    assert _roles(found) == {"": Role.DIT}
    assert found.components[""].module is dit
    assert found.dits == [dit]


def test_an_nn_module_without_children_is_the_single_dit():
    linear = nn.Linear(4, 4)
    assert _roles(ModuleDiscovery.discover(linear)) == {"": Role.DIT}


def test_an_nn_module_of_unrecognised_children_without_block_lists_keeps_them_as_other():
    pipe = nn.Module()
    pipe.embed = nn.Linear(4, 4)
    pipe.head = nn.Linear(4, 4)
    assert _roles(ModuleDiscovery.discover(pipe)) == {"embed": Role.OTHER, "head": Role.OTHER}


# A bare diffusers transformer is discovered as one DiT, even where a child's name (transformer_blocks,
# UNet3D's transformer_in) looks like a pipeline component.
@pytest.mark.parametrize("class_name", list(KNOWN_BLOCK_ATTRS))
def test_a_bare_registered_model_is_discovered_as_one_dit(class_name):
    model = build_tiny(class_name)
    assert _roles(ModuleDiscovery.discover(model)) == {"": Role.DIT}


@pytest.mark.parametrize(
    "holder", [SimpleNamespace(scheduler=object(), name="x"), SimpleNamespace(), object(), {"transformer": nn.Linear(2, 2)}, 3]
)
def test_discovery_finds_nothing_in_an_object_holding_no_modules_and_dispatch_refuses_it(holder):
    from offload_map.collect.components import discover_components

    found = ModuleDiscovery.discover(holder)  # vllm-omni's contract: empty lists, no error
    assert not found.components and found.dits == [] and found.dit_names == [] and found.auxiliaries == []
    with pytest.raises(TypeError, match="holds no nn.Module"):
        discover_components(holder)
    with pytest.raises(TypeError, match="holds no nn.Module"):
        dispatch_pipeline(holder, "model", "cpu")


# ---------------------------------------------------------------------------------------------------------
# 5. Encoders: the transformers classes diffusers pipelines use as text and image encoders
# ---------------------------------------------------------------------------------------------------------


def _tiny_encoder_configs() -> dict:
    import transformers as tf

    text = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
    )
    clip = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=16,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    t5 = dict(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
    return {
        "T5EncoderModel": tf.T5Config(**t5),
        "UMT5EncoderModel": tf.UMT5Config(**t5),
        "CLIPTextModel": tf.CLIPTextConfig(**clip),
        "CLIPTextModelWithProjection": tf.CLIPTextConfig(**clip),
        "CLIPVisionModelWithProjection": tf.CLIPVisionConfig(**vision, projection_dim=16),
        "SiglipVisionModel": tf.SiglipVisionConfig(**vision),
        "LlamaModel": tf.LlamaConfig(**text),
        "LlamaForCausalLM": tf.LlamaConfig(**text),
        "MistralModel": tf.MistralConfig(**text, head_dim=16),
        "GemmaModel": tf.GemmaConfig(**text, head_dim=16),
        "Gemma2Model": tf.Gemma2Config(**text, head_dim=16),
        "Qwen2Model": tf.Qwen2Config(**text),
        "Qwen3Model": tf.Qwen3Config(**text, head_dim=16),
        "Qwen2_5_VLForConditionalGeneration": tf.Qwen2_5_VLConfig(
            text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=32,
                patch_size=2,
                spatial_merge_size=2,
                temporal_patch_size=1,
                fullatt_block_indexes=[1],
                window_size=8,
            ),
        ),
    }


def test_every_encoder_registry_entry_has_a_tiny_config():
    from offload_map.collect.blocks import KNOWN_ENCODER_BLOCK_ATTRS

    assert sorted(_tiny_encoder_configs()) == sorted(KNOWN_ENCODER_BLOCK_ATTRS)


@pytest.mark.parametrize("class_name", sorted(_tiny_encoder_configs()))
def test_encoder_block_lists_are_found_nested_and_agree_with_the_heuristic(class_name):
    import transformers as tf

    from offload_map.collect.blocks import KNOWN_ENCODER_BLOCK_ATTRS, _infer_block_attrs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(tf, class_name)(_tiny_encoder_configs()[class_name]).eval()
    names = get_blocks_attr_names(model)
    assert tuple(names) in KNOWN_ENCODER_BLOCK_ATTRS[class_name]
    assert names == _infer_block_attrs(model), "the heuristic finds the same lists without the registry"
    blocks = get_blocks(model)
    assert len(blocks) == 2 * len(names) and all(path.startswith(tuple(names)) for path, _ in blocks)
    assert sum(n_params(b) for _, b in blocks) > 0.5 * n_params(model)


def test_a_dotted_declaration_through_a_property_is_an_error_not_a_fallback():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    class Encoder(nn.Module):
        _layerwise_offload_blocks_attrs = ["inner.block"]

        def __init__(self):
            super().__init__()
            self.stack = Stack()

        @property
        def inner(self):
            return self.stack

    with pytest.raises(AttributeError, match=r"'inner' \(in Encoder\) is a Stack, not a registered child module"):
        get_blocks_attr_names(Encoder())
