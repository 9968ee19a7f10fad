"""Auto-Switch bundles: a router's config, query features and adapters in one folder or Hub repo.

Layout::

    autoswitch_config.json       router config, tasks (with adapter locations), feature spec, base model, radius
    query_features.safetensors   "features" (fp16 [examples, hidden]), "task_ids" (int64 [examples]) and, with
                                 the learned metric, "projection" (fp32 [rank, hidden], the fitted L)
    adapters/<task>/             each adapter as PEFT saves it (unless stored as a Hub reference)
    tokenizer/                   the router's tokenizer, if it has one
    image_processor/             the router's image processor, if it has one (and it has save_pretrained)
    README.md                    model card (Hub only)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._model_sources import resolve_folder
from .._staging import atomic_output_dir
from ..errors import SwitchAdapterError
from .bundle_checks import damaged, description_problems, features_problems
from .config import AutoSwitchConfig
from .features import FeatureSpec, QueryFeatures, base_fingerprint
from .metric import LearnedMetric
from .selection import FeatureChoice, choice_from_dict
from .sources import AdapterMismatchError, AdapterSource

BUNDLE_CONFIG = "autoswitch_config.json"
FEATURES_FILE = "query_features.safetensors"
BUNDLE_FORMAT = "switch-adapter/auto-switch"
# 2: the routing metric in use, and the learned projection; 3: feature sources other than text (hidden states:
# module, block list, callable; image / tensor inputs); 4: mean pooling without the query prompts' shared prefix
BUNDLE_VERSION = 4
LEARNED_SINCE = 2
FEATURE_SOURCES_SINCE = 3
SHARED_PREFIX_SINCE = 4


class BundleError(SwitchAdapterError, FileNotFoundError):
    """A bundle is incomplete (missing adapters or files), damaged (malformed config or query features) or not an
    Auto-Switch bundle."""


class Router(Protocol):
    """The public surface of :class:`~switch_adapter.AutoSwitchModel` that a bundle is written from."""

    model: Any  # the PeftModel holding the tasks' adapters
    config: AutoSwitchConfig
    tokenizer: Any

    @property
    def tasks(self) -> list[str]: ...

    @property
    def query_features(self) -> dict[str, QueryFeatures]: ...

    @property
    def feature_spec(self) -> FeatureSpec: ...

    @property
    def radius(self) -> float: ...

    @property
    def metric(self) -> str: ...

    @property
    def learned_metric(self) -> LearnedMetric | None: ...

    @property
    def feature_choice(self) -> FeatureChoice | None: ...

    @property
    def inner(self) -> torch.nn.Module: ...

    def adapter_source(self, task: str) -> AdapterSource | None: ...


@dataclass
class BundleContents:
    """What a bundle holds, checked against the base model: the adapters, query features, config and tokenizer."""

    sources: dict[str, AdapterSource]
    query_sets: list[tuple[str, QueryFeatures]]
    config: AutoSwitchConfig
    folder: Path
    metric: str | None = None
    learned: LearnedMetric | None = None
    choice: FeatureChoice | None = None
    query_format: str | None = None

    def routing_for(self, config: AutoSwitchConfig) -> dict[str, Any]:
        """``build_index`` arguments restoring the stored metric, unless ``config`` names another one."""
        if self.metric is None or config.metric not in ("auto", self.metric):
            return {}
        return {"metric": self.metric, "learned": self.learned, "choice": self.choice}

    def load_image_processor(self) -> Any:
        """The bundle's image processor, or None if it has none."""
        if not (self.folder / "image_processor").is_dir():
            return None
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(self.folder / "image_processor"))

    def load_tokenizer(self) -> Any:
        """The bundle's tokenizer, or None if it has none."""
        if not (self.folder / "tokenizer").is_dir():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder / "tokenizer"))


