"""switch-adapter: compressed task vectors (T-Switch) as PEFT adapters.

Importing this package registers the ``TSWITCH`` adapter type with peft, so that ``PeftModel.from_pretrained``,
``AutoPeftModel*`` and transformers' ``load_adapter`` can load T-Switch adapters.
"""

from .autoswitch import AutoSwitchConfig, AutoSwitchModel, QueryFeatures, RoutingResult
from .codec.binarize import BinarySwitch, binarize, quantize
from .convert import ConversionSummary, convert_finetuned, convert_lora
from .errors import (
    AdapterNotFoundError,
    BudgetError,
    CodecError,
    ConfigError,
    LayoutMismatchError,
    OutputExistsError,
    SwitchAdapterError,
    TrainingError,
    UnsupportedModelError,
)
from .export import InspectionReport, LoraExportReport, inspect_adapter, materialize, to_lora
from .flexswitch import FlexSwitchConfig, flexswitch
from .format import StorageSummary, storage_summary
from .hub import push_to_hub
from .norm_stats import recalibrate_norm_statistics
from .tswitch import DEFAULT_DENSITY, TSwitchConfig, TSwitchModel
from .tswitch.build import from_finetuned

__version__ = "0.1.0"

__all__ = [
    "AdapterNotFoundError",
    "ConfigError",
    "OutputExistsError",
    "SwitchAdapterError",
    "UnsupportedModelError",
    "AutoSwitchConfig",
    "BudgetError",
    "FlexSwitchConfig",
    "TrainingError",
    "flexswitch",
    "AutoSwitchModel",
    "DEFAULT_DENSITY",
    "BinarySwitch",
    "CodecError",
    "ConversionSummary",
    "InspectionReport",
    "LayoutMismatchError",
    "QueryFeatures",
    "RoutingResult",
    "LoraExportReport",
    "StorageSummary",
    "TSwitchConfig",
    "TSwitchModel",
    "__version__",
    "binarize",
    "quantize",
    "convert_finetuned",
    "convert_lora",
    "from_finetuned",
    "inspect_adapter",
    "materialize",
    "push_to_hub",
    "recalibrate_norm_statistics",
    "storage_summary",
    "to_lora",
]
