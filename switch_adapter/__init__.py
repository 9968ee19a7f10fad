"""switch-adapter: compressed task vectors (T-Switch) as PEFT adapters.

Importing this package registers the ``TSWITCH`` adapter type with peft, so that ``PeftModel.from_pretrained``,
``AutoPeftModel*`` and transformers' ``load_adapter`` can load T-Switch adapters.
"""

from .codec.binarize import BinarySwitch, binarize
from .codec.sass import CodecError
from .hub import push_to_hub
from .tswitch import DEFAULT_DENSITY, LayoutMismatchError, TSwitchConfig, TSwitchModel
from .tswitch.build import from_finetuned
from .tswitch.model_card import StorageSummary, storage_summary

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DENSITY",
    "BinarySwitch",
    "CodecError",
    "LayoutMismatchError",
    "StorageSummary",
    "TSwitchConfig",
    "TSwitchModel",
    "__version__",
    "binarize",
    "from_finetuned",
    "push_to_hub",
    "storage_summary",
]
