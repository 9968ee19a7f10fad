"""Full fine-tuned checkpoint -> T-Switch adapter folder, streaming one tensor at a time."""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from peft.tuners.tuners_utils import check_target_module_exists
from tqdm.auto import tqdm
from transformers import AutoModel, PreTrainedModel

from .._staging import check_output_dir
from .._workers import default_workers
from ..codec import sass
from ..codec.binarize import binarize_encoded
from ..codec.kernels import numba_codec
from ..format import (
    KEY_PREFIX,
    STATISTICS,
    STATISTICS_CHECKSUM,
    layout_entry,
    statistics_attribute,
    statistics_bytes,
    statistics_checksum,
    storage_summary,
)
from ..heads import changed_heads, head_parameter_names, log_heads, output_head_candidates, tensors_differ
from ..tswitch.config import ALL_SUPPORTED_SHORTHAND, TSwitchConfig
from .pipeline import cyclic_gc_paused, run_in_order
from .plain import ModelFactory, build_model, check_state_keys, factory_name, meta_copy, resolve_factory
from .skeleton import (
    PlainSkeleton,
    Skeleton,
    SwitchPlan,
    automatic_heads,
    build_skeleton,
    class_from_architectures,
    module_owners,
    task_type_of,
)
from .sources import ModelLike, SafetensorsSource, TensorSource, open_checkpoint, task_vector_into
from .summary import ConversionSummary, SkippedTensor
from .writer import write_adapter

logger = logging.getLogger(__name__)


