"""Every public ``AutoSwitchModel`` method that touches shared state holds the router's lock (issue #8), and the
Auto-Switch errors belong to the library's exception hierarchy."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import finetune_copy, tiny_bert

from switch_adapter import AutoSwitchConfig, AutoSwitchModel, SwitchAdapterError, TSwitchConfig, from_finetuned
from switch_adapter.autoswitch import (
    AdapterMismatchError,
    BundleError,
    DuplicateTaskError,
    EmptyQuerySetError,
    FeatureMismatchError,
)


class ObservedLock:
    """A re-entrant lock that signals when a thread other than its owner starts waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self.contended = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._owner is not None and self._owner != threading.get_ident():
            self.contended.set()
        acquired = self._lock.acquire(blocking, timeout)
        if acquired:
            self._owner = threading.get_ident()
        return acquired

    def release(self) -> None:
        self._lock.release()
        if not self._lock._is_owned():
            self._owner = None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    folder = tmp_path_factory.mktemp("switches")
    adapters, queries = {}, {}
    for t, name in enumerate(("alpha", "beta")):
        base = tiny_bert()
        from_finetuned(
            base, finetune_copy(base, seed=t + 1), TSwitchConfig(density=0.3), progress=False
        ).save_pretrained(folder / name)
        adapters[name] = str(folder / name)
        queries[name] = {
            "input_ids": torch.randint(10 + 10 * t, 15 + 10 * t, (8, 6), generator=torch.Generator().manual_seed(t))
        }
    return AutoSwitchModel.from_pretrained(
        tiny_bert(), adapters=adapters, query_sets=queries, config=AutoSwitchConfig(k=3), progress=False
    )


CALLS = {
    "route": lambda r: r.route(torch.tensor([[11, 12, 13]])),  # locked before issue #8: checks the harness
    "to": lambda r: r.to(torch.float32),
    "float": lambda r: r.float(),
    "train": lambda r: r.train(False),
    "eval": lambda r: r.eval(),
    "memory_footprint": lambda r: r.memory_footprint(),
    "cache_info": lambda r: r.cache_info(),
    "clear_cache": lambda r: r.clear_cache(),
    "tasks": lambda r: r.tasks,
    "query_features": lambda r: r.query_features,
    "radius": lambda r: r.radius,
}


@pytest.mark.parametrize("call", list(CALLS))
def test_public_method_waits_for_the_lock(router, call):
    lock = ObservedLock()
    original, router._lock = router._lock, lock
    finished = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            CALLS[call](router)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
        finally:
            finished.set()

    try:
        with lock:  # this thread holds the router's lock: the call must wait for it
            worker = threading.Thread(target=work)
            worker.start()
            # Either the worker starts waiting for the lock (correct), or it finishes without it (the bug).
            while not (lock.contended.is_set() or finished.is_set()):
                lock.contended.wait(0.01)
            assert lock.contended.is_set() and not finished.is_set(), f"{call} ran without holding the lock"
        worker.join()
    finally:
        router._lock = original
    assert finished.is_set() and not errors, errors


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (AdapterMismatchError, ValueError),
        (DuplicateTaskError, ValueError),
        (FeatureMismatchError, ValueError),
        (EmptyQuerySetError, ValueError),
        (BundleError, FileNotFoundError),
    ],
)
def test_autoswitch_errors_are_switch_adapter_errors(error, builtin):
    assert issubclass(error, SwitchAdapterError) and issubclass(error, builtin)
