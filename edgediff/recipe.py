"""Recipes: an ordered list of passes with options, in TOML; built-in ones by name.

    name = "w8a8"
    description = "..."
    [[pass]]
    name = "calib"
    method = "ptq4dm"
    [[pass]]
    name = "quant"
    weight_bits = 8

A pass acts on the denoiser unless it names another component of a pipeline
(`component = "text_encoder"`, "vae_decoder", "vae_encoder", "vae"): see edgediff/pipelines/compress.py.
Built-ins live in edgediff/recipes/*.toml.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgediff import passes
from edgediff.errors import BadInput

BUILTIN_DIR = Path(__file__).parent / "recipes"


@dataclass
class PassSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    component: str | None = None  # None: the denoiser


@dataclass
class Recipe:
    name: str
    description: str = ""
    passes: list[PassSpec] = field(default_factory=list)
    source: str = "builtin"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "passes": [{"name": p.name, **p.options, **({"component": p.component} if p.component else {})}
                           for p in self.passes]}


def parse(text: str, where: str) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{where}: not valid TOML ({e})") from None
    raw = data.get("pass", [])
    if not isinstance(raw, list):
        raise BadInput(f"{where}: [[pass]] must be an array of tables")
    specs = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or "name" not in entry:
            raise BadInput(f"{where}: pass #{i + 1} has no name")
        entry = dict(entry)
        name = entry.pop("name")
        if name not in passes.known_passes():
            raise BadInput(f"{where}: unknown pass {name!r}; known passes: {', '.join(passes.known_passes())}")
        component = entry.pop("component", None)
        if component is not None and (not isinstance(component, str) or not component.strip()):
            raise BadInput(f"{where}: pass #{i + 1} ({name}): component must be a component name, got {component!r}")
        specs.append(PassSpec(name, entry, component))
    return Recipe(name=str(data.get("name", Path(where).stem)), description=str(data.get("description", "")),
                  passes=specs, source=where)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_recipe(spec: str) -> Recipe:
    """A built-in recipe by name, or a TOML file by path."""
    builtin = BUILTIN_DIR / f"{spec}.toml"
    if builtin.is_file():
        r = parse(builtin.read_text(), f"builtin:{spec}")
        r.source = "builtin"
        return r
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise BadInput(f"{path}: no such recipe file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"{path}: cannot read recipe ({e})") from None
        return parse(text, str(path))
    raise BadInput(f"unknown recipe {spec!r}; built-in recipes: {', '.join(builtin_names())}, or give a .toml file")