def save_bundle(router: Router, save_directory: str | os.PathLike, *, adapters: str = "copy") -> Path:
    """Write ``router`` as a bundle into ``save_directory`` (via a temporary sibling folder and a rename)."""
    if adapters not in ("copy", "reference"):
        raise ValueError(f"adapters must be 'copy' or 'reference', got {adapters!r}.")
    target = Path(save_directory).resolve()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / BUNDLE_CONFIG).exists())):
        raise FileExistsError(
            f"{target} exists and is not an Auto-Switch bundle; choose an empty or new folder (nothing was written)."
        )
    with atomic_output_dir(target, overwrite=True) as staging:
        work = Path(staging)
        tasks = []
        query = router.query_features
        for task in router.tasks:
            source = router.adapter_source(task)
            entry: dict[str, Any] = {"name": task, "examples": len(query[task])}
            if adapters == "reference" and source is not None and not source.is_local:
                entry["adapter"] = {"repo_id": source.location, "revision": source.revision}
                if source.subfolder:
                    entry["adapter"]["subfolder"] = source.subfolder
            else:
                _save_adapter(router, task, work / "adapters" / task)
                entry["adapter"] = {"path": f"adapters/{task}"}
            tasks.append(entry)
        bank = torch.cat([query[task].features for task in router.tasks]).to(torch.float16).contiguous()
        task_ids = torch.cat([torch.full((len(query[t]),), i, dtype=torch.long) for i, t in enumerate(router.tasks)])
        metadata = {"spec": json.dumps(router.feature_spec.to_dict()), "tasks": json.dumps(router.tasks)}
        tensors = {"features": bank, "task_ids": task_ids}
        learned, choice = router.learned_metric, router.feature_choice
        if learned is not None:
            tensors["projection"] = learned.projection.float().contiguous().cpu()
        save_file(tensors, str(work / FEATURES_FILE), metadata=metadata)
        inner = router.inner
        description = {
            "format": BUNDLE_FORMAT,
            "format_version": _format_version(router),
            "config": router.config.to_compatible_dict(),
            "tasks": tasks,
            "features": router.feature_spec.to_dict(),
            "routing": {
                "metric": router.metric,
                "learned": learned.describe() if learned is not None else None,
                "choice": choice.describe() if choice is not None else None,
                "query_format": getattr(router, "query_format", None),
            },
            "base_model": {
                "name_or_path": getattr(inner, "name_or_path", "") or "",
                "class": type(inner).__name__,
                "fingerprint": base_fingerprint(inner),
            },
            "ood_radius": router.radius if router.radius != float("inf") else None,
        }
        (work / BUNDLE_CONFIG).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        if router.tokenizer is not None:
            router.tokenizer.save_pretrained(str(work / "tokenizer"))
        processor = getattr(router, "image_processor", None)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(str(work / "image_processor"))
    return target


def _format_version(router: Router) -> int:
    """The lowest format version that holds what ``router`` needs, so older readers keep reading text bundles."""
    if router.feature_spec.shared_prefix:
        return SHARED_PREFIX_SINCE
    if not router.feature_spec.is_text_default:
        return FEATURE_SOURCES_SINCE
    return LEARNED_SINCE if router.learned_metric is not None else 1


def _save_adapter(router: Router, task: str, destination: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        router.model.save_pretrained(scratch, selected_adapters=[task])
        folder = Path(scratch) / task
        if not (folder / "adapter_config.json").exists():
            raise RuntimeError(f"peft did not write the adapter of task {task!r} where expected ({folder}).")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, destination)


def _resolve(bundle: str | os.PathLike, revision: str | None, token: str | None) -> Path:
    return Path(resolve_folder(bundle, what="Auto-Switch bundle", revision=revision, token=token))


