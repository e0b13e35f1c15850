"""README.md says what is true: its API table matches the code's signatures and names, and its examples run
(on a tiny pipeline, with the few substitutions listed here: a model of kilobytes instead of 12B, the target
device of the test run)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import offload_map
from offload_map.cli import main

README = (Path(__file__).parent.parent / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def _signature(fn) -> str:
    """``fn``'s signature as the README writes it: names and defaults, no annotations."""
    parts, star = [], False
    for param in inspect.signature(fn).parameters.values():
        if param.kind is param.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(param.name if param.default is param.empty else f"{param.name}={param.default!r}")
    return f"{fn.__name__}({', '.join(parts)})"


@pytest.mark.parametrize("fn", [offload_map.dispatch_pipeline, offload_map.compile_device_map, offload_map.empty_model])
def test_the_api_table_gives_each_functions_signature(fn):
    assert f"`{_signature(fn)}`" in _section("API"), f"README's API table should read `{_signature(fn)}`"


def test_every_attribute_the_api_table_names_exists():
    table = _section("API")

    def row(cls) -> str:
        return next(line for line in table.splitlines() if line.startswith(f"| `{cls.__name__}` |")).split("|")[2]

    named = {
        offload_map.OffloadHandle: re.findall(r"`\.([a-z_]+)", row(offload_map.OffloadHandle)),
        offload_map.DeviceMap: re.findall(r"`([a-z_]+)[(/`]", row(offload_map.DeviceMap))
        + re.findall(r"/([a-z_]+)`", row(offload_map.DeviceMap)),
    }
    for cls, names in named.items():
        assert len(names) >= 8
        for name in names:
            assert hasattr(cls, name), f"README names {cls.__name__}.{name}, which does not exist"
    for name in re.findall(r"`([A-Za-z_]+)`", table.split("vllm-omni contract:")[1].split("|")[0]):
        owner = offload_map.LayerWiseOffloadBackend if name == "get_blocks_attr_names" else offload_map
        assert hasattr(owner, name), f"README names {owner.__name__}.{name}, which does not exist"


# A full-size model becomes the tiny Flux pipeline of the tests; the GPU, the test run's device.
def _substituted(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in code, f"the README example no longer contains {old!r}: update tests/test_readme.py"
        code = code.replace(old, new)
    return code


def test_the_quick_example_runs(target, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick, edit, _ = _code_blocks(_section("Quick example"), "python")
    budget = '{0: "12GiB"}' if target.startswith("cuda") else '{"cpu": "12GiB"}'
    code = (
        _substituted(
            quick,
            {
                'FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16)': "make_flux_pipeline()",
                '"cuda:0"': repr(target),
                "num_inference_steps=28": "num_inference_steps=2",
                'pipe("a red cat").images[0]': 'pipe("a red cat", num_inference_steps=2).images[0]',
                'max_memory={0: "12GiB"}': f"device={target!r}, max_memory={budget}",
            },
        )
        + "\nhandle.remove()\n"
    )
    code += _substituted(edit, {'"cuda:0"': repr(target)}) + "\nhandle.remove()\n"
    from tiny_pipelines import make_flux_pipeline

    scope = {"make_flux_pipeline": make_flux_pipeline}
    exec(compile(code, "README.md", "exec"), scope)
    assert isinstance(scope["dmap"], offload_map.DeviceMap) and (tmp_path / "flux_map.json").exists()


def test_the_loading_example_runs(target, tmp_path):
    from tiny_pipelines import make_flux_pipeline

    make_flux_pipeline().save_pretrained(tmp_path / "FLUX.1-dev")
    loading = _code_blocks(_section("Quick example"), "python")[2]
    code = _substituted(
        loading,
        {
            '"/models/FLUX.1-dev"': repr(str(tmp_path / "FLUX.1-dev")),
            '"layerwise", weights=': f'"layerwise", {target!r}, weights=',
            '"layerwise", compression=': f'"layerwise", {target!r}, compression=',
            '"/scratch/offload"': repr(str(tmp_path / "offload")),
            "dtype=torch.bfloat16) for": "dtype=torch.float32) for",
            "**empty, dtype=torch.bfloat16)": "**empty, dtype=torch.float32)",
        },
    )
    scope = {"torch": torch}
    exec(compile(code, "README.md", "exec"), scope)
    pipe = scope["pipe"]
    assert not any(p.is_meta for c in (pipe.transformer, pipe.text_encoder_2) for p in c.parameters())
    scope["handle"].remove()


def test_the_console_commands_the_readme_shows_run(capsys):
    commands = [line for block in _code_blocks(README, "bash") for line in block.splitlines() if line.startswith("offload-map ")]
    assert commands
    for line in commands:
        assert main(line.split()[1:]) == 0, line
