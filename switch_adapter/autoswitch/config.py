"""Configuration of an Auto-Switch router (JSON round trip)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from ..tswitch.config_checks import is_whole

METRICS = ("auto", "learned", "cosine", "euclidean")
OBJECTIVES = ("lda", "nca")
MODES = ("soft", "top1", "batch")
POOLINGS = ("mean", "first", "last")
EXECUTIONS = ("auto", "stream", "compose", "delta")

# The depth used when feature_layer=None, and when too few query examples leave nothing to choose from.
DEFAULT_FEATURE_DEPTH = 1 / 6
DEFAULT_CACHE_BUDGET_BYTES = 0
DEFAULT_METRIC_RANK = 32


@dataclass
class AutoSwitchConfig:
    """How an :class:`~switch_adapter.AutoSwitchModel` routes inputs to its T-Switch adapters.

    Args:
        k: Neighbours retrieved per input among all query features (the reference uses 10 for ViT, 5 for RoBERTa).
        metric: ``"learned"``: Euclidean distance after a projection ``z = L f`` fitted on the query sets' task
            labels (Auto-FlexSwitch's learned metric; refitted when tasks are added or removed; a router with one
            task uses ``"cosine"`` until a second is added). ``"euclidean"`` (the reference) or ``"cosine"``: no
            fitting. ``"auto"`` (default): the one of the three with the best cross-validated routing accuracy on
            the query sets, chosen at build time together with the feature layer (see ``router.feature_choice``).
        metric_rank: Rank ``r`` of the learned projection, at most the feature size. ``None``: 32, or the feature
            size if smaller. ``"lda"`` also caps it at ``tasks - 1``.
        metric_objective: How ``L`` is fitted: ``"lda"`` (default; shrinkage Fisher discriminant, closed form) or
            ``"nca"`` (neighbourhood components analysis, the paper's objective; slower, any rank).
        mode: ``"soft"``: per sample ``base + sum_t w_t * switch_t`` with ``w_t`` the share of the k neighbours
            from task t (the reference's composition); ``"top1"``: only the most represented task (ties: the task
            of the nearest neighbour); ``"batch"``: the soft weights averaged over the batch, one composition for
            all samples (the reference's batch behaviour, for comparison).
        feature_layer: Index into the base model's ``output_hidden_states`` (0 = embedding output, ``-1`` or the
            number of layers = last layer). ``"auto"`` (default): chosen at build time from the query sets: the
            shallowest (cheapest) candidate layer whose cross-validated routing accuracy is within
            ``layer_tolerance`` of the best. ``None``: ``round(feature_depth * number of layers)``, at least 1.
        feature_depth: Relative depth used when ``feature_layer`` is None (or ``"auto"`` with fewer than two
            query examples per task). The forward pass stops at the feature layer, so routing costs about that
            fraction of one base forward.
        layer_tolerance: Cross-validated routing accuracy a cheaper layer may give up against the best one when
            ``feature_layer="auto"``.
        pooling: ``"mean"`` over non-padding tokens, ``"first"`` token, or ``"last"`` non-padding token (for
            decoder LMs; left and right padding both work).
        skip_shared_prefix: For a decoder LM with ``"mean"`` pooling, leave out of the mean the tokens that every
            query prompt starts with (a system prompt, the chat template's opening, BOS), found when the router is
            built and saved with it. Causal attention gives them the same hidden states in every prompt, so they
            carry nothing about the input and only pull all features towards one point. Encoders are unaffected.
        examples_per_task: Query examples kept per task (a seeded random subset when a query set is larger).
        seed: Seed of that subset.
        ood_fallback: Route inputs farther from every query example than the OOD radius to the base model (no
            switch, the base model's head) and flag them in the routing. False: route them like any input.
        ood_quantile: The radius is this quantile of the query examples' leave-one-out nearest-neighbour
            distances ...
        ood_scale: ... times this factor.
        ood_radius: A fixed radius instead of the calibrated one.
        weight_step: Round soft weights to multiples of this step (largest-remainder rounding, the weights still
            sum to 1). ``None``: exact, i.e. multiples of ``1/k``. A coarser step means fewer distinct compositions
            in a mixed batch (less memory and time) for slightly coarser mixing.
        execution: How a batch runs. ``"stream"``: one pass, every sample with its own composition, nothing dense
            kept: each switched layer either adds every row's own tasks' kept entries to one base call (few rows,
            e.g. decoding) or composes each group's weight in a scratch buffer reused across layers (many rows);
            memory is the decoded tables (3 bytes per kept entry). ``"compose"``: dense composed parameters per
            distinct composition, cached within ``cache_budget_bytes`` (forward: one pass per composition on its
            sub-batch; generate: every switched layer runs each composition's rows). ``"delta"``: one pass; linear
            layers add per-task CSR deltas (about 8 bytes per kept entry) to one base matmul. ``"auto"``:
            ``"stream"`` when ``cache_budget_bytes`` is 0 (the default); with a budget, ``compose`` for a forward
            pass with no more distinct compositions than tasks or all of them cached and for a ``generate`` call
            with at most 2 compositions, else ``delta``. All paths give the same outputs up to float rounding.
        cache_budget_bytes: Memory for dense composed parameters kept between calls (LRU). 0 (default): none; the
            router then streams (see ``execution``). With ``"compose"`` the compositions a call needs are always
            built for that call; only what is retained afterwards is bounded.
        feature_batch_size: Batch size when computing query-set features.
        max_length: Truncation length when the router tokenizes text (None: the tokenizer's maximum).
        text_column: Column holding the text when a query set is a ``datasets.Dataset``.
        feature_module: Take routing features from the output of this submodule of the base model (its name in
            ``named_modules()``, e.g. ``"_blocks.10"``; a forward hook, and the forward pass stops there) instead of
            a hidden-state layer; ``feature_layer`` is then ignored. Sequences ``[B, L, D]`` are pooled with
            ``pooling``, feature maps ``[B, C, H, W]`` averaged over ``H, W``. (Or pass ``feature_fn=`` to the
            router for features computed by your own function.)
        image_column: Column holding the images when a query set is a ``datasets.Dataset`` of images (turned
            into ``pixel_values`` by the router's ``image_processor``).
        chat_template: Apply the tokenizer's chat template to text given as plain strings, both query examples and
            inputs (each string becomes one user turn, with the generation prompt), so that raw texts and the
            prompts a chat model sees are featurised alike. Chats (lists of ``{"role", "content"}`` messages) are
            always templated.
    """

    k: int = 10
    metric: Literal["auto", "learned", "cosine", "euclidean"] = "auto"
    metric_rank: int | None = None
    metric_objective: Literal["lda", "nca"] = "lda"
    mode: Literal["soft", "top1", "batch"] = "top1"
    feature_layer: int | Literal["auto"] | None = "auto"
    feature_depth: float = DEFAULT_FEATURE_DEPTH
    layer_tolerance: float = 0.005
    pooling: Literal["mean", "first", "last"] = "mean"
    skip_shared_prefix: bool = True
    examples_per_task: int = 500
    seed: int = 0
    ood_fallback: bool = True
    ood_quantile: float = 0.99
    ood_scale: float = 1.5
    ood_radius: float | None = None
    weight_step: float | None = None
    execution: Literal["auto", "stream", "compose", "delta"] = "auto"
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES
    feature_batch_size: int = 32
    max_length: int | None = None
    text_column: str = "text"
    chat_template: bool = False
    feature_module: str | None = None
    image_column: str = "image"

    def __post_init__(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise ValueError(f"AutoSwitchConfig.{field} must be {expected}, got {getattr(self, field)!r}.")

        if not is_whole(self.k) or self.k < 1:
            fail("k", "a positive integer (number of neighbours, e.g. 10)")
        if self.metric not in METRICS:
            fail("metric", f"one of {METRICS}")
        if self.metric_rank is not None and (not is_whole(self.metric_rank) or self.metric_rank < 1):
            fail("metric_rank", "a positive integer (rank of the learned projection, e.g. 32)")
        if self.metric_objective not in OBJECTIVES:
            fail("metric_objective", f"one of {OBJECTIVES}")
        if not isinstance(self.layer_tolerance, (int, float)) or not 0.0 <= self.layer_tolerance <= 1.0:
            fail("layer_tolerance", "a number in [0, 1]")
        if not isinstance(self.chat_template, bool):
            fail("chat_template", "True or False")
        if not isinstance(self.skip_shared_prefix, bool):
            fail("skip_shared_prefix", "True or False")
        if self.mode not in MODES:
            fail("mode", f"one of {MODES}")
        if self.pooling not in POOLINGS:
            fail("pooling", f"one of {POOLINGS}")
        if self.feature_layer is not None and self.feature_layer != "auto" and not is_whole(self.feature_layer):
            fail("feature_layer", "an integer index into output_hidden_states, 'auto' or None")
        if not isinstance(self.feature_depth, (int, float)) or not 0.0 <= self.feature_depth <= 1.0:
            fail("feature_depth", "a number in [0, 1]")
        if not is_whole(self.examples_per_task) or self.examples_per_task < 1:
            fail("examples_per_task", "a positive integer")
        if not isinstance(self.ood_quantile, (int, float)) or not 0.0 < self.ood_quantile <= 1.0:
            fail("ood_quantile", "a number in (0, 1]")
        if not isinstance(self.ood_scale, (int, float)) or self.ood_scale <= 0:
            fail("ood_scale", "a positive number")
        if self.ood_radius is not None and (not isinstance(self.ood_radius, (int, float)) or self.ood_radius < 0):
            fail("ood_radius", "a non-negative number or None")
        if self.weight_step is not None and (
            not isinstance(self.weight_step, (int, float)) or not 0.0 < self.weight_step <= 1.0
        ):
            fail("weight_step", "a number in (0, 1] or None")
        if self.execution not in EXECUTIONS:
            fail("execution", f"one of {EXECUTIONS}")
        if not is_whole(self.cache_budget_bytes) or self.cache_budget_bytes < 0:
            fail("cache_budget_bytes", "a non-negative integer (bytes)")
        if not is_whole(self.feature_batch_size) or self.feature_batch_size < 1:
            fail("feature_batch_size", "a positive integer")
        if self.feature_module is not None and (not isinstance(self.feature_module, str) or not self.feature_module):
            fail("feature_module", "the name of a submodule (as in model.named_modules()) or None")
        if not isinstance(self.image_column, str) or not self.image_column:
            fail("image_column", "a column name")
        if not isinstance(self.text_column, str) or not self.text_column:
            fail("text_column", "a column name")
        if not is_whole(self.seed):
            fail("seed", "an integer")
        if not isinstance(self.ood_fallback, bool):
            fail("ood_fallback", "True or False")
        if self.max_length is not None and (not is_whole(self.max_length) or self.max_length < 1):
            fail("max_length", "a positive integer or None")

    def resolve_metric_rank(self, feature_size: int) -> int:
        """The learned projection's rank for features of ``feature_size``."""
        return min(DEFAULT_METRIC_RANK, feature_size) if self.metric_rank is None else self.metric_rank

    def resolve_feature_layer(self, num_layers: int) -> int:
        """The ``output_hidden_states`` index in ``[0, num_layers]`` this config selects for a model (for
        ``"auto"``: the fallback depth used when nothing can be chosen)."""
        if self.feature_layer is None or self.feature_layer == "auto":
            return min(num_layers, max(1, round(self.feature_depth * num_layers)))
        layer = self.feature_layer + num_layers + 1 if self.feature_layer < 0 else self.feature_layer
        if not 0 <= layer <= num_layers:
            raise ValueError(
                f"feature_layer={self.feature_layer} is out of range for a model with {num_layers} layers: use an "
                f"index in [{-(num_layers + 1)}, {num_layers}] (0 = embedding output, -1 = last layer)."
            )
        return layer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_compatible_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the fields added for images while they hold their defaults, so that bundles
        of text routers stay readable by older versions."""
        values = self.to_dict()
        for name, default in (("feature_module", None), ("image_column", "image"), ("skip_shared_prefix", True)):
            if values[name] == default:
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AutoSwitchConfig:
        """Build from a dict; unknown keys raise a ``ValueError`` naming them (a newer or foreign config)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown AutoSwitchConfig field(s) {unknown}: the config was written by a newer switch-adapter "
                "(pip install -U switch-adapter) or is not an Auto-Switch config."
            )
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> AutoSwitchConfig:
        return cls.from_dict(json.loads(text))