@cyclic_gc_paused()
def convert_finetuned(
    base: ModelLike,
    finetuned: ModelLike,
    output_dir: str | os.PathLike,
    config: TSwitchConfig | None = None,
    *,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    model_factory: ModelFactory | type | None = None,
) -> ConversionSummary:
    """Convert a full fine-tuned checkpoint into a T-Switch adapter folder, one tensor at a time.

    Args:
        base: The pre-trained model: a local folder, a Hub repo id, a loaded model (a transformers model or any
            ``torch.nn.Module``), or a plain model's safetensors state dict (a ``.safetensors`` file, a
            ``*.safetensors.index.json``, or a folder of shards without ``config.json``).
        finetuned: The fine-tuned model (same architecture), given in any of the same ways.
        output_dir: The adapter folder to write. It must not exist (or be empty) unless ``overwrite``.
        config: Targets, density, ... (default ``TSwitchConfig()``: every supported layer at the default density).
            ``task_type`` defaults to the one the fine-tune's class implies (``...ForSequenceClassification`` ->
            ``SEQ_CLS``); ``base_model_name_or_path`` to ``base``.
        revision: Hub revision of ``finetuned``. base_revision: Hub revision of ``base``. token: Hub token.
        overwrite: Replace an existing ``output_dir``.
        progress: Show a progress bar over the tensors.
        model_factory: The architecture of a plain ``torch.nn.Module`` (not a transformers model): its class, a
            zero-argument function returning it, or its import path ``"package.module:name"``. Called on the meta
            device (no weights are allocated). Needed when both models are safetensors files; without it a loaded
            plain model gives the architecture. Checkpoint keys must be the module's ``state_dict()`` keys.

    Output heads are found by structure (:func:`switch_adapter.heads.output_head_candidates`: a transformers
    classification head, or the last layer when it maps to fewer outputs than inputs, whatever its name): ``"all"``
    never binarizes them, and one the fine-tune changed is kept in full precision in ``modules_to_save`` when
    ``config.modules_to_save`` is None (logged).

    The adapter is made for the fine-tune's model class (its ``config.architectures``): load it with
    ``PeftModel.from_pretrained(AutoModelFor<Task>.from_pretrained(base), output_dir)``. It is identical to what
    :func:`~switch_adapter.from_finetuned` saves for the same models and config. Tensors are read from the
    safetensors shards a few at a time, on up to 4 threads (the memory they hold together stays that of the two
    largest; fp16 / bf16 are computed in fp32); tensors that only the fine-tune has, and task
    heads, are stored in full precision as ``modules_to_save`` (with ``modules_to_save_shapes`` when their shapes
    differ from the base's); everything else that is not in the switch is listed with the reason in
    ``summary.skipped``.

    Raises ``ValueError`` naming the tensor for different architectures or shapes and NaN/Inf values,
    ``FileNotFoundError`` for missing folders, repos or files, ``FileExistsError`` for an existing output; nothing is
    written then.
    """
    start = time.perf_counter()
    config = _copy_config(config)
    output_dir = check_output_dir(output_dir, overwrite, [base, finetuned])
    plain = model_factory is not None
    if plain:
        resolve_factory(model_factory)  # a bad import path fails before any file is opened
    with contextlib.ExitStack() as stack:
        base_src = stack.enter_context(
            open_checkpoint(base, role="base", revision=base_revision, token=token, plain=plain)
        )
        tuned_src = stack.enter_context(
            open_checkpoint(finetuned, role="fine-tuned", revision=revision, token=token, plain=plain)
        )
        skeleton = _skeleton(base_src, tuned_src, model_factory)
        base_map, tuned_map = skeleton.map_source(base_src), skeleton.map_source(tuned_src)
        _refuse_converted_keys(skeleton, (base_src, base_map), (tuned_src, tuned_map))
        analysis = _analyse(skeleton, base_src, tuned_src, base_map.to_source, tuned_map.to_source, config)
        config = _prepare_config(config, skeleton, analysis, base, base_revision)
        work = _Work(skeleton, config, base_src, tuned_src, base_map.to_source, tuned_map.to_source, progress)
        stack.callback(work.close_bar)
        # peft's injection into a meta model (pure Python) overlaps the encoding of the expected slots (kernels that
        # release the GIL); run() keeps what the plan confirms
        with ThreadPoolExecutor(1, thread_name_prefix="switch-plan") as planner:
            planned = planner.submit(skeleton.plan, config)
            work.encode(_expected_slots(skeleton, config))
            plan = planned.result()
        work.attach(plan)
        work.check_heads()
        tensors = work.run()
    config = plan.config
    config.unit_layout = work.layout
    config.modules_to_save_shapes = work.head_shapes
    config.norm_statistics = work.statistics
    write_adapter(
        output_dir,
        config,
        tensors,
        model_class=skeleton.model_class,
        overwrite=overwrite,
        base_factory=factory_name(model_factory) if model_factory is not None else None,
    )

    reported = base_map.skipped + tuned_map.skipped + analysis.skipped + work.skipped
    skipped = [SkippedTensor(key, reason) for key, reason in dict.fromkeys(reported)]  # once if in both files
    summary = make_summary(output_dir, "finetuned", config, start, work, skipped)
    logger.info("%s", summary)
    return summary


def _expected_slots(skeleton: Skeleton, config: TSwitchConfig) -> list[tuple[str, str]]:
    """:meth:`Skeleton.predicted_slots`, or none when the guess fails (it only saves time; the plan decides)."""
    try:
        return skeleton.predicted_slots(config)
    except Exception as error:  # the plan reports real problems with the targets itself
        logger.debug("No slots encoded ahead of the plan (%s: %s).", type(error).__name__, error)
        return []


def _copy_config(config: TSwitchConfig | None) -> TSwitchConfig:
    if config is None:
        return TSwitchConfig()
    if not isinstance(config, TSwitchConfig):
        raise TypeError(f"config must be a TSwitchConfig, got {type(config).__name__}.")
    config = copy.deepcopy(config)
    config.unit_layout, config.modules_to_save_shapes, config.norm_statistics = {}, {}, {}
    return config


