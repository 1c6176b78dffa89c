"""Reading a preset: its ``extends:`` chain, its ``variants:`` (settings for a kind of hardware),
its ``recipes:`` (settings per method) and ``--set KEY=VALUE`` overrides, merged into one plain
tree of sections that ``ssl_pretrain.config.load_config`` validates.

Nothing here knows the schema beyond the method names: a key's meaning and type are checked once,
on the merged tree, so every error names the key as the user wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ssl_pretrain.engine import hardware
from ssl_pretrain.methods import METHODS
from ssl_pretrain.settings import ConfigError

NetworkProbe = Callable[[dict, list, str], tuple[Optional[Callable[[], dict[str, float]]], str]]
"""``(tree, user overrides, device) -> (probe, workload)``: times the network a tree describes
in fp32 and bf16 (``ssl_pretrain.precision.probe_precisions``), for ``hardware.fast_bf16``."""

VARIANT_CONDITIONS = {
    "no_fast_bf16": "bf16 is not the fast precision here - no AMX tiles and no CUDA GPU of compute capability 8+, "
                    "and on a CPU with AVX512-BF16 alone a probe found fp32 faster - so training runs in fp32",
}
"""The conditions a preset's ``variants:`` section may be keyed by (``ssl_pretrain.engine.hardware``)."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.3'`` -> ``(['optim', 'lr'], 0.3)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (for example optim.lr=0.3), got '{text}'")
    key, raw = text.split("=", 1)
    parts = [part for part in key.strip().split(".") if part]
    if not parts:
        raise ConfigError(f"--set has an empty key in '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(tree: dict, parts: list[str], value: Any) -> None:
    """Set ``tree[parts[0]][parts[1]]... = value``, making the sections on the way."""
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_preset(path: Path, extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The preset's mapping, its ``extends:`` chain merged in (the base first)."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        via = f" (extended by {extended_by[-1]})" if extended_by else ""
        raise ConfigError(f"config file not found: {path}{via}") from None
    except (OSError, UnicodeDecodeError) as error:  # a folder, no permission, a binary file
        raise ConfigError(f"cannot read config file {path}: {getattr(error, 'strerror', None) or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(loaded).__name__}")
    tree = loaded or {}
    base = tree.pop("extends", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'extends' must name another preset file, not {base!r}")
    base_path = path.parent / base
    chain = (*extended_by, path)
    if base_path.resolve() in {link.resolve() for link in chain}:
        raise ConfigError(f"{path}: 'extends' loops back to {base_path}")
    return _merged(read_preset(base_path, chain), tree)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def check_variants(variants: Any, origin: str) -> dict[str, dict[str, Any]]:
    if not isinstance(variants, dict):
        raise ConfigError(f"{origin}: 'variants' must map a condition to settings, not {type(variants).__name__}")
    for condition, settings in variants.items():
        if condition not in VARIANT_CONDITIONS:
            raise ConfigError(f"{origin}: unknown variant condition '{condition}'; "
                              f"allowed: {', '.join(VARIANT_CONDITIONS)}")
        if not isinstance(settings, dict):
            raise ConfigError(f"{origin}: variant '{condition}' must map dotted keys to values")
        if "recipes" in settings:
            check_recipes(settings["recipes"], f"{origin}: variant '{condition}'")
    return variants


def check_recipes(recipes: Any, origin: str) -> dict[str, dict[str, Any]]:
    if not isinstance(recipes, dict):
        raise ConfigError(f"{origin}: 'recipes' must map a method to settings, not {type(recipes).__name__}")
    for method, settings in recipes.items():
        if method not in METHODS:
            raise ConfigError(f"{origin}: unknown method '{method}' under recipes; allowed: {', '.join(METHODS)}")
        if not isinstance(settings, dict):
            raise ConfigError(f"{origin}: recipe '{method}' must map dotted keys to values")
    return recipes


def apply_recipe(tree: dict, recipes: dict[str, dict[str, Any]], user: list, default_method: str,
                 section: str = "recipes") -> None:
    """Apply the recipe of the method the run will train (``--set method=`` or ``--method`` first,
    then the preset's ``method``, then ``default_method``); ``section`` names where it was read."""
    method = next((value for parts, value in reversed(user) if parts == ["method"]), None)
    method = str(method or tree.get("method") or default_method)
    if method in recipes:
        for key, value in recipes[method].items():
            apply_override(tree, [part for part in str(key).split(".") if part], value)
        tree["recipe"] = method
        tree.setdefault("recipe_sections", []).append(f"{section}.{method}")



def apply_variant(tree: dict, variants: dict[str, dict[str, Any]], user: list,
                  network_probe: NetworkProbe) -> list[tuple[str, dict]]:
    """Apply the first variant whose condition holds on the device the run will use; returns its
    ``recipes`` as ``[(section name, recipes)]`` (empty when it has none or no variant applies),
    which the caller applies after the preset's. Where only a measurement can tell (a CPU with AVX512-BF16
    but no AMX), the preset's own network is timed in both precisions
    (``network_probe(tree, user, device)`` gives that timing; a few seconds, cached per machine)."""
    device = next((value for parts, value in reversed(user) if parts == ["train", "device"]), None)
    device = str(device or (tree.get("train") or {}).get("device") or "auto")
    probe, workload = network_probe(tree, user, device)
    for condition, settings in variants.items():
        if condition == "no_fast_bf16" and not hardware.fast_bf16(device, probe, workload):
            for key, value in settings.items():
                if key != "recipes":
                    apply_override(tree, [part for part in str(key).split(".") if part], value)
            tree["variant"] = condition
            return [(f"variants.{condition}.recipes", settings["recipes"])] if "recipes" in settings else []
    return []


def merge_preset(path: Path | None, user: list[tuple[list[str], Any]], default_method: str,
                 network_probe: NetworkProbe, base: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """The preset at ``path`` (none: the defaults) laid over ``base`` (dotted keys: a recipe chosen
    from the data), with its variant for this hardware, its recipe for the method and the ``user``
    overrides applied, in that order; returns ``(tree, origin)``,
    ``origin`` naming where the values came from for error messages.

    Raises:
        ConfigError: a missing or malformed file, or a malformed ``variants``/``recipes`` section.
    """
    tree: dict[str, Any] = {}
    origin = "defaults"
    for key, value in (base or {}).items():
        apply_override(tree, [part for part in str(key).split(".") if part], value)
    if base:
        origin = "the recipe from the data"
    if path is not None:
        origin = str(path)
        tree = _merged(tree, read_preset(Path(path)))
    variants = tree.pop("variants", None)
    recipes = [("recipes", check_recipes(tree.pop("recipes"), origin))] if "recipes" in tree else []
    if variants is not None:
        # a variant's own recipes apply after the preset's: the more specific setting wins
        recipes += apply_variant(tree, check_variants(variants, origin), user, network_probe)
    for section, recipe_set in recipes:
        apply_recipe(tree, recipe_set, user, default_method, section)
    for parts, value in user:
        apply_override(tree, parts, value)
        origin = f"{origin} + --set"
    return tree, origin
