"""``AutoSwitchModel``: one base model, several T-Switch adapters, and per-sample routing between them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from peft.utils import PeftType
from torch import nn
from transformers import PreTrainedModel

from .._model_sources import hub_download_kwargs
from ..errors import AdapterNotFoundError, LayoutMismatchError, SwitchAdapterError
from ..tswitch.config import TSwitchConfig
from ..tswitch.model import TSwitchModel
from .bundle import push_bundle, read_bundle, save_bundle
from .compose import (
    CacheInfo,
    Composition,
    CompositionCache,
    DeltaCache,
    ModelSlots,
    compose,
    is_delta_layer,
    weights_key,
)
from .config import AutoSwitchConfig
from .execute import (
    delta_execution,
    grouped_compositions,
    merge_group_outputs,
    reorder_rows,
    select_rows,
    single_composition,
)
from .features import (
    FeatureExtractor,
    FeatureMismatchError,
    FeatureSpec,
    QueryFeatures,
    _device_of,
    base_fingerprint,
    find_block_stack,
    find_layer_stack,
    is_text_batch,
    layer_features,
    num_hidden_layers,
    query_batches,
    shared_prefix_of,
    text_format,
    to_model_inputs,
)
from .index import RoutingIndex, build_index, can_choose, choose
from .inputs import (
    MAIN_KEY,
    InputMismatchError,
    batch_size,
    call_model,
    check_tensor_batch,
    check_token_ids,
    input_kind_of,
    tensor_batch,
)
from .metric import LearnedMetric
from .routing import RoutingResult, route_features
from .selection import FeatureChoice, candidate_layers
from .sources import AdapterMismatchError, AdapterSource
from .streamed import streamed_execution
from .tables import TableCache

logger = logging.getLogger(__name__)

_TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class DuplicateTaskError(SwitchAdapterError, ValueError):
    """Two tasks share a name, or a task is added under a name the router already has."""


def _check_task_name(name: Any) -> str:
    if not isinstance(name, str) or not _TASK_NAME.match(name) or name == "default":
        raise ValueError(
            f"Invalid task name {name!r}: use letters, digits, '_' and '-' only (it names a PEFT adapter and a "
            "folder of the bundle), and not 'default'."
        )
    return name


def _pairs(items: Any, what: str) -> list[tuple[str, Any]]:
    """``[(name, value)]`` from a mapping or a list of pairs, refusing duplicate names."""
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items or [])
    seen: set[str] = set()
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"{what} must be a dict {{task: ...}} or a list of (task, ...) pairs.")
        name = _check_task_name(pair[0])
        if name in seen:
            raise DuplicateTaskError(f"Task {name!r} appears twice in {what}: task names must be unique.")
        seen.add(name)
    return pairs


def _adapter_path(task: str, source: Any) -> str:
    """The folder or Hub repo id given for ``task``'s adapter, as a string."""
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise TypeError(f"adapters[{task!r}] must be the folder or Hub repo id of a T-Switch adapter, got {source!r}.")
    return os.fspath(source)


def _normalize_id(name: str | None) -> str:
    if not name:
        return ""
    name = os.fspath(name)
    return os.path.realpath(name) if os.path.isdir(name) else name.strip("/")


def shape_fingerprint(config: TSwitchConfig) -> str:
    """Hash of the (module, parameter, shape) entries of an adapter's ``unit_layout``."""
    items = sorted(
        f"{module}.{param}:{list(entry['shape'])}"
        for module, params in config.unit_layout.items()
        for param, entry in params.items()
    )
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def check_adapter_fits(
    task: str, config: PeftConfig, source: str, base: nn.Module, base_id: str, check_base_model: bool
) -> None:
    """Raise :class:`AdapterMismatchError` if the adapter at ``source`` is not a T-Switch made for ``base``."""
    if config.peft_type != PeftType.TSWITCH:
        raise AdapterMismatchError(
            f"Task {task!r}: {source} is a {config.peft_type} adapter; Auto-Switch routes T-Switch adapters. Convert "
            "it to a T-Switch first (switch_adapter.from_finetuned)."
        )
    adapter_base = _normalize_id(config.base_model_name_or_path)
    if check_base_model and adapter_base and base_id and adapter_base != base_id:
        raise AdapterMismatchError(
            f"Task {task!r}: the adapter at {source} was made for base model {config.base_model_name_or_path!r}, but "
            f"the router's base model is {base_id!r}. Use the base it was made for, or pass check_base_model=False "
            "if both names refer to the same weights."
        )
    try:
        TSwitchModel._check_layout_fits(base, config)
    except LayoutMismatchError as error:
        raise AdapterMismatchError(
            f"Task {task!r}: the adapter at {source} was made for a base model with other shapes (shape fingerprint "
            f"{shape_fingerprint(config)}, base fingerprint {base_fingerprint(base)}).\n{error}"
        ) from None


def _check_same_base(configs: dict[str, PeftConfig], check_base_model: bool) -> None:
    ids = {task: _normalize_id(c.base_model_name_or_path) for task, c in configs.items()}
    distinct = {value for value in ids.values() if value}
    if check_base_model and len(distinct) > 1:
        listing = ", ".join(f"{task}: {configs[task].base_model_name_or_path!r}" for task in ids)
        raise AdapterMismatchError(
            f"The adapters were made for different base models ({listing}); Auto-Switch composes adapters of one "
            "base model. Pass check_base_model=False if these names refer to the same weights."
        )
    task_types = {str(getattr(c.task_type, "value", c.task_type)) for c in configs.values()}
    if len(task_types) > 1:
        raise AdapterMismatchError(
            f"The adapters have different task types ({', '.join(sorted(task_types))}); all must share one."
        )


def load_adapter_config(source: AdapterSource, token: str | None = None) -> PeftConfig:
    """The adapter's config (validating its weights file), from a local folder or the Hub."""
    kwargs = source.hub_kwargs()
    if token is not None:
        kwargs["token"] = token
    if not source.is_local:
        kwargs = hub_download_kwargs(kwargs)  # an unreachable Hub: the cache answers at once, no retries
    try:
        return PeftConfig.from_pretrained(source.location, **kwargs)
    except SwitchAdapterError:
        raise  # a damaged adapter file names the tensor; a missing one says what to check
    except (OSError, ValueError) as error:
        raise AdapterNotFoundError(
            f"Could not read an adapter config at {source.location!r} ({error}). Give a folder written by "
            "save_pretrained or a Hub repo id holding adapter_config.json."
        ) from error