def _skeleton(base_src: TensorSource, tuned_src: TensorSource, model_factory) -> Skeleton:
    """The architecture on the meta device: from ``model_factory``, from a transformers config, or from a loaded
    plain module; for plain modules the checkpoints' keys are checked against it."""
    if model_factory is None and (base_src.config is not None or tuned_src.config is not None):
        if base_src.config is not None and tuned_src.config is not None:
            _check_same_architecture(base_src, tuned_src)
        config = base_src.config if base_src.config is not None else tuned_src.config
        return build_skeleton(_model_class(base_src, tuned_src), config)
    if model_factory is not None:
        skeleton = PlainSkeleton(build_model(model_factory, meta=True))
        origin = f"the module model_factory {factory_name(model_factory)} builds ({skeleton.name})"
    else:
        loaded = next((s.model for s in (base_src, tuned_src) if s.model is not None), None)
        if loaded is None:
            raise ValueError(
                f"Neither the {base_src.description} nor the {tuned_src.description} says what model it holds (plain "
                "safetensors state dicts have no config.json); pass model_factory=... (the model class, a function "
                "that builds it, or 'package.module:name'; --model-factory on the command line). Nothing was written."
            )
        skeleton = PlainSkeleton(meta_copy(loaded))
        origin = skeleton.name
    check_state_keys(skeleton.model, base_src.info(), base_src.description, model_name=origin)
    check_state_keys(skeleton.model, tuned_src.info(), tuned_src.description, model_name=origin)
    return skeleton


def _check_same_architecture(base_src: TensorSource, tuned_src: TensorSource) -> None:
    base_type = getattr(base_src.config, "model_type", None)
    tuned_type = getattr(tuned_src.config, "model_type", None)
    if base_type != tuned_type:
        raise ValueError(
            f"The base and the fine-tuned model have different architectures: {base_src.description} is "
            f"{base_type!r}, {tuned_src.description} is {tuned_type!r}. A switch stores the difference between a "
            "fine-tune and the model it was fine-tuned from; nothing was written."
        )


def _model_class(base_src: TensorSource, tuned_src: TensorSource) -> type:
    """The class the adapter is made for: the fine-tune's (it carries the task head), else the base's."""
    for source in (tuned_src, base_src):
        if isinstance(source.model, PreTrainedModel):
            return type(source.model)
        cls = class_from_architectures(source.config)
        if cls is not None:
            return cls
    try:
        return AutoModel._model_mapping[type(base_src.config)]
    except KeyError:
        raise ValueError(
            f"{base_src.description}: transformers has no model class for {type(base_src.config).__name__} "
            "(custom code is not supported); load both models and use switch_adapter.from_finetuned instead."
        ) from None


def _refuse_converted_keys(skeleton: Skeleton, *pairs) -> None:
    for source, key_map in pairs:
        if key_map.needs_conversion:
            shown = ", ".join(key_map.needs_conversion[:5])
            raise ValueError(
                f"{source.description} stores {len(key_map.needs_conversion)} tensor(s) in a layout that "
                f"transformers fuses or splits while loading {skeleton.name} (e.g. {shown}); the streaming converter "
                "only follows key renames. Load both models with transformers and use switch_adapter.from_finetuned, "
                "or re-save the checkpoint with this transformers version. Nothing was written."
            )


