"""Configuration of the T-Switch adapter type."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import PeftType

from .._model_sources import hub_download_kwargs, local_folder
from ..codec.binarize import SCALE_GRANULARITIES, SCALE_RULES, BinarySwitch, binarize
from ..errors import AdapterNotFoundError, ConfigError, SwitchAdapterError
from ..format import (
    CHECKSUMS_SINCE,
    FORMAT_VERSION,
    MODEL_CARD_NAME,
    PLAIN_FORMAT_VERSION,
    locate_weights_file,
    required_format_version,
    verify_adapter_file,
)
from .config_checks import is_number, record_problems, setting_problems
from .model_card import write_model_card

ALL_SUPPORTED_SHORTHAND = "all"

# Chosen with `python -m benchmarks.density_sweep --threads 1 --resume` (results:
# benchmarks/results/density_sweep.md): all-MiniLM-L6-v2 fully fine-tuned on 8 text tasks (1,000 examples, 1 epoch),
# every encoder tensor switched, scale rule "norm". Rule, fixed before measuring: the cheapest density whose mean
# accuracy kept (per task and seed, % of the individual fine-tune) reaches 99% on 4 choice tasks (sms_spam,
# movie_sentiment, fine_foods, language_id; seeds 0-2); 4 held-out tasks show whether the choice carries over (seeds
# measured: trec 0,1,2; crowdflower_tweets 0,1,2; fortune_topic 0,1,2; wordnet_supersense 0,1,2).
# % kept on choice / held-out tasks / SASS bits per parameter (fp32 = 32):
#   d=0.02: 96.43 / 97.14 / 0.098   d=0.05: 97.33 / 98.49 / 0.208
#   d=0.1: 98.19 / 99.19 / 0.357   d=0.2: 98.95 / 99.32 / 0.592
#   d=0.3: 99.67 / 99.46 / 0.756   d=0.4: 99.67 / 99.07 / 0.870
# The reference "rms" scale keeps less at low densities (d=0.05: 95.10 / 94.49) and needs d=0.4 for the same rule.
DEFAULT_DENSITY = 0.3


@dataclass
class TSwitchConfig(PeftConfig):
    """Configuration of a T-Switch adapter: per targeted weight tensor a binary keep-mask, the signs of the kept
    entries and one scale ("Less is More: Efficient Model Merging with Binary Task Switch", CVPR 2025).

    Args:
        target_modules: Modules whose parameters are switched, with PEFT's conventions (a list of name suffixes, a
            regex, or ``"all-linear"``), plus ``"all"`` (the default): every supported layer (linear, embedding,
            Conv1D, Conv2d and norm layers) except the model's output head.
        exclude_modules: Modules never switched, with the same conventions.
        density: Keep ratio per sign and per tensor, in (0, 1]. Positive and negative entries of a task vector are
            ranked separately and the top ``floor(count * density)`` of each are kept. The default, 0.3, kept 99.7% of
            the individual fine-tuned accuracy on the tasks it was chosen on and 99.5% on held-out tasks at 0.76 bits
            per parameter (2.4% of fp32) on MiniLM fine-tunes; see ``DEFAULT_DENSITY`` in this module for the
            measurements.
        density_pattern: Per-module overrides of ``density``: ``{regex: density}``, matched like LoRA's
            ``rank_pattern`` (the regex must match the end of the module name).
        scale_granularity: ``"tensor"`` for one scale per tensor (the reference) or ``"row"`` for one per output row.
        scale_rule: ``"norm"`` (default): the reconstruction keeps the norm of the whole task vector. ``"rms"``: the
            reference's scale, the RMS of the kept entries. At density 0.05 on the MiniLM sweep "norm" kept
            97.91% of the individual accuracy and "rms" 94.80%, at the same storage.
        keep_ties: ``False`` (default): keep exactly ``floor(count * density)`` entries per sign, breaking ties at the
            cut by position, so the size of a switch follows from its density. ``True``: keep every entry tied at the
            cut, as the reference implementation does (more than the quota when many entries share the cut value).
        switch_bias: Also switch the bias of targeted modules that have one.
        switch_norms: Also switch every norm layer (LayerNorm, RMSNorm, GroupNorm, BatchNorm and other layers with
            running statistics) of the model, in addition to ``target_modules``.
        modules_to_save: Modules stored in full precision with the adapter, e.g. task heads. Their shapes may differ
            from the base model's (another number of labels); ``modules_to_save_shapes`` records them.
        layers_to_transform / layers_pattern: As in LoRA: restrict the switch to some layer indices.
        format_version: Version of the file format (see ``switch_adapter.format``); 2 adds a checksum per switch, 3
            units with more than one value bit or grouped COO (FlexSwitch), 4 running statistics of norm layers. Set
            when an adapter is created or loaded
            (:func:`switch_adapter.format.required_format_version`), not by hand; saving raises it to what the
            ``unit_layout`` needs.
        unit_layout: Filled in when switches are created: for every switched module and parameter the tensor
            shape, the encoded size in bytes, the number of scales, the density, the number of kept entries, the
            value bits and the encoding.
            Loaders use it to allocate the content-dependent buffers before reading the file.
        modules_to_save_shapes: Parameter shapes of ``modules_to_save`` entries that differ from the base model's.
        norm_statistics: Filled in when switches are created: the norm layers (BatchNorm ...) whose running
            statistics the adapter carries, ``{module: {"running_mean": shape, "running_var": shape}}``. An adapter
            with statistics is of format version 4.
        flexswitch: For a switch learned by :func:`switch_adapter.flexswitch`: what was asked and what was reached
            (``budget``, ``budget_bytes``, ``file_bytes``, ``bits_per_parameter``, ``fraction_of_fp32``, ``steps``,
            ``loss``, ``final_loss``, ``examples``, ``seed``). ``None`` for a switch made by binarization.
    """

    target_modules: list[str] | str | None = field(
        default=ALL_SUPPORTED_SHORTHAND,
        metadata={"help": "Modules to switch: name suffixes, a regex, 'all-linear' or 'all' (default)."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never switched, same conventions as target_modules."}
    )
    density: float = field(default=DEFAULT_DENSITY, metadata={"help": "Keep ratio per sign and per tensor, in (0, 1]."})
    density_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module density overrides: {regex: density}."}
    )
    scale_granularity: Literal["tensor", "row"] = field(
        default="tensor", metadata={"help": "One scale per tensor ('tensor') or per output row ('row')."}
    )
    scale_rule: Literal["rms", "norm"] = field(
        default="norm", metadata={"help": "'norm' (default): keep ||tau||; 'rms' (reference): RMS of kept entries."}
    )
    keep_ties: bool = field(
        default=False, metadata={"help": "Keep every entry tied at the cut (reference) instead of exactly the quota."}
    )
    switch_bias: bool = field(default=True, metadata={"help": "Also switch biases of targeted modules."})
    switch_norms: bool = field(default=False, metadata={"help": "Also switch every norm layer of the model."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules kept in full precision with the adapter, e.g. task heads."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to switch (as in LoRA)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform (as in LoRA)."}
    )
    format_version: int = field(
        default=PLAIN_FORMAT_VERSION,
        metadata={"help": "File format version (2: with checksums; 3: multi-bit units or grouped COO)."},
    )
    unit_layout: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=dict,
        metadata={"help": "Per module and parameter: shape, code bytes, scales (generated)."},
    )
    modules_to_save_shapes: dict[str, dict[str, list[int]]] = field(
        default_factory=dict,
        metadata={"help": "Shapes of modules_to_save parameters that differ from the base."},
    )
    norm_statistics: dict[str, dict[str, list[int]]] = field(
        default_factory=dict,
        metadata={"help": "Norm layers whose running statistics the adapter carries, with shapes (generated)."},
    )
    flexswitch: dict[str, Any] | None = field(
        default=None, metadata={"help": "FlexSwitch training record: budget asked and reached (generated)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TSWITCH
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.target_modules is None:
            self.target_modules = ALL_SUPPORTED_SHORTHAND
        for record in ("unit_layout", "modules_to_save_shapes", "norm_statistics"):
            if getattr(self, record) is None:  # a null in a hand-written adapter_config.json: nothing recorded
                setattr(self, record, {})
        _raise_problems(setting_problems(self), record_problems(self))
        _check_density(self.density, "density")
        for pattern, value in self.density_pattern.items():
            _check_density(value, f"density_pattern[{pattern!r}]")
        if self.scale_granularity not in SCALE_GRANULARITIES:
            raise ValueError(f"scale_granularity must be one of {SCALE_GRANULARITIES}, got {self.scale_granularity!r}.")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}.")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This T-Switch adapter uses switch format version {self.format_version}, but the installed "
                f"switch-adapter reads versions up to {FORMAT_VERSION}. Upgrade it: pip install -U switch-adapter"
            )
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config like any PEFT config, and check the adapter file next to it before anything uses it.

        A truncated, corrupt or tampered ``adapter_model.safetensors`` raises :class:`~switch_adapter.CodecError`
        here, so ``PeftModel.from_pretrained`` and ``load_adapter`` fail before they modify the model. A name that is
        neither a folder nor a reachable Hub repository raises :class:`~switch_adapter.AdapterNotFoundError` at once.
        """
        name = str(pretrained_model_name_or_path)
        is_local = local_folder(name, "T-Switch adapter") is not None
        if not is_local:
            kwargs = hub_download_kwargs(kwargs)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except ValueError as error:
            if is_local or isinstance(error, SwitchAdapterError):
                raise
            raise AdapterNotFoundError(
                f"The T-Switch adapter {name!r} is not a local folder, and its adapter_config.json could not be "
                f"fetched from the Hub ({error}). Check the path or repository id, the revision and the token; offline "
                "(HF_HUB_OFFLINE=1, or no network), only repositories already in the Hub cache can be used."
            ) from error
        weights = locate_weights_file(name, subfolder, kwargs)
        if weights is not None:
            verify_adapter_file(weights, config.unit_layout, config.format_version, config.norm_statistics)
        config._weights_file = weights  # not a field (never saved): lets the tuner check head shapes before loading
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save the config like any PEFT config, and add the T-Switch section to the folder's model card. A format
        version below what ``unit_layout`` needs (multi-bit units, grouped COO) is raised first; version 1 adapters
        (no checksums) stay at 1."""
        if self.format_version >= CHECKSUMS_SINCE:
            self.format_version = max(
                self.format_version, required_format_version(self.unit_layout, self.norm_statistics)
            )
        super().save_pretrained(save_directory, **kwargs)
        if self.unit_layout and os.path.exists(os.path.join(save_directory, MODEL_CARD_NAME)):
            write_model_card(save_directory, self)

    def binarize(self, task_vector, module_name: str, param_name: str = "weight") -> BinarySwitch:
        """Binarize the task vector of ``module_name.param_name`` with this config's density and scale settings."""
        return binarize(
            task_vector,
            self.density_for(module_name),
            self.scale_granularity,
            name=f"{module_name}.{param_name}",
            scale_rule=self.scale_rule,
            keep_ties=self.keep_ties,
        )

    def density_for(self, module_name: str) -> float:
        """The density of ``module_name``: the first ``density_pattern`` regex matching its end, else ``density``."""
        for pattern, value in self.density_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module_name):
                return float(value)
        return float(self.density)


def _raise_problems(settings: list[str], records: list[str]) -> None:
    """Raise one :class:`~switch_adapter.ConfigError` listing every problem of the config, if it has any."""
    if records:
        raise ConfigError(
            "This T-Switch adapter's config is malformed:\n  " + "\n  ".join(records + settings) + "\nunit_layout, "
            "format_version and the other records are written when a switch is saved: its adapter_config.json was "
            "edited or damaged. Save the adapter again, or download it again."
        )
    if settings:
        raise ConfigError("TSwitchConfig has settings of the wrong type or value:\n  " + "\n  ".join(settings))


def _check_density(value: Any, name: str) -> None:
    if not is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"{name} must be a number in (0, 1] (the fraction of entries kept per sign), got {value!r}. "
            "Typical values are 0.02-0.4."
        )
