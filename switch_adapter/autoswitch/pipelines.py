"""``transformers.pipeline`` through an Auto-Switch router.

``transformers.pipeline(model=router)`` itself cannot work: pipelines read ``model.config`` as the transformers
config (labels, problem type, generation settings), and ``router.config`` is the router's
:class:`~switch_adapter.AutoSwitchConfig`. :func:`router_pipeline` builds the pipeline on a thin view of the
router whose ``config`` is the base model's and whose ``forward`` / ``generate`` are the router's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class RouterPipelineModel(nn.Module):
    """What a pipeline sees: the base model's ``config``, ``generation_config``, ``device``, ``dtype`` and
    ``can_generate()``; calling it or its ``generate`` routes every input through ``router``."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router

    @property
    def config(self) -> Any:
        return self.router.inner.config

    @property
    def generation_config(self) -> Any:
        return self.router.generation_config

    @property
    def device(self) -> torch.device:
        return self.router.device

    @property
    def dtype(self) -> torch.dtype:
        return self.router.dtype

    @property
    def name_or_path(self) -> str:
        return self.router.name_or_path

    def can_generate(self) -> bool:
        return self.router.can_generate()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.router(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.router.generate(*args, **kwargs)


def _named_like(router: nn.Module) -> type[RouterPipelineModel]:
    """A subclass named like the base model's class, so that the pipeline's supported-model check passes."""
    name = type(router.inner).__name__
    return type(name, (RouterPipelineModel,), {"__doc__": RouterPipelineModel.__doc__, "__module__": __name__})


def router_pipeline(router: nn.Module, task: str, **kwargs: Any) -> Any:
    """``transformers.pipeline(task, model=<view of router>, **kwargs)``; the router's tokenizer and image
    processor are used unless ``kwargs`` give others."""
    from transformers import pipeline

    if "model" in kwargs:
        raise TypeError("router.pipeline(task, ...) runs the router itself: do not pass model=.")
    if getattr(router, "tokenizer", None) is not None:
        kwargs.setdefault("tokenizer", router.tokenizer)
    if getattr(router, "image_processor", None) is not None:
        kwargs.setdefault("image_processor", router.image_processor)
    if router.feature_spec.input_kind == "tensor":
        raise TypeError(
            "transformers pipelines need a transformers model; this router's base is a plain module. Call the "
            "router directly: router(tensor)."
        )
    return pipeline(task, model=_named_like(router)(router), **kwargs)
