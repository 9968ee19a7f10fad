"""Shared pytest configuration for the switch_adapter test-suite."""

# =====================================================================================================
# Local Hugging Face Hub (tests/hub_server.py)
#
# ONE in-process Hub-compatible HTTP server is started for the whole test session, at import time of
# this conftest: `huggingface_hub` reads HF_ENDPOINT (and HF_HUB_DISABLE_XET, HF_HOME, ...) when it is
# first imported, so all of this must happen before anything imports huggingface_hub / transformers /
# peft. Do not import those libraries above this section. Tests then use the real client unmodified.
#
#   HF_ENDPOINT          -> the local server (random free port on 127.0.0.1)
#   HF_TOKEN             -> "hf_test_token" unless already set (the server accepts any bearer token)
#   HF_HUB_OFFLINE       -> "0" (TRANSFORMERS_OFFLINE is removed)
#   HF_HUB_DISABLE_XET   -> "1": the client picks Xet uploads locally whenever `hf_xet` is installed;
#                           the test server only speaks plain git-LFS ("basic" transfer)
#   HF_HOME/HF_HUB_CACHE -> a temporary directory for this session (the user's cache is never touched)
#
# Fixtures: `hub_server` (the HubServer object: `.url`, `.repos`, `.requests`) and `hub_repo_id`
# (a fresh, not yet created repo id such as "tester/repo-1a2b3c4d").
# =====================================================================================================
import atexit
import os
import shutil
import sys
import tempfile
import uuid

import pytest

if "huggingface_hub" in sys.modules:
    raise RuntimeError(
        "huggingface_hub was imported before tests/conftest.py could point HF_ENDPOINT at the local "
        "test Hub, so tests would talk to the real Hub. Make sure no plugin/conftest imports it earlier."
    )

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import hub_server` from any test module
from hub_server import USERNAME, HubServer  # noqa: E402

_HF_HOME = tempfile.mkdtemp(prefix="switch_adapter_tests_hf_home_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_HUB_OFFLINE"] = "0"
os.environ.pop("TRANSFORMERS_OFFLINE", None)
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_TOKEN", "hf_test_token")
for _var in ("NO_PROXY", "no_proxy"):  # never send requests for the local server through a proxy
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "127.0.0.1", "localhost"]))

HUB_SERVER = HubServer()
os.environ["HF_ENDPOINT"] = HUB_SERVER.start()


@atexit.register
def _stop_hub_server() -> None:
    HUB_SERVER.stop()
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def hub_server() -> HubServer:
    """The session-wide local Hub server (already started; HF_ENDPOINT points at it)."""
    return HUB_SERVER


@pytest.fixture
def hub_repo_id() -> str:
    """A unique repo id that does not exist yet on the local Hub (create it or push to it)."""
    return f"{USERNAME}/repo-{uuid.uuid4().hex[:8]}"


# ===================================== end of local Hub section ======================================


@pytest.fixture()
def saved_switch(tmp_path):
    """A T-Switch adapter (density 0.2) of the tiny BERT of ``tiny_models.tiny_bert()``, saved in ``tmp_path``."""
    import copy

    from tiny_models import finetune_copy, tiny_bert

    from switch_adapter import TSwitchConfig, from_finetuned

    base = tiny_bert()
    model = from_finetuned(copy.deepcopy(base), finetune_copy(base), TSwitchConfig(density=0.2), progress=False)
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture()
def multibit_switch(saved_switch):
    """``saved_switch`` with the ``MULTIBIT_UNITS`` replaced by multi-bit units (4, 8 and 2 value bits), saved in
    ``saved_switch / "multibit"``. Returns ``(folder, {(module, param): BinarySwitch})``."""
    from peft import PeftModel
    from tiny_models import multibit_switches, tiny_bert

    model = PeftModel.from_pretrained(tiny_bert(), saved_switch)
    switches = multibit_switches(model)
    folder = saved_switch / "multibit"
    model.save_pretrained(folder)
    return folder, switches