def read_bundle_description(folder: Path) -> dict[str, Any]:
    config_path = folder / BUNDLE_CONFIG
    if not config_path.is_file():
        raise BundleError(f"{folder} holds no {BUNDLE_CONFIG}: it is not an Auto-Switch bundle (save_pretrained).")
    try:
        description = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(damaged(config_path, f"it is not valid JSON ({error})")) from error
    if not isinstance(description, dict):
        raise BundleError(damaged(config_path, f"it holds a JSON {type(description).__name__}, not an object"))
    if description.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{config_path} is not an Auto-Switch bundle config (format {description.get('format')!r}).")
    version = description.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise BundleError(damaged(config_path, f"'format_version' must be a whole number, got {version!r}"))
    if version > BUNDLE_VERSION:
        raise ValueError(
            f"The bundle uses format version {version}, this switch-adapter reads up to {BUNDLE_VERSION}. "
            "Upgrade it: pip install -U switch-adapter"
        )
    problems = description_problems(description)
    if problems:
        raise BundleError(damaged(config_path, problems))
    return description


def read_bundle(
    bundle: str | os.PathLike,
    base_model: torch.nn.Module,
    *,
    revision: str | None = None,
    token: str | None = None,
) -> BundleContents:
    """Read a bundle (folder or Hub repo) and check that it was made for ``base_model``, which is not modified.

    Raises :class:`BundleError` (not a bundle, files missing) or ``AdapterMismatchError`` (another base model).
    """
    folder = _resolve(bundle, revision, token)
    description = read_bundle_description(folder)
    stored = description["base_model"]
    inner = base_model.get_base_model() if hasattr(base_model, "get_base_model") else base_model
    fingerprint = base_fingerprint(inner)
    if fingerprint != stored["fingerprint"]:
        raise AdapterMismatchError(
            f"The bundle {bundle} was made for base model {stored['name_or_path'] or stored['class']!r} (parameter "
            f"fingerprint {stored['fingerprint']}), but the given {type(inner).__name__} has fingerprint "
            f"{fingerprint}: other parameter names or shapes. Load the bundle onto the base model it was made for "
            "(same class and number of labels)."
        )
    sources: dict[str, AdapterSource] = {}
    missing = []
    for entry in description["tasks"]:
        adapter = entry["adapter"]
        if "path" in adapter:
            path = folder / adapter["path"]
            if not (path / "adapter_config.json").is_file():
                missing.append(f"{entry['name']}: {adapter['path']}")
            sources[entry["name"]] = AdapterSource(str(path))
        else:
            sources[entry["name"]] = AdapterSource(
                adapter["repo_id"], adapter.get("revision"), adapter.get("subfolder")
            )
    if missing:
        raise BundleError(
            f"The bundle {bundle} lists adapters that are missing from it:\n  "
            + "\n  ".join(missing)
            + "\nRe-save the bundle (save_pretrained with adapters='copy') or restore those folders."
        )
    features_path = folder / FEATURES_FILE
    if not features_path.is_file():
        raise BundleError(f"The bundle {bundle} has no {FEATURES_FILE}: re-save it with save_pretrained.")
    names = [entry["name"] for entry in description["tasks"]]
    config_file = folder / BUNDLE_CONFIG
    try:
        with safe_open(str(features_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            bank = handle.get_tensor("features")
            task_ids = handle.get_tensor("task_ids")
            projection = handle.get_tensor("projection") if "projection" in handle.keys() else None
        stored_spec = FeatureSpec.from_dict(json.loads(metadata["spec"])) if "spec" in metadata else None
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
        raise BundleError(damaged(features_path, f"it cannot be read ({error})")) from error
    problems = features_problems(bank, task_ids, projection, names)
    if problems:
        raise BundleError(damaged(features_path, problems))
    with _reading(config_file, "its 'features' entry"):
        spec = FeatureSpec.from_dict(description["features"])
    if stored_spec is not None:
        spec.check_matches(stored_spec, f"{FEATURES_FILE} of {bundle}")
    query = [(name, QueryFeatures(bank[task_ids == i], spec)) for i, name in enumerate(names)]
    routing = description.get("routing") or {}
    learned = None
    if routing.get("metric") == "learned":
        record = routing.get("learned") or {}
        if projection is None or not record:
            raise BundleError(
                f"The bundle {bundle} routes with a learned metric but holds no projection in {FEATURES_FILE}: "
                "re-save it with save_pretrained."
            )
        with _reading(config_file, "its learned metric"):
            learned = LearnedMetric(
                projection, record["objective"], list(record["tasks"]), list(record["examples_per_task"])
            )
        learned.check_feature_size(int(bank.shape[1]), f"the bundle {bundle}")
    with _reading(config_file, "its layer choice"):
        choice = choice_from_dict(routing["choice"]) if routing.get("choice") else None
    config = AutoSwitchConfig.from_dict(description["config"])
    return BundleContents(
        sources, query, config, folder, routing.get("metric"), learned, choice, routing.get("query_format")
    )


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Raise :class:`BundleError` naming ``what`` of the bundle file ``path`` for a malformed value met inside."""
    try:
        yield
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise BundleError(damaged(path, f"{what} cannot be read ({error!r})")) from error


def push_bundle(
    router: Router,
    repo_id: str,
    *,
    adapters: str = "copy",
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload ``router`` as a bundle with a model card; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "bundle"
        save_bundle(router, folder, adapters=adapters)
        (folder / "README.md").write_text(model_card(router, repo_id), encoding="utf-8")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message or "Upload Auto-Switch bundle",
            create_pr=create_pr,
        )
    return str(commit)


def model_card(router: Router, repo_id: str) -> str:
    base = getattr(router.inner, "name_or_path", "") or type(router.inner).__name__
    config = router.config
    spec = router.feature_spec
    query = router.query_features
    rows = "\n".join(f"| {task} | {len(query[task])} |" for task in router.tasks)
    metric = f"{router.metric} distance"
    learned, choice = router.learned_metric, router.feature_choice
    if learned is not None:
        how = {"lda": "a Fisher discriminant with Ledoit-Wolf shrinkage",
               "nca": "neighbourhood components analysis (scikit-learn)"}[learned.objective]  # fmt: skip
        metric = (
            f"Euclidean distance in a learned rank-{learned.rank} projection of the features, fitted with {how} on "
            f"the query sets' task labels ({sum(learned.examples)} examples)"
        )
    chosen = ""
    if choice is not None:
        chosen = (
            f"\nLayer and metric were chosen at build time from the query sets alone: {choice.folds}-fold "
            f"cross-validated routing accuracy {choice.accuracy:.3f}, the shallowest layer within "
            f"{choice.tolerance:g} of the best.\n"
        )
    kind = spec.input_kind
    example_input = {"text": '["some text"]', "pixel_values": "pixel_values", "tensor": "inputs"}[kind]
    callable_note = (
        f"\nThe routing features come from a function (`{spec.module}`) that is not stored here: pass it again as "
        "`from_pretrained(..., feature_fn=...)`.\n"
        if spec.source == "callable"
        else ""
    )
    source = {
        "hidden_states": f"layer {spec.layer} of {spec.num_layers}",
        "blocks": f"block output {spec.layer} of {spec.num_layers} in `{spec.module}`",
        "module": f"the output of module `{spec.module}`",
        "callable": "a user function",
    }[spec.source]
    return f"""---
library_name: switch-adapter
tags:
- auto-switch
- t-switch
- peft
---

# Auto-Switch bundle

{len(router.tasks)} T-Switch adapters on `{base}`, routed per sample by k-nearest-neighbour retrieval over query
features of the base model ({source}, {spec.pooling} pooling; k={config.k},
{metric}; mode `{config.mode}`).
{chosen}
| task | query examples |
|---|---|
{rows}

```python
from switch_adapter import AutoSwitchModel

router = AutoSwitchModel.from_pretrained("{repo_id}", base_model=base_model)  # the base model object
outputs, routing = router({example_input}, return_routing=True)
```
{callable_note}"""
