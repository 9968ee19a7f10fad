"""What a :class:`~switch_adapter.TSwitchConfig` may hold: each check returns its problems as lines that name the field
and what it should be (an empty list when the field is sound).

Two kinds of fields: **settings** a user passes (``target_modules``, ``layers_to_transform``, ...) and **records**
written when a switch is saved (``format_version``, ``unit_layout``, ``modules_to_save_shapes``,
``norm_statistics``, ``flexswitch``). A wrong record can only come from an edited or damaged ``adapter_config.json``;
left unchecked it fails deep inside the loader (``int()`` of a string, a buffer of the wrong size) after peft has
already changed the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_NAMES = "a module name, a regex, or a list of module names"


def selection_problems(config: Any) -> list[str]:
    """Problems of the settings that choose what is switched (shared by T-Switch and FlexSwitch configs)."""
    problems = []
    if not _is_names(config.target_modules):
        problems.append(f"target_modules must be {_NAMES}, got {config.target_modules!r}")
    if not _is_names(config.exclude_modules):
        problems.append(f"exclude_modules must be {_NAMES} (or None), got {config.exclude_modules!r}")
    if config.modules_to_save is not None and not _is_list_of(config.modules_to_save, str):
        problems.append(f"modules_to_save must be a list of module names, e.g. ['classifier'], got "
                        f"{config.modules_to_save!r}")  # fmt: skip
    problems += flag_problems(config, ("switch_bias", "switch_norms"))
    return problems


def setting_problems(config: Any) -> list[str]:
    """Problems of the settings a user passes to a T-Switch config."""
    problems = selection_problems(config)
    layers = config.layers_to_transform
    if layers is not None and not (_is_count(layers) or (_is_list_of(layers, int) and all(map(_is_count, layers)))):
        problems.append(f"layers_to_transform must be a layer index or a list of them (whole numbers >= 0), got "
                        f"{layers!r}")  # fmt: skip
    if not _is_names(config.layers_pattern):
        problems.append(f"layers_pattern must be a name or a list of names (or None), got {config.layers_pattern!r}")
    if not isinstance(config.density_pattern, Mapping) or not all(isinstance(k, str) for k in config.density_pattern):
        problems.append(f"density_pattern must map module regexes to densities, got {config.density_pattern!r}")
    return problems + flag_problems(config, ("keep_ties",))


def flag_problems(config: Any, names: tuple[str, ...]) -> list[str]:
    """Problems of settings that must be True or False."""
    values = {name: getattr(config, name) for name in names}
    return [f"{name} must be True or False, got {v!r}" for name, v in values.items() if not isinstance(v, bool)]


def is_whole(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problems(config: Any) -> list[str]:
    """Problems of the records written when a switch is saved."""
    problems = []
    version = config.format_version
    if not _is_count(version) or version < 1:
        problems.append(f"format_version must be a whole number >= 1, got {version!r}")
    layout = config.unit_layout
    if not isinstance(layout, Mapping):
        problems.append(f"unit_layout must map module names to their units, got {_short(layout)}")
    else:
        for module, params in layout.items():
            if not isinstance(params, Mapping) or not params:
                problems.append(f"unit_layout[{module!r}] must map parameter names to layout entries, got "
                                f"{_short(params)}")  # fmt: skip
                continue
            for param, entry in params.items():
                problems += [f"unit_layout[{module!r}][{param!r}]{p}" for p in entry_problems(entry)]
    for name in ("modules_to_save_shapes", "norm_statistics"):
        problems += _shapes_problems(name, getattr(config, name))
    if config.flexswitch is not None and not isinstance(config.flexswitch, Mapping):
        problems.append(f"flexswitch must be a record of the FlexSwitch training (or None), got "
                        f"{_short(config.flexswitch)}")  # fmt: skip
    return problems


def entry_problems(entry: Any) -> list[str]:
    """Problems of one ``unit_layout`` entry, each starting with the key it concerns (``['code_bytes'] must ...``)."""
    if not isinstance(entry, Mapping):
        return [f" must be a layout entry (shape, code_bytes, scales, ...), got {_short(entry)}"]
    problems = []
    for key in ("shape", "code_bytes", "scales"):
        if key not in entry:
            problems.append(f" has no {key!r}")
    if "shape" in entry and not _is_shape(entry["shape"]):
        problems.append(f"['shape'] must be a list of sizes (whole numbers >= 0), got {_short(entry['shape'])}")
    if "target_shape" in entry and not _is_shape(entry["target_shape"]):
        problems.append(f"['target_shape'] must be a list of sizes, got {_short(entry['target_shape'])}")
    for key, least in (("code_bytes", 0), ("scales", 1), ("kept", 0), ("value_bits", 1)):
        if key in entry and not (_is_count(entry[key]) and entry[key] >= least):
            problems.append(f"[{key!r}] must be a whole number >= {least}, got {_short(entry[key])}")
    if "encoding" in entry and not isinstance(entry["encoding"], str):
        problems.append(f"['encoding'] must be an encoding name, got {_short(entry['encoding'])}")
    density = entry.get("density", 0)
    if not is_number(density) or not 0 <= density <= 1:
        problems.append(f"['density'] must be a number in [0, 1], got {_short(density)}")
    return problems


def _shapes_problems(name: str, value: Any) -> list[str]:
    """Problems of a ``{module: {tensor: shape}}`` record."""
    if not isinstance(value, Mapping):
        return [f"{name} must map module names to {{tensor: shape}}, got {_short(value)}"]
    problems = []
    for module, shapes in value.items():
        if not isinstance(shapes, Mapping) or not all(_is_shape(shape) for shape in shapes.values()):
            problems.append(f"{name}[{module!r}] must map tensor names to shapes, got {_short(shapes)}")
    return problems


def _is_count(value: Any) -> bool:
    return is_whole(value) and value >= 0


def _is_shape(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_count(size) for size in value)


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


def _is_names(value: Any) -> bool:
    return value is None or isinstance(value, str) or _is_list_of(value, str)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