@dataclass
class _Analysis:
    heads: set[str] = field(default_factory=set)  # kept in full precision whatever the config says (new or resized)
    candidates: list[str] = field(default_factory=list)  # modules that look like output heads, by structure
    changed_candidates: list[str] = field(default_factory=list)  # those the fine-tune changed
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _analyse(
    skeleton: Skeleton,
    base_src: TensorSource,
    tuned_src: TensorSource,
    base_keys: dict[str, str],
    tuned_keys: dict[str, str],
    config: TSwitchConfig,
) -> _Analysis:
    """From shapes alone (no data read): task heads to keep in full precision, skips, and shape problems."""
    result = _Analysis(candidates=output_head_candidates(skeleton.model))
    problems = []
    base_info, tuned_info = base_src.info(), tuned_src.info()
    for name in skeleton.shapes:
        base_key, tuned_key = base_keys.get(name), tuned_keys.get(name)
        candidate = next((c for c in result.candidates if name.startswith(c + ".")), None)
        if tuned_key is None:
            if base_key is not None:
                result.skipped.append((base_key, "missing from the fine-tuned checkpoint: the base value stays"))
            continue
        if base_key is None:  # only the fine-tune has it: a new task head (or a part the base never had)
            result.heads.add(skeleton.head_module(name))
            continue
        tuned_shape, base_shape = tuned_info[tuned_key].shape, base_info[base_key].shape
        if skeleton.classification_head(name):  # never switched: kept in full precision
            result.heads.add(skeleton.classification_head(name))
        elif candidate is not None and tuned_shape != base_shape:  # an output head for other labels
            result.heads.add(candidate)
        elif tuned_shape != base_shape:
            if skeleton.is_head(name, config.modules_to_save):
                if not any(o.endswith(m) for o in module_owners(name) for m in config.modules_to_save or ()):
                    result.heads.add(skeleton.head_module(name))
            else:
                problems.append(f"{name}: fine-tuned shape {list(tuned_shape)} != base shape {list(base_shape)}")
        elif base_shape != skeleton.shapes[name]:
            problems.append(
                f"{name}: checkpoint shape {list(base_shape)} != {list(skeleton.shapes[name])} in {skeleton.name} "
                "built from the base config"
            )
    if not problems:
        result.changed_candidates = _changed_candidates(
            skeleton, result.candidates, base_src, tuned_src, base_keys, tuned_keys
        )
    if problems:
        raise ValueError(
            "The fine-tuned checkpoint does not fit the base model:\n  "
            + "\n  ".join(problems[:10])
            + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
            + "\nBoth must have the same architecture and sizes (to keep a resized module in full precision, list it "
            "in config.modules_to_save). Nothing was written."
        )
    return result


def _changed_candidates(
    skeleton: Skeleton,
    candidates: list[str],
    base_src: TensorSource,
    tuned_src: TensorSource,
    base_keys: dict[str, str],
    tuned_keys: dict[str, str],
) -> list[str]:
    """The head candidates whose tensors the fine-tune changed (shape or values; a head is small: read whole)."""

    def differs(name: str) -> bool:
        base_key, tuned_key = base_keys.get(name), tuned_keys.get(name)
        if tuned_key is None:
            return False  # not in the fine-tune: the base value stays
        base_value = base_src.get(base_key) if base_key is not None else None
        return tensors_differ(base_value, tuned_src.get(tuned_key))

    return changed_heads(candidates, lambda name: head_parameter_names(skeleton.model, name), differs)


def _prepare_config(
    config: TSwitchConfig, skeleton: Skeleton, analysis: _Analysis, base: ModelLike, base_revision: str | None
) -> TSwitchConfig:
    """Task type, full-precision heads and base model of the adapter. Heads the fine-tune added or resized are always
    kept; output heads it changed (found by structure) when ``config.modules_to_save`` is None."""
    if config.task_type is None:
        config.task_type = task_type_of(skeleton.model_class)
    automatic = automatic_heads(config.task_type)
    existing = list(config.modules_to_save or [])
    heads = set(analysis.heads)
    if config.modules_to_save is None:
        heads.update(name for name in analysis.changed_candidates if not _targets(config, name))
    added = []
    for head in sorted(heads):
        if head in automatic or any(head.endswith(name) for name in existing):
            continue
        existing.append(head)
        added.append(head)
    structural = [head for head in added if head in analysis.candidates]
    log_heads(structural, "an output layer by structure, changed by the fine-tune")
    config.modules_to_save = existing or None
    record_base(config, base, base_revision)
    return config


def _targets(config: TSwitchConfig, name: str) -> bool:
    """True when explicit ``target_modules`` select module ``name``: then it is switched (the tuner warns that it
    looks like a head), as in ``from_finetuned``."""
    if isinstance(config.target_modules, str) and config.target_modules == ALL_SUPPORTED_SHORTHAND:
        return False
    return bool(check_target_module_exists(config, name))


def record_base(config: TSwitchConfig, base: ModelLike, base_revision: str | None) -> None:
    """Fill ``base_model_name_or_path`` (the base's path, Hub id or ``name_or_path``) and ``revision`` where the
    caller left them empty."""
    if not config.base_model_name_or_path:
        if isinstance(base, (str, os.PathLike)):
            config.base_model_name_or_path = os.fspath(base)
        else:
            config.base_model_name_or_path = getattr(base, "name_or_path", None) or None
    if base_revision and not config.revision:
        config.revision = base_revision