class AutoSwitchModel(nn.Module):
    """A base model with several T-Switch adapters, routing every sample to a composition of them.

    Build it with :meth:`from_pretrained`. Each call computes routing features from the base model (no switch
    active, the forward pass stopped at ``config.feature_layer``), retrieves the k nearest query examples, and runs
    every sample with ``base + sum_t w_t * switch_t`` (and the top task's head for sequence classification).
    All samples run in one pass, each layer reading the switches' kept entries; dense composed parameters are kept
    only with a ``cache_budget_bytes`` (LRU).

    Thread-safety: every public method that uses the model or the router's state (routing, forward, generate,
    adding or removing tasks, saving, ``to`` / ``float`` / ``cuda`` and other device or dtype moves, ``train`` /
    ``eval``, the cache and memory figures, the ``tasks`` / ``query_features`` / ``radius`` properties) holds one
    re-entrant lock, so concurrent calls from several threads are safe and run one after another.
    The wrapped ``PeftModel`` is owned by the router: its adapters stay disabled (it computes the base model); during
    a call whose samples share one composition its base weights hold that composition (restored afterwards).
    """

    def __init__(
        self,
        model: PeftModel,
        query_features: Mapping[str, QueryFeatures],
        config: AutoSwitchConfig,
        spec: FeatureSpec,
        *,
        tokenizer: Any = None,
        sources: Mapping[str, AdapterSource | None] | None = None,
        metric: str | None = None,
        learned: LearnedMetric | None = None,
        choice: FeatureChoice | None = None,
        query_format: str | None = None,
        image_processor: Any = None,
        feature_fn: Callable | None = None,
    ) -> None:
        super().__init__()
        self._query_format = query_format  # "templated" / "plain" query texts, None when unknown
        self._format_warned = False
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._feature_fn = feature_fn
        self._spec = spec
        self._lock = threading.RLock()
        self._query: dict[str, QueryFeatures] = dict(query_features)
        self._sources: dict[str, AdapterSource | None] = dict(sources or {})
        self._cache = CompositionCache(config.cache_budget_bytes)
        self._deltas = DeltaCache()
        self._tables = TableCache()
        self._extractor = FeatureExtractor(self.inner, spec, feature_fn)
        self._disable_adapters()
        self.eval()
        self._refresh(build_index(self._query, config, metric=metric, learned=learned, choice=choice))

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_or_bundle: nn.Module | str | os.PathLike,
        adapters: Mapping[str, str | os.PathLike] | Iterable[tuple[str, str | os.PathLike]] | None = None,
        query_sets: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        config: AutoSwitchConfig | None = None,
        *,
        base_model: nn.Module | None = None,
        tokenizer: Any = None,
        image_processor: Any = None,
        feature_fn: Callable | None = None,
        revision: str | None = None,
        token: str | None = None,
        check_base_model: bool = True,
        progress: bool = True,
    ) -> AutoSwitchModel:
        """Attach T-Switch adapters to a base model and index their query sets, or load a saved bundle.

        Two forms:

        - ``from_pretrained(base, adapters={"spam": "path/or/hub-id", ...}, query_sets={"spam": examples, ...},
          config=AutoSwitchConfig(...), tokenizer=tok)``: ``base`` is a transformers model (modified in place:
          the adapters are injected as by ``PeftModel.from_pretrained``), or a ``PeftModel`` that already holds
          T-Switch adapters (each becomes a task; ``adapters`` may add more). ``base`` may also be a transformers
          vision model (``pixel_values``) or any ``nn.Module`` called with a tensor. Query sets: for text, a
          ``datasets.Dataset`` (text column ``config.text_column``), a list of strings, token-id tensors; for
          images/tensors, a tensor ``[N, C, H, W]``, a list of tensors, a ``datasets.Dataset`` with an image
          column (``config.image_column``, needs ``image_processor``) or a ``DataLoader``; or :class:`QueryFeatures`.
          Features come from the hidden states / main block list, ``config.feature_module``, or
          ``feature_fn(model, batch) -> [B, D]`` (``batch``: what the model is called with).
        - ``from_pretrained(bundle, base_model=base)``: a folder or Hub repo written by :meth:`save_pretrained` /
          :meth:`push_to_hub`.

        Raises :class:`AdapterMismatchError` (adapters for another base model or of another type),
        :class:`DuplicateTaskError`, ``EmptyQuerySetError``, ``FeatureMismatchError`` (query features from another
        layer or pooling) before the base model is modified.
        """
        if isinstance(model_or_bundle, (str, os.PathLike)):
            if adapters is not None or query_sets is not None:
                raise TypeError(
                    "from_pretrained(bundle, base_model=...) loads a saved router; to build one, pass the base model "
                    "object first: from_pretrained(base, adapters=..., query_sets=...)."
                )
            if base_model is None:
                raise TypeError(f"Loading the bundle {model_or_bundle!r} needs base_model=<the base model object>.")
            contents = read_bundle(model_or_bundle, base_model, revision=revision, token=token)
            stored_spec = contents.query_sets[0][1].spec
            if stored_spec.source == "callable" and feature_fn is None:
                raise ValueError(
                    f"The bundle {model_or_bundle!r} routes on features from a callable ({stored_spec.module}), which "
                    "cannot be saved: pass it again, from_pretrained(bundle, base_model=..., feature_fn=<function>)."
                )
            return cls._build(
                base_model, contents.sources, contents.query_sets, config or contents.config,
                tokenizer=tokenizer if tokenizer is not None else contents.load_tokenizer(), token=token,
                check_base_model=check_base_model, progress=progress, stored=contents,
                image_processor=image_processor if image_processor is not None else contents.load_image_processor(),
                feature_fn=feature_fn,
            )  # fmt: skip
        if not isinstance(model_or_bundle, nn.Module):
            raise TypeError(
                f"Expected a base model (nn.Module) or a bundle path, got {type(model_or_bundle).__name__}."
            )
        sources = {name: AdapterSource(_adapter_path(name, src), revision=revision)
                   for name, src in _pairs(adapters, "adapters")}  # fmt: skip
        return cls._build(
            model_or_bundle, sources, _pairs(query_sets, "query_sets"), config or AutoSwitchConfig(),
            tokenizer=tokenizer, token=token, check_base_model=check_base_model, progress=progress,
            image_processor=image_processor, feature_fn=feature_fn,
        )  # fmt: skip

    @classmethod
    def _build(
        cls,
        base: nn.Module,
        sources: dict[str, AdapterSource],
        query_sets: list[tuple[str, Any]],
        config: AutoSwitchConfig,
        *,
        tokenizer: Any,
        token: str | None,
        check_base_model: bool,
        progress: bool,
        stored: Any = None,
        image_processor: Any = None,
        feature_fn: Callable | None = None,
    ) -> AutoSwitchModel:
        existing = list(base.peft_config) if isinstance(base, PeftModel) else []
        if isinstance(base, PeftModel):
            foreign = [n for n in existing if base.peft_config[n].peft_type != PeftType.TSWITCH]
            if foreign:
                raise AdapterMismatchError(f"The PeftModel holds non-T-Switch adapters {foreign}: remove them first.")
            for name in existing:
                _check_task_name(name)
        for name in sources:
            if name in existing:
                raise DuplicateTaskError(f"Task {name!r} is already an adapter of the given PeftModel.")
        tasks = existing + list(sources)
        if not tasks:
            raise ValueError("Give at least one adapter: adapters={'task': 'path/or/hub-id', ...}.")
        query = dict(query_sets)
        missing, extra = [t for t in tasks if t not in query], [q for q in query if q not in tasks]
        if missing or extra:
            raise ValueError(
                "query_sets must hold one query set per task: "
                + (f"missing for {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"no adapter for {extra}" if extra else "")
                + "."
            )
        inner = base.get_base_model() if isinstance(base, PeftModel) else base
        base_id = _normalize_id(getattr(inner, "name_or_path", "") or "")
        configs = {name: load_adapter_config(source, token) for name, source in sources.items()}
        if isinstance(base, PeftModel):
            configs = {**{n: base.peft_config[n] for n in existing}, **configs}
        for name, source in sources.items():
            check_adapter_fits(name, configs[name], source.location, inner, base_id, check_base_model)
        _check_same_base(configs, check_base_model)

        spec = _make_spec(inner, config, feature_fn)
        context = base.disable_adapter() if isinstance(base, PeftModel) else nullcontext()
        with context:
            features, choice, spec = _initial_features(
                inner, spec, query, tasks, tokenizer, config, progress, image_processor, feature_fn
            )
            if stored is not None:  # a bundle: its metric and projection, unless the config names another metric
                index = build_index(features, config, **stored.routing_for(config))
            else:
                index = build_index(features, config, metric=choice.metric if choice else None, choice=choice)
        if choice is not None:
            logger.info(
                "Auto-Switch routing features: layer %d of %d, %s metric (cross-validated routing accuracy %.3f on "
                "the query sets).", choice.layer, spec.num_layers, choice.metric, choice.accuracy,
            )  # fmt: skip
        formats = {text_format(query[name], config.chat_template, config.text_column) for name in tasks} - {None}
        if len(formats) > 1:
            logger.warning(
                "Some query sets are chat-templated and others plain text: features of the two differ a lot, so "
                "routing will follow the format rather than the task. Give all query sets in one format."
            )
        query_format = formats.pop() if len(formats) == 1 else getattr(stored, "query_format", None)
        model = _attach(base, sources, token)
        return cls(
            model, features, config, spec, tokenizer=tokenizer, sources=sources, metric=index.metric,
            learned=index.learned, choice=index.choice, query_format=query_format, image_processor=image_processor,
            feature_fn=feature_fn,
        )  # fmt: skip

    # -- tasks ---------------------------------------------------------------------------------------------

    @property
    def inner(self) -> nn.Module:
        """The transformers model inside the ``PeftModel`` (with the T-Switch layers injected)."""
        return self.model.get_base_model()

    @property
    def device(self) -> torch.device:
        """Device of the base model's parameters (as ``PreTrainedModel.device``)."""
        return _device_of(self.inner)

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the base model's parameters (as ``PreTrainedModel.dtype``)."""
        return next((p.dtype for p in self.inner.parameters() if p.is_floating_point()), torch.get_default_dtype())

    @property
    def generation_config(self) -> Any:
        """The base model's ``generation_config`` (None for a model that does not generate)."""
        return getattr(self.inner, "generation_config", None)

    @property
    def name_or_path(self) -> str:
        return getattr(self.inner, "name_or_path", "") or ""

    def can_generate(self) -> bool:
        """Whether :meth:`generate` works: a generative text base model."""
        return self._can_generate and self._spec.input_kind == "text"

    def pipeline(self, task: str, **kwargs: Any) -> Any:
        """A ``transformers.pipeline(task, ...)`` that runs through this router: every input is routed and runs
        with its composition, and the pipeline reads the base model's config (labels, generation settings).
        ``kwargs`` go to ``transformers.pipeline`` (``tokenizer`` / ``image_processor`` default to the router's).
        E.g. ``router.pipeline("image-classification")(images)``, ``router.pipeline("text-generation")(prompt)``."""
        from .pipelines import router_pipeline

        return router_pipeline(self, task, **kwargs)

    @property
    def tasks(self) -> list[str]:
        """The task names, in routing order."""
        with self._lock:
            return list(self._query)

    @property
    def feature_spec(self) -> FeatureSpec:
        return self._spec

    @property
    def radius(self) -> float:
        """The out-of-distribution radius in use (calibrated on the query sets unless ``config.ood_radius``), in
        the space of :attr:`metric`."""
        with self._lock:
            return self._index.radius

    @property
    def metric(self) -> str:
        """The routing metric in use: ``"learned"``, ``"cosine"`` or ``"euclidean"`` (``config.metric="auto"``
        resolves to one of them at build time)."""
        with self._lock:
            return self._index.metric

    @property
    def learned_metric(self) -> LearnedMetric | None:
        """The fitted projection ``L`` (``learned_metric.projection``, ``[rank, feature size]``) when
        :attr:`metric` is ``"learned"``."""
        with self._lock:
            return self._index.learned

    @property
    def feature_choice(self) -> FeatureChoice | None:
        """How the feature layer and metric were chosen from the query sets (every candidate's cross-validated
        routing accuracy), or None when both were configured."""
        with self._lock:
            return self._index.choice

    @property
    def query_features(self) -> dict[str, QueryFeatures]:
        """``{task: query features}`` (a copy of the router's mapping)."""
        with self._lock:
            return dict(self._query)

    def adapter_source(self, task: str) -> AdapterSource | None:
        """Where the adapter of ``task`` was loaded from (None for an adapter the given ``PeftModel`` held)."""
        with self._lock:
            if task not in self._query:
                raise KeyError(f"No task {task!r}; the router's tasks are {list(self._query)}.")
            return self._sources.get(task)

    def add_task(
        self,
        name: str,
        adapter: str | os.PathLike,
        examples: Any,
        *,
        revision: str | None = None,
        token: str | None = None,
        check_base_model: bool = True,
        progress: bool = True,
    ) -> None:
        """Attach the T-Switch adapter ``adapter`` (folder or Hub id) as task ``name`` with its query ``examples``.

        Everything is checked and the features computed before the model changes.
        """
        _check_task_name(name)
        with self._lock:
            if name in self._query:
                raise DuplicateTaskError(f"The router already has a task {name!r}: remove_task it first.")
            source = AdapterSource(_adapter_path(name, adapter), revision=revision)
            adapter_config = load_adapter_config(source, token)
            base_id = _normalize_id(getattr(self.inner, "name_or_path", "") or "")
            check_adapter_fits(name, adapter_config, source.location, self.inner, base_id, check_base_model)
            _check_same_base({**self._peft_configs(), name: adapter_config}, check_base_model)
            features = _query_features(
                self._extractor, examples, self.tokenizer, self.config, name, progress, self.image_processor
            )
            index = self._reindex({**self._query, name: features})
            found = text_format(examples, self.config.chat_template, self.config.text_column)
            if found is not None and self._query_format not in (None, found):
                logger.warning(
                    "The query set of task %r is %s text, the other tasks' are %s: format all query sets alike.",
                    name, found, self._query_format,
                )  # fmt: skip
            self._query_format = self._query_format or found
            kwargs = source.hub_kwargs() | ({"token": token} if token else {})
            self.model.load_adapter(source.location, adapter_name=name, **kwargs)
            self._query[name] = features
            self._sources[name] = source
            self._disable_adapters()
            self._refresh(index)

    def remove_task(self, name: str) -> None:
        """Detach task ``name``: its adapter, query features and cached compositions."""
        with self._lock:
            if name not in self._query:
                raise KeyError(f"No task {name!r}; the router's tasks are {self.tasks}.")
            if len(self._query) == 1:
                raise ValueError("Cannot remove the last task: a router needs at least one.")
            index = self._reindex({task: q for task, q in self._query.items() if task != name})
            self.model.delete_adapter(name)
            del self._query[name]
            self._sources.pop(name, None)
            self._cache.discard_task(name)
            self._deltas.discard_task(name)
            self._tables.clear()
            self._disable_adapters()
            self._refresh(index)

    def compute_query_features(self, examples: Any, *, task: str = "query", progress: bool = True) -> QueryFeatures:
        """Features of ``examples`` as this router computes them (to store, or to pass as a query set)."""
        with self._lock:
            return _query_features(
                self._extractor, examples, self.tokenizer, self.config, task, progress, self.image_processor
            )

    # -- routing ---------------------------------------------------------------------------------------------

    def tokenize(self, inputs: Any, *, padding_side: str | None = None) -> dict[str, torch.Tensor]:
        """The batch the router runs for text ``inputs`` (strings or chats, templated as ``config.chat_template``
        says): ``input_ids`` and ``attention_mask``. Pass it to :meth:`generate` (with ``padding_side="left"``,
        as ``generate`` pads strings) to know where the prompts end: the new tokens of every row start at
        ``batch["input_ids"].shape[1]``. ``padding_side``: ``"left"``, ``"right"`` or the tokenizer's own."""
        with self._lock:
            if self._spec.input_kind != "text" or not is_text_batch(inputs):
                raise TypeError("tokenize takes text: a string, a chat, or a list of them (and a text router).")
            self._check_format(inputs)
            batch = to_model_inputs(
                inputs, self.tokenizer, self.config.max_length, padding_side, self.config.chat_template
            )
            return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def features(self, inputs: Any = None, **kwargs: Any) -> torch.Tensor:
        """Routing features ``[batch, hidden]`` (fp32) of a batch, from the base model (no switch active)."""
        with self._lock:
            return self._extractor(self._inputs(inputs, kwargs))

    def route(self, inputs: Any = None, **kwargs: Any) -> RoutingResult:
        """Route a batch without running the routed model: per-sample weights, top task, OOD flag, distances.

        ``inputs``: a list of strings (needs the tokenizer), a tensor of token ids, or a dict / BatchEncoding;
        ``input_ids=``/``attention_mask=`` keywords work too. For an image model: a float tensor
        ``[B, C, H, W]`` (or one image), a list of them, PIL images (with ``image_processor``) or
        ``pixel_values=``; for a plain module: the tensor it is called with.
        """
        with self._lock:
            return self._route(self._inputs(inputs, kwargs))

    def _route(self, batch: Mapping[str, torch.Tensor]) -> RoutingResult:
        index = self._index
        routing = route_features(
            index.project(self._extractor(batch)), index.bank, index.bank_tasks, index.tasks, self.config,
            index.radius, index.distance, index.metric,
        )  # fmt: skip
        if self._num_labels:
            routing.num_labels = [self._num_labels.get(task, self._base_num_labels) for task in routing.top_task]
        return routing

    # -- execution -------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Any = None,
        attention_mask: torch.Tensor | None = None,
        *,
        routing: RoutingResult | None = None,
        return_routing: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Route the batch and run every sample with its composition; returns the base model's output type.

        ``input_ids`` may also be a list of strings (tokenized with the router's tokenizer) or a BatchEncoding;
        for an image model, images as :meth:`route` takes them (or ``pixel_values=``), for a plain module its
        input tensor; every sample runs with its own composition, as if it ran alone.
        For sequence classification with heads of different label counts, ``logits`` is padded with ``-inf`` to
        the largest label count (``routing.num_labels`` holds each sample's count). When several compositions run
        one after another on their sub-batches, values that cannot be split per sample (a scalar ``loss``,
        ``past_key_values``) are None. With ``return_routing=True`` returns ``(outputs, routing)``. Pass
        ``routing=`` (from :meth:`route`) to reuse a routing.
        """
        with self._lock:
            batch = self._inputs(input_ids, {"attention_mask": attention_mask, **kwargs}, keep_extra=True)
            routing = self._check_routing(routing, batch) if routing is not None else self._route(batch)
            kind = self._spec.input_kind
            size = batch_size(batch, kind)

            def run(index):
                if index is None:
                    return call_model(self.inner, batch, kind)
                sub = select_rows(batch, index, size)
                if self._can_generate and "use_cache" not in sub:
                    sub["use_cache"] = False  # per-group KV caches cannot be merged
                return call_model(self.inner, sub, kind)

            order = self._contiguous_order(routing, "forward")
            if order is None:
                outputs = self._execute(routing, run, "forward")
            else:  # samples of one composition next to each other: layers then work on slices, not gathered rows
                permuted = select_rows(batch, order, size)
                selected = routing.select(order.tolist())
                outputs = self._execute(selected, lambda _: call_model(self.inner, permuted, kind), "forward")
                outputs = reorder_rows(outputs, order, size)
        return (outputs, routing) if return_routing else outputs

    def generate(
        self,
        inputs: Any = None,
        *,
        routing: RoutingResult | None = None,
        return_routing: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Route every prompt once (from the prompt, padding-aware) and generate with its composition throughout.

        ``inputs``: a list of strings (tokenized with left padding), a tensor of token ids, or a dict /
        BatchEncoding; every ``generate`` keyword of transformers works (greedy, sampling, beam search,
        ``use_cache``, ``streamer``, ...). Returns what ``generate`` returns (``(output, routing)`` with
        ``return_routing=True``). All prompts advance in one decoding loop, each row with its own composition
        (see the Auto-Switch guide, "How a batch runs").
        """
        with self._lock:
            if self._spec.input_kind != "text" or not self._can_generate:
                raise TypeError(
                    f"generate needs a generative text model; this router's base is a {type(self.inner).__name__}. "
                    "Call the router (forward) instead."
                )
            batch = self._inputs(inputs, kwargs, keep_extra=True, padding_side="left")
            routing = self._check_routing(routing, batch) if routing is not None else self._route(batch)
            size = batch["input_ids"].shape[0]
            per_row_callbacks = any(batch.get(key) is not None for key in ("streamer", "prefix_allowed_tokens_fn"))
            permutation = None if per_row_callbacks else self._contiguous_order(routing, "generate")
            if permutation is None:
                outputs = self._execute(routing, lambda _: self.inner.generate(**batch), "generate")
            else:
                # Samples of one composition next to each other: layers then work on slices, not gathered rows.
                permuted = select_rows(batch, permutation, size)
                outputs = self._execute(
                    routing.select(permutation.tolist()), lambda _: self.inner.generate(**permuted), "generate"
                )
                config = batch.get("generation_config") or self.inner.generation_config
                beams = batch.get("num_beams") or getattr(config, "num_beams", 1) or 1
                outputs = reorder_rows(outputs, permutation, size, int(beams))
        return (outputs, routing) if return_routing else outputs

    def _execute(self, routing: RoutingResult, run: Callable[[Any], Any], kind: str) -> Any:
        """Run ``run(sample indices or None)`` with every sample's composition substituted (``kind``: ``forward``
        or ``generate``). Strategies (see the README, "How a batch runs"):

        - ``stream`` (default without a cache budget): one call; every switched layer applies each row's own
          composition from the per-layer entry tables (entry-wise or composed in a scratch buffer); a single
          composition is added to the weights in place and restored afterwards.
        - ``single``: one composition for the batch: composed parameters swapped in, one call.
        - ``sequential`` (forward): one call per composition on its sub-batch, outputs reassembled.
        - ``grouped`` (generate, ``execution="compose"``): one call; every switched layer runs each composition's
          rows with its composed parameters.
        - ``delta``: one call; linear layers compute the base matmul once and add each task's sparse delta to the
          rows that use it (times their weights); other switched layers mix per-task compositions.
        """
        groups = routing.groups()
        heads = list(dict.fromkeys(group.head for group in groups))
        head_of_sample = [0] * len(routing)
        for group in groups:
            for index in group.indices:
                head_of_sample[index] = heads.index(group.head)
        keys = list(dict.fromkeys(weights_key(group.weights) for group in groups))
        strategy = self._strategy(keys, kind)
        if strategy == "stream":
            sample_group = [0] * len(routing)
            for group in groups:
                for index in group.indices:
                    sample_group[index] = keys.index(weights_key(group.weights))
            tasks = tuple(self.tasks)
            compositions = [dict(key) for key in keys]
            records = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
            in_place = len(keys) == 1 and not records  # one composition: added to the weights, then restored
            with streamed_execution(
                self._slots, self._tables, tasks, compositions, sample_group, heads, head_of_sample, in_place
            ):
                return run(None)
        if len(keys) == 1 and len(heads) == 1:
            with single_composition(self._slots, self._composition(dict(keys[0])), heads[0]):
                return run(None)
        if strategy == "delta":
            used = [t for t in self.tasks if any(t in dict(key) for key in keys)]
            targets: list[dict[str, float]] = [{t: 1.0} for t in used] + ([{}] if () in keys else [])
            compositions = [self._composition(target, partial=True) for target in targets]
            deltas = [self._target_deltas(target) for target in targets]
            assignments = [[] for _ in range(len(routing))]
            for group in groups:
                assigned = [(used.index(t), w) for t, w in group.weights.items()] or [(len(used), 1.0)]
                for index in group.indices:
                    assignments[index] = assigned
            with delta_execution(self._slots, deltas, compositions, assignments, heads, head_of_sample):
                return run(None)
        compositions = [self._composition(dict(key)) for key in keys]
        if strategy == "sequential":
            parts = []
            for group in groups:
                index = torch.as_tensor(group.indices, dtype=torch.long)
                composition = compositions[keys.index(weights_key(group.weights))]
                with single_composition(self._slots, composition, group.head):
                    parts.append((index, run(index)))
            return merge_group_outputs(parts, len(routing))
        assignments = [[] for _ in range(len(routing))]
        for group in groups:
            for index in group.indices:
                assignments[index] = [(keys.index(weights_key(group.weights)), 1.0)]
        with grouped_compositions(self._slots, compositions, assignments, heads, head_of_sample):
            return run(None)

    def _contiguous_order(self, routing: RoutingResult, kind: str) -> torch.Tensor | None:
        """A permutation of the samples that puts each composition's samples next to each other, for the one-call
        strategies (``stream``, ``delta``); None when they already are or another strategy runs."""
        groups = routing.groups()
        order = [index for group in groups for index in group.indices]
        if order == list(range(len(order))):
            return None
        keys = list(dict.fromkeys(weights_key(group.weights) for group in groups))
        if self._strategy(keys, kind) not in ("stream", "delta"):
            return None
        return torch.as_tensor(order, dtype=torch.long)

    def _strategy(self, keys: list, kind: str) -> str:
        """``sequential``/``grouped`` (composed parameters per distinct composition) or ``delta``."""
        composed = "sequential" if kind == "forward" else "grouped"
        if self.config.execution == "stream" or (self.config.execution == "auto" and self._cache.budget_bytes == 0):
            return "stream"
        if self.config.execution == "compose" or self._slots.non_affine:
            return composed
        if self.config.execution == "delta":
            return "delta"
        if kind == "generate":  # measured (benchmarks/routing.py): composed weights per group win for 2 groups,
            return "grouped" if len(keys) <= 2 else "delta"  # one base matmul + sparse deltas for more
        tasks = {task for key in keys for task, _ in key}
        cached = all(self._cache.contains((key, "full")) for key in keys if key)
        return composed if len(keys) <= max(1, len(tasks)) or cached else "delta"

    def _target_deltas(self, weights: dict[str, float]) -> list:
        """Per switched layer (then per tied output layer): the sparse delta of the one task in ``weights``."""
        if not weights:
            return [None] * (len(self._slots.layers) + len(self._slots.tied))
        (task,) = weights
        out = [self._deltas.get(task, layer) if is_delta_layer(layer) else None for layer in self._slots.layers]
        for tied in self._slots.tied:
            out.append(self._deltas.get(task, tied.source) if tied.source._has_switch(task, "weight") else None)
        return out

    def _composition(self, weights: dict[str, float], partial: bool = False) -> Composition:
        """Composed parameters for ``weights`` (cached); ``partial``: only the layers without sparse deltas."""
        key = weights_key(weights)
        if not key:
            return Composition(key, [{} for _ in self._slots.layers])

        def build() -> Composition:
            with torch.inference_mode(False), torch.no_grad():
                return compose(self._slots, dict(key), skip_delta_layers=partial)

        return self._cache.get((key, "partial" if partial else "full"), build)

    def _check_routing(self, routing: RoutingResult, batch: Mapping[str, torch.Tensor]) -> RoutingResult:
        rows = batch_size(batch, self._spec.input_kind)
        if len(routing) != rows:
            raise ValueError(f"The routing covers {len(routing)} samples but the batch has {rows}.")
        unknown = [t for t in routing.task_names if t not in self._query]
        if unknown:
            raise ValueError(f"The routing names tasks {unknown} that this router does not have.")
        return routing

    def _inputs(
        self, inputs: Any, kwargs: dict[str, Any], keep_extra: bool = False, padding_side: str | None = None
    ) -> dict[str, Any]:
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        kind = self._spec.input_kind
        if kind != "text":
            if not keep_extra:
                kwargs = {k: v for k, v in kwargs.items() if k in (MAIN_KEY[kind], "input_ids", "token_type_ids")}
            if kind == "pixel_values":
                kwargs.pop("attention_mask", None)  # pipelines and processors may pass one; images need none
            shape = self._spec.input_shape
            sample_dims = len(shape) if shape is not None else (3 if kind == "pixel_values" else None)
            batch = tensor_batch(inputs, kwargs, kind, self.image_processor, sample_dims)
            check_tensor_batch(batch, kind, shape, self._extractor.channels)
            return batch
        if kwargs.get("pixel_values") is not None or (isinstance(inputs, torch.Tensor) and inputs.is_floating_point()):
            raise InputMismatchError(
                f"This router's model ({type(self.inner).__name__}) takes text: pass strings (with the tokenizer) or "
                "token ids, not images or float tensors."
            )
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
            if inputs is None:
                raise ValueError("No inputs: pass texts, token ids, or input_ids=... / a BatchEncoding.")
        elif "input_ids" in kwargs:
            raise ValueError("Pass the inputs once: positionally or as input_ids=, not both.")
        if isinstance(inputs, torch.Tensor) and "attention_mask" in kwargs:
            inputs = {"input_ids": inputs, "attention_mask": kwargs.pop("attention_mask")}
        self._check_format(inputs)
        batch = to_model_inputs(inputs, self.tokenizer, self.config.max_length, padding_side, self.config.chat_template)
        if isinstance(inputs, Mapping):
            batch = {**{k: v for k, v in inputs.items() if k not in batch}, **batch}
        check_token_ids(self.inner, batch.get("input_ids"))  # once per call, before routing and execution
        if keep_extra:
            batch.update(kwargs)
        return batch

    def _check_format(self, inputs: Any) -> None:
        """Warn once when text inputs are formatted otherwise than the query sets (templated vs plain)."""
        found = text_format(inputs, self.config.chat_template)
        if self._format_warned or found is None or self._query_format in (None, found):
            return
        self._format_warned = True
        logger.warning(
            "These inputs are %s text but the query sets were %s: chat templates move features far apart, so "
            "routing suffers. Format both alike: pass chats for both, or set AutoSwitchConfig(chat_template=True) "
            "to template plain strings (see the Auto-Switch guide, 'Chat models').", found, self._query_format,
        )  # fmt: skip

    @property
    def query_format(self) -> str | None:
        """``"templated"`` or ``"plain"``: how the query texts were formatted (None: token ids or features)."""
        return self._query_format

    # -- cache and memory -----------------------------------------------------------------------------------

    def cache_info(self) -> CacheInfo:
        """Composition cache statistics (entries, bytes, budget, hits, misses)."""
        with self._lock:
            return self._cache.info()

    def clear_cache(self) -> None:
        """Drop cached compositions and sparse deltas (they are rebuilt on demand)."""
        with self._lock:
            self._cache.clear()
            self._deltas.clear()
            self._tables.clear()

    def memory_footprint(self) -> dict[str, int]:
        """Bytes held: ``base`` parameters, packed ``switches`` (codes + scales), ``decoded_switches`` (kept
        positions and multipliers decoded on first use, as allocated: 5 bytes per kept entry, 6 for 8-bit units;
        with streamed execution instead the per-layer entry tables (a 16-bit column and the multiplier per kept
        entry: 3 bytes, 4 for 8-bit units), their row ranges, scales and bias changes, and the
        composed vectors of norm layers), task ``heads``, the composition ``cache`` (0 unless
        ``cache_budget_bytes`` is set), ``sparse_deltas`` (``execution="delta"``), and for comparison
        ``dense_task_copies``: what one dense copy of the switched parameters per task would take."""
        with self._lock:
            return self._memory_footprint()

    def _memory_footprint(self) -> dict[str, int]:
        base = switches = heads = decoded = switched = 0
        seen: set[int] = set()
        for name, tensor in list(self.model.named_parameters(remove_duplicate=False)) + list(
            self.model.named_buffers(remove_duplicate=False)
        ):
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            size = tensor.numel() * tensor.element_size()
            if "tswitch_" in name:
                switches += size
            elif ".modules_to_save." in name:
                heads += size
            else:
                base += size
        for layer in self._slots.layers:
            decoded += layer.decoded_nbytes()
            for param_name in ("weight", "bias"):
                param = getattr(layer.get_base_layer(), param_name, None)
                if isinstance(param, torch.Tensor) and any(layer._has_switch(task, param_name) for task in self._query):
                    switched += param.numel() * param.element_size()
        return {
            "base": base,
            "switches": switches,
            "decoded_switches": decoded + self._tables.nbytes,
            "heads": heads,
            "cache": self._cache.info().nbytes,
            "sparse_deltas": self._deltas.nbytes,
            "dense_task_copies": switched * len(self._query),
        }

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda(), ...: cached compositions are stale
        with self._lock:
            self._cache.clear()
            self._deltas.clear()
            self._tables.clear()
            return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> AutoSwitchModel:
        """``nn.Module.train`` (and ``eval``) under the router's lock."""
        with self._lock:
            return super().train(mode)

    # -- saving ----------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *, adapters: str = "copy") -> None:
        """Write a bundle: ``autoswitch_config.json`` (router config, tasks, feature spec, radius),
        ``query_features.safetensors``, the adapters under ``adapters/<task>/`` and the tokenizer, if any.

        ``adapters="reference"`` stores adapters loaded from the Hub as references (repo id and revision) instead
        of copies; local adapters are always copied. The folder is written to a temporary sibling and renamed.
        """
        with self._lock:
            save_bundle(self, save_directory, adapters=adapters)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        adapters: str = "copy",
        token: str | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Upload the bundle (see :meth:`save_pretrained`) to ``repo_id``, with a model card; returns the commit URL."""
        with self._lock:
            return push_bundle(
                self, repo_id, adapters=adapters, token=token, private=private, revision=revision,
                commit_message=commit_message, create_pr=create_pr,
            )  # fmt: skip

    # -- internals -------------------------------------------------------------------------------------------

    def _peft_configs(self) -> dict[str, PeftConfig]:
        return {name: self.model.peft_config[name] for name in self._query}

    def _disable_adapters(self) -> None:
        self.model.base_model.disable_adapter_layers()

    def _reindex(self, query: Mapping[str, QueryFeatures]) -> RoutingIndex:
        """The index for a changed set of tasks: the learned metric refitted, ``"auto"`` re-chosen at the layer."""
        metric = None if self.config.metric in ("auto", "learned") else self.config.metric
        return build_index(query, self.config, metric=metric)

    def _refresh(self, index: RoutingIndex) -> None:
        """Install ``index`` and rebuild what depends on the set of tasks: slots and head label counts."""
        self._slots = ModelSlots(self.inner)
        self._index = index
        self._num_labels, self._base_num_labels = _head_label_counts(self._slots, self.model)
        self._can_generate = isinstance(self.inner, PreTrainedModel) and self.inner.can_generate()


def _make_spec(inner: nn.Module, config: AutoSwitchConfig, feature_fn: Callable | None = None) -> FeatureSpec:
    """Where routing features come from: ``feature_fn``, ``config.feature_module``, a transformers model's hidden
    states, or the main block list of any model (``find_block_stack``); else a TypeError naming the first two."""
    kind = input_kind_of(inner)
    fingerprint = base_fingerprint(inner)
    if feature_fn is not None and config.feature_module is not None:
        raise ValueError("Give feature_fn or AutoSwitchConfig(feature_module=...), not both.")
    if feature_fn is not None:
        if not callable(feature_fn):
            raise TypeError(f"feature_fn must be a callable (model, batch) -> features, got {type(feature_fn)}.")
        name = getattr(feature_fn, "__qualname__", type(feature_fn).__name__)
        return FeatureSpec(0, config.pooling, 0, -1, fingerprint, "callable", name, kind)
    if config.feature_module is not None:
        modules = dict(inner.named_modules())
        if config.feature_module not in modules or not config.feature_module:
            raise ValueError(
                f"AutoSwitchConfig(feature_module={config.feature_module!r}): {type(inner).__name__} has no such "
                f"submodule. Use a name from model.named_modules(), e.g. {_module_examples(inner)}."
            )
        return FeatureSpec(0, config.pooling, 0, -1, fingerprint, "module", config.feature_module, kind)
    if _has_layer_stack(inner):
        layers = num_hidden_layers(inner)
        hidden = getattr(inner.config, "hidden_size", None)
        if hidden is None:
            hidden = getattr(getattr(inner.config, "text_config", None), "hidden_size", -1)
        if not isinstance(hidden, int):
            hidden = -1
        return FeatureSpec(
            config.resolve_feature_layer(layers), config.pooling, layers, hidden, fingerprint, "hidden_states", None,
            kind,
        )  # fmt: skip
    found = find_block_stack(inner)
    if found is None:
        raise TypeError(
            f"Auto-Switch cannot tell where to take routing features from {type(inner).__name__} (no transformers "
            "layer stack, no nn.ModuleList/nn.Sequential of blocks). Give it a feature source: "
            "AutoSwitchConfig(feature_module='<submodule name>') to use that module's output (a forward hook; e.g. "
            f"{_module_examples(inner)}), or feature_fn=<callable(model, batch) -> [batch, features] tensor> to "
            "AutoSwitchModel.from_pretrained."
        )
    name, stack = found
    layers = len(list(stack.children()))
    return FeatureSpec(
        config.resolve_feature_layer(layers), config.pooling, layers, -1, fingerprint, "blocks", name, kind
    )


def _has_layer_stack(model: nn.Module) -> bool:
    try:
        find_layer_stack(model)
    except TypeError:
        return False
    return True


def _module_examples(model: nn.Module, limit: int = 6) -> str:
    names = [name for name, _ in model.named_children()]
    return ", ".join(repr(name) for name in names[:limit]) or "'<name>'"


def _initial_features(
    inner: nn.Module,
    spec: FeatureSpec,
    query: Mapping[str, Any],
    tasks: list[str],
    tokenizer: Any,
    config: AutoSwitchConfig,
    progress: bool,
    image_processor: Any = None,
    feature_fn: Callable | None = None,
) -> tuple[dict[str, QueryFeatures], FeatureChoice | None, FeatureSpec]:
    """Query features of every task, and with ``feature_layer="auto"`` the layer (and metric) chosen from them.

    Precomputed :class:`QueryFeatures` fix the layer: theirs. A feature module or callable is one candidate
    (only the metric is chosen). Otherwise every candidate layer's features come from one forward pass per
    batch, and :func:`~switch_adapter.autoswitch.index.choose` picks. The returned spec records the feature size
    and the query examples' input shape (when they share one).
    """
    given = [q for q in query.values() if isinstance(q, QueryFeatures)]
    fixed = spec.source in ("module", "callable")
    shapes: set = set()
    if given:  # the pooling the given features were made with
        spec = dataclasses.replace(spec, shared_prefix=given[0].spec.shared_prefix)
    elif config.skip_shared_prefix and _pools_causal_tokens(inner, spec):
        prefix = shared_prefix_of(
            batch
            for name in tasks
            for batch in query_batches(FeatureExtractor(inner, spec), query[name], tokenizer, config, name)[1]
        )
        spec = dataclasses.replace(spec, shared_prefix=prefix)
    if config.feature_layer != "auto" or given or len(tasks) < 2 or fixed:
        if given:
            stored = given[0].spec
            layer = stored.layer if config.feature_layer == "auto" and not fixed else spec.layer
            hidden = stored.hidden_size if spec.hidden_size < 0 else spec.hidden_size
            spec = dataclasses.replace(spec, layer=layer, hidden_size=hidden, input_shape=stored.input_shape)
        extractor = FeatureExtractor(inner, spec, feature_fn)
        features = {
            name: _query_features(extractor, query[name], tokenizer, config, name, progress, image_processor, shapes)
            for name in tasks
        }
        spec = _observed(spec, next(iter(features.values())).features, shapes)
        return {name: QueryFeatures(q.features, spec) for name, q in features.items()}, None, spec
    layers = sorted(set(candidate_layers(spec.num_layers)) | {spec.layer})
    extractor = FeatureExtractor(inner, spec, feature_fn)
    per_task = {
        name: layer_features(extractor, query[name], tokenizer, config, name, layers, progress, image_processor, shapes)
        for name in tasks
    }
    counts = {name: int(per_task[name][spec.layer].shape[0]) for name in tasks}
    if not can_choose(counts):
        logger.warning(
            "feature_layer='auto' needs at least two query examples per task to compare layers; using layer %d "
            "(feature_depth).", spec.layer,
        )  # fmt: skip
        spec = _observed(spec, per_task[tasks[0]][spec.layer], shapes)
        return {name: QueryFeatures(per_task[name][spec.layer], spec) for name in tasks}, None, spec
    labels = torch.cat([torch.full((counts[name],), i, dtype=torch.long) for i, name in enumerate(tasks)])
    stacked = {layer: torch.cat([per_task[name][layer] for name in tasks]).float() for layer in layers}
    choice = choose(stacked, labels, tasks, config)
    spec = _observed(dataclasses.replace(spec, layer=choice.layer), per_task[tasks[0]][choice.layer], shapes)
    return {name: QueryFeatures(per_task[name][choice.layer], spec) for name in tasks}, choice, spec


def _pools_causal_tokens(inner: nn.Module, spec: FeatureSpec) -> bool:
    """Whether features are a mean over the token hidden states of a decoder LM (what a shared prefix dilutes)."""
    return (
        spec.input_kind == "text"
        and spec.pooling == "mean"
        and spec.source in ("hidden_states", "blocks")
        and FeatureExtractor(inner, spec).padding_aware_positions
    )


def _observed(spec: FeatureSpec, features: torch.Tensor, shapes: set) -> FeatureSpec:
    """``spec`` with the feature size (a feature map's channel count depends on the layer) and the input shape
    shared by all query examples (tensor inputs only)."""
    hidden = int(features.shape[1])
    shape = next(iter(shapes)) if len(shapes) == 1 else (spec.input_shape if not shapes else None)
    return dataclasses.replace(spec, hidden_size=hidden, input_shape=shape)


def _query_features(
    extractor: FeatureExtractor,
    examples: Any,
    tokenizer: Any,
    config: AutoSwitchConfig,
    task: str,
    progress: bool,
    image_processor: Any = None,
    shapes: set | None = None,
) -> QueryFeatures:
    if isinstance(examples, QueryFeatures):
        extractor.spec.check_matches(examples.spec, f"the query set of task {task!r}")
        if len(examples) == 0:
            from .features import EmptyQuerySetError

            raise EmptyQuerySetError(f"The query set of task {task!r} is empty.")
        if shapes is not None and examples.spec.input_shape is not None:
            shapes.add(examples.spec.input_shape)
        return examples
    spec = extractor.spec
    layer = spec.layer
    features = layer_features(extractor, examples, tokenizer, config, task, [layer], progress, image_processor, shapes)[
        layer
    ]
    if spec.hidden_size >= 0 and int(features.shape[1]) != spec.hidden_size:
        raise FeatureMismatchError(
            f"The features of task {task!r} have size {features.shape[1]}, the router's have {spec.hidden_size}: "
            "the feature source returned another shape for these examples."
        )
    return QueryFeatures(features, spec)


def _attach(base: nn.Module, sources: dict[str, AdapterSource], token: str | None) -> PeftModel:
    """Load the adapters into one PeftModel; on failure, remove what was attached and re-raise."""
    created = not isinstance(base, PeftModel)
    model = base if not created else None
    try:
        for name, source in sources.items():
            kwargs = source.hub_kwargs() | ({"token": token} if token else {})
            if not source.is_local:
                kwargs = hub_download_kwargs(kwargs)
            if model is None:
                model = PeftModel.from_pretrained(base, source.location, adapter_name=name, **kwargs)
            else:
                model.load_adapter(source.location, adapter_name=name, **kwargs)
    except Exception:
        if created and model is not None:
            model.unload()
        elif not created:
            for name in sources:
                if name in model.peft_config:
                    model.delete_adapter(name)
        raise
    return model


def _head_label_counts(slots: ModelSlots, model: PeftModel) -> tuple[dict[str, int], int | None]:
    """For sequence classification: ``{task: label count of its head}`` and the base head's label count."""
    task_type = next(iter(model.peft_config.values())).task_type
    if getattr(task_type, "value", task_type) != "SEQ_CLS":
        return {}, None
    counts: dict[str, int] = {}
    base_count = None
    for wrapper in slots.heads:
        base_count = _out_features(wrapper.original_module)
        for task, module in wrapper.modules_to_save.items():
            count = _out_features(module)
            if count is not None:
                counts[task] = count
    return counts, base_count


def _out_features(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].weight.shape[0]) if linears else None


__all__ = ["AdapterMismatchError", "AdapterSource", "AutoSwitchModel", "DuplicateTaskError"]