class _Work:
    """The streaming pass: switches for the targeted tensors, full-precision heads, and a check of the rest.

    :meth:`encode` may start on the slots the plan is expected to have (:meth:`Skeleton.predicted_slots`) while
    another thread makes the plan; :meth:`run`, once the plan is attached, uses those results for the slots the plan
    has, drops the others, and computes whatever is left.
    """

    def __init__(
        self,
        skeleton: Skeleton,
        config: TSwitchConfig,
        base_src: TensorSource,
        tuned_src: TensorSource,
        base_keys: dict[str, str],
        tuned_keys: dict[str, str],
        progress: bool = False,
    ) -> None:
        self.skeleton = skeleton
        self.progress = progress
        self.encoding = config  # density, scale rule, ties: as in the plan's config, which peft copies from it
        self.base_src, self.tuned_src = base_src, tuned_src
        self.base_keys, self.tuned_keys = base_keys, tuned_keys
        self.layout: dict[str, dict[str, dict]] = {}
        self.head_shapes: dict[str, dict[str, list[int]]] = {}
        self.skipped: list[tuple[str, str]] = []
        self.unchanged = 0
        self.tensors_read = 0
        self.head_bytes = 0
        self.statistics: dict[str, dict[str, list[int]]] = {}  # config.norm_statistics
        self.workers = default_workers()  # threads that read and encode tensors (pipeline.py)
        self.encoded: dict[tuple[str, str], tuple[bool, object]] = {}  # encode()'s (succeeded, result or error)
        self.bar = None

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def attach(self, plan: SwitchPlan) -> None:
        """Take the plan: what peft saves, hence which tensors become switches, heads or checked tensors."""
        self.plan = plan
        self.switch_keys, self.head_keys = plan.split_keys()
        self.placeholders = plan.placeholders()

    def _switch_job(self, slot: tuple[str, str], index: int) -> tuple:
        name = f"{slot[0]}.{slot[1]}"
        return ("switch", slot, self.tuned_keys.get(name), self.base_keys.get(name), index)

    def _execute(self, jobs: list[tuple], compute=None):
        """``(job, compute(job))`` of ``jobs`` (those with their tensors in both checkpoints; ``compute`` defaults to
        :meth:`_compute`), in shard order, on the worker threads, with the progress bar advanced for each."""
        ordered = [job for job in self._order(jobs) if job[0] == "head" or (job[2] is not None and job[3] is not None)]
        if self.bar is None:
            self.bar = tqdm(desc="Converting", unit="tensor", total=len(ordered), disable=not self.progress)
        else:
            self.bar.total += len(ordered)
            self.bar.refresh()
        costs = sorted((self._cost(job) for job in ordered), reverse=True)
        budget = sum(costs[:2])  # the two largest jobs may run together (and any smaller ones)
        done = 0
        try:
            results = run_in_order(ordered, compute or self._compute, self._cost, budget, self.workers)
            with contextlib.closing(results):
                for job, value in results:
                    self.bar.update()
                    done += 1
                    yield job, value
        finally:
            _scratch_buffers.__dict__.clear()  # one worker runs the jobs in this thread: do not keep its buffer
            self.bar.total -= len(ordered) - done  # stopped early: the jobs left are not this bar's any more

    def encode(self, slots: list[tuple[str, str]]) -> None:
        """Build the switches of ``slots`` ahead of the plan (kept in :attr:`encoded` until :meth:`run`). The first
        error stops it and is kept with its slot: raised if the plan switches that slot; if not, the slots left are
        encoded after the plan."""

        def attempt(job: tuple) -> tuple[bool, object]:
            try:
                return True, self._compute(job)
            except Exception as error:
                return False, error

        jobs = [self._switch_job(slot, index) for index, slot in enumerate(slots)]
        for (_, slot, _, _, _), outcome in self._execute(jobs, attempt):
            self.encoded[slot] = outcome
            if not outcome[0]:
                break

    def check_heads(self) -> None:
        """Every ``modules_to_save`` tensor must come from the fine-tune; record shapes that differ from the base."""
        problems = []
        for wrapper, name in self.head_keys.values():
            tuned_key = self.tuned_keys.get(name)
            if tuned_key is None:
                problems.append(f"{name} (in modules_to_save) is missing from the fine-tuned checkpoint")
                continue
            shape = self.tuned_src.info()[tuned_key].shape
            if shape != self.skeleton.shapes.get(name):
                self.head_shapes.setdefault(wrapper, {})[name[len(wrapper) + 1 :]] = list(shape)
        if problems:
            raise ValueError("Cannot store the task heads:\n  " + "\n  ".join(problems) + "\nNothing was written.")

    def _order(self, jobs: list[tuple]) -> list[tuple]:
        """The jobs in shard order (fine-tune's, then base's), then in model order: reads stay local to a shard."""

        def shard(source: TensorSource, key: str | None) -> str:
            return (source.info()[key].file or "") if key else ""

        return sorted(
            jobs,
            key=lambda job: (shard(self.tuned_src, job[2]), shard(self.base_src, job[3]), job[4]),
        )

    def run(self) -> dict[str, torch.Tensor]:
        """Every tensor the adapter file holds (switches, heads, statistics, placeholders), after the plan is
        attached; fills the layout, the skipped tensors and the counts."""
        slot_names = {f"{m}.{p}" for m, p in self.plan.slots}
        head_names = {name for _, name in self.head_keys.values()}
        jobs = [self._switch_job(slot, index) for index, slot in enumerate(self.plan.slots) if slot not in self.encoded]
        for key, (_, name) in self.head_keys.items():
            jobs.append(("head", key, self.tuned_keys[name], None, len(jobs)))
        statistic_names = {f"{module}.{part}" for module in self.plan.statistics for part in STATISTICS}
        counters = {f"{module}.num_batches_tracked" for module in self.plan.statistics}  # a counter, not carried
        for name in self.skeleton.shapes:  # tensors neither switched nor saved: were they changed?
            if name in slot_names or name in head_names or name in self.skeleton.tied:
                continue
            if name in statistic_names or name in counters:
                continue
            if name in self.tuned_keys and name in self.base_keys:
                jobs.append(("check", name, self.tuned_keys[name], self.base_keys[name], len(jobs)))
        tensors = dict(self.placeholders)
        switches: dict[tuple[str, str], dict] = {}
        planned = set(self.plan.slots)
        ahead = []
        for slot, (succeeded, value) in self.encoded.items():
            if slot in planned:
                if not succeeded:
                    raise value
                ahead.append((self._switch_job(slot, 0), value))
        for (kind, what, tuned_key, _, _), value in itertools.chain(ahead, self._execute(jobs)):
            self.tensors_read += 1 if kind == "head" else 2
            if kind == "head":
                tensors[what] = value
                self.head_bytes += value.numel() * value.element_size()
            elif kind == "check":
                if not value:
                    self.skipped.append(
                        (
                            tuned_key,
                            "changed by the fine-tune but not targeted: dropped (add it to target_modules or "
                            "modules_to_save to keep it)",
                        )
                    )
            elif value is None:
                self.unchanged += 1
            else:
                switches[what] = value
                code, scale = value.pop("_tensors")
                code_key, scale_key = self.switch_keys[what]
                tensors[code_key], tensors[scale_key] = code, scale.to(tensors[scale_key].dtype)
        self.encoded.clear()
        for module_name, param_name in self.plan.slots:  # layout in model order, as from_finetuned writes it
            entry = switches.get((module_name, param_name))
            if entry is not None:
                self.layout.setdefault(module_name, {})[param_name] = entry
        tensors.update(self._statistics())
        return tensors

    def _statistics(self) -> dict[str, torch.Tensor]:
        """The fine-tuned running statistics of every targeted norm layer whose statistics the fine-tune changed, in
        the dtype of the base checkpoint's buffers (``format.py``: ``tswitch_stat_*`` keys, format version 4)."""
        tensors: dict[str, torch.Tensor] = {}
        problems = []
        for module_name in self.plan.statistics:
            names = {part: f"{module_name}.{part}" for part in STATISTICS}
            tuned_keys = {part: self.tuned_keys.get(name) for part, name in names.items()}
            base_keys = {part: self.base_keys.get(name) for part, name in names.items()}
            if None in tuned_keys.values() or None in base_keys.values():
                continue  # a checkpoint without these buffers: nothing to carry (reported by the analysis)
            values, changed = {}, False
            for part in STATISTICS:
                base_value = self._read(self.base_src, base_keys[part])
                tuned = self._read(self.tuned_src, tuned_keys[part])
                if tuned.shape != base_value.shape:
                    problems.append(
                        f"{names[part]}: fine-tuned shape {list(tuned.shape)} != base {list(base_value.shape)}"
                    )
                    continue
                changed = changed or tensors_differ(base_value, tuned)
                values[part] = tuned.to(base_value.dtype).clone()
            if len(values) < len(STATISTICS) or not changed:
                continue
            for part, value in values.items():
                tensors[f"{KEY_PREFIX}{module_name}.{statistics_attribute(part)}"] = value
            tensors[f"{KEY_PREFIX}{module_name}.{STATISTICS_CHECKSUM}"] = statistics_checksum(
                values["running_mean"], values["running_var"]
            )
            self.statistics[module_name] = {part: list(value.shape) for part, value in values.items()}
        if problems:
            raise ValueError(
                "The fine-tuned running statistics do not fit the base model:\n  "
                + "\n  ".join(problems[:10])
                + "\nNothing was written."
            )
        return tensors

    def _read(self, source: TensorSource, key: str) -> torch.Tensor:
        self.tensors_read += 1
        return source.get(key)

    def _cost(self, job: tuple) -> int:
        """Bytes a job holds while it runs: its tensors in float32 (a check holds both of its tensors)."""
        kind, _, tuned_key, base_key, _ = job
        numel = self.tuned_src.info()[tuned_key].numel
        return numel * 4 * (2 if kind == "check" else 1)

    def _compute(self, job: tuple):
        """A job's result, without side effects (it runs on a worker thread): a head's tensor, whether a checked
        tensor is unchanged, or a switch's layout entry (None when the fine-tune left the tensor unchanged)."""
        kind, what, tuned_key, base_key, _ = job
        if kind == "head":
            value = self.tuned_src.get(tuned_key).clone()
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(
                    f"{tuned_key} in the {self.tuned_src.description} holds NaN/Inf values; check the fine-tuned "
                    "checkpoint (a diverged run or a broken file). Nothing was written."
                )
            return value
        if kind == "check":
            tuned, base_value = self.tuned_src.get(tuned_key), self.base_src.get(base_key)
            return torch.equal(tuned.to(base_value.dtype), base_value)
        return self._switch(what, tuned_key, base_key)

    def _switch(self, slot: tuple[str, str], tuned_key: str, base_key: str) -> dict | None:
        module_name, param_name = slot
        tau = _scratch(self.tuned_src.info()[tuned_key].shape)
        if not task_vector_into(self.tuned_src, tuned_key, self.base_src, base_key, tau):  # both float32 files
            tuned = self.tuned_src.get(tuned_key)
            # fp32 task vector, computed in place when the tensor read from a file is ours (one buffer less)
            tau = tuned.to(torch.float32, copy=not isinstance(self.tuned_src, SafetensorsSource))
            del tuned
            if not (isinstance(self.base_src, SafetensorsSource) and self.base_src.subtract_from(base_key, tau)):
                base_value = self.base_src.get(base_key)  # else read in chunks, never whole
                _subtract(tau, base_value.to(torch.float32))
                del base_value
        if not _any_nonzero(tau):
            return None
        config = self.encoding
        density = config.density_for(module_name)
        try:  # checks for NaN/Inf on the way
            blob, scale = binarize_encoded(
                tau, density, config.scale_granularity, name=f"{module_name}.{param_name}",
                scale_rule=config.scale_rule, keep_ties=config.keep_ties, overwrite=True,
            )  # fmt: skip
        except ValueError:
            if torch.isfinite(tau).all():
                raise
            culprit, source = base_key, self.base_src
            if not torch.isfinite(self.tuned_src.get(tuned_key)).all():
                culprit, source = tuned_key, self.tuned_src
            raise ValueError(
                f"{culprit} in the {source.description} holds NaN/Inf values; check the checkpoint (a diverged run "
                "or a broken file). Nothing was written."
            ) from None
        shape = tau.shape
        del tau
        entry = layout_entry(shape, blob, int(scale.numel()))
        return {**entry, "density": density, "_tensors": (blob, scale.to(torch.float32))}


#: Largest float32 buffer a worker thread keeps for the next task vector (bytes); larger ones are freed after use.
SCRATCH_BYTES = 64 << 20
_scratch_buffers = threading.local()


def _scratch(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape`` for this thread's next task vector: the same memory from one
    tensor to the next (no fresh pages to fault in) up to :data:`SCRATCH_BYTES`."""
    numel = math.prod(shape)
    if numel * 4 > SCRATCH_BYTES:
        return torch.empty(shape, dtype=torch.float32)
    buffer = getattr(_scratch_buffers, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch_buffers.buffer = torch.empty(max(numel, 1 << 18), dtype=torch.float32)
    return buffer[:numel].view(shape)


def _subtract(tau: torch.Tensor, base: torch.Tensor) -> None:
    """``tau -= base`` in place; with numpy on the CPU, where torch's elementwise ops are slow on shared cores."""
    if tau.device.type == "cpu" and base.device == tau.device and tau.is_contiguous() and base.is_contiguous():
        np.subtract(tau.numpy(), base.numpy(), out=tau.numpy())
    else:
        tau.sub_(base)


def _any_nonzero(tau: torch.Tensor) -> bool:
    """Whether ``tau`` holds a nonzero entry (numba, stopping at the first one, or numpy on the CPU)."""
    if tau.device.type == "cpu" and tau.is_contiguous():
        kernels = numba_codec()
        if kernels is not None:
            return bool(kernels.any_nonzero(tau.reshape(-1).numpy()))
        return bool(np.count_nonzero(tau.numpy()))
    return bool(torch.count_nonzero(tau))


def encode_switch(switch) -> torch.Tensor:
    """The SASS blob of a :class:`~switch_adapter.codec.binarize.BinarySwitch`, with its value bits and levels."""
    return sass.encode(switch.mask, switch.positive, value_bits=switch.value_bits, levels=switch.levels)


def encoded_entry(switch, density: float) -> dict:
    """The ``unit_layout`` entry of a switch, with its encoded blob and scale under ``"_tensors"``."""
    blob = encode_switch(switch)
    entry = layout_entry(switch.shape, blob, int(switch.scale.numel()))
    return {**entry, "density": density, "_tensors": (blob, switch.scale.to(torch.float32))}


def make_summary(
    output_dir: str, mode: str, config: TSwitchConfig, start: float, work, skipped: list[SkippedTensor]
) -> ConversionSummary:
    storage = storage_summary(config)
    return ConversionSummary(
        output_dir=output_dir,
        mode=mode,
        units=storage.units,
        parameters=storage.parameters,
        kept=storage.kept,
        switch_bytes=storage.switch_bytes,
        bound_bytes=storage.bound_bytes,
        value_bits_kept=storage.value_bits_kept,
        tensors_read=work.tensors_read,
        unchanged=work.unchanged,
        heads=sorted(work.plan.heads) if work.head_bytes else [],
        head_bytes=work.head_bytes,
        statistics=sorted(getattr(config, "norm_statistics", None) or {}),
        statistics_bytes=statistics_bytes(config.norm_statistics) if getattr(config, "norm_statistics", None) else 0,
        skipped=skipped,
        seconds=time.perf_counter() - start,
    )
