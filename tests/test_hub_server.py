"""End-to-end checks: the real huggingface_hub / transformers / peft clients against tests/hub_server.py."""

import io
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

BIG_FILE_SIZE = 11 * 1024 * 1024  # above the 10 MB LFS threshold, with no LFS-tracked suffix


def _write(path: Path, content: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return content


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    return BertModel(config).eval()


def test_client_is_pointed_at_the_local_hub(hub_server):
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub_server.url
    assert constants.HF_HUB_DISABLE_XET and not constants.HF_HUB_OFFLINE
    assert HfApi().whoami()["name"] == "tester"


def test_upload_folder_download_roundtrip(hub_server, hub_repo_id, tmp_path):
    api = HfApi()
    repo_url = api.create_repo(hub_repo_id, exist_ok=True)
    assert repo_url.repo_id == hub_repo_id
    api.create_repo(hub_repo_id, exist_ok=True)  # second call: 409 swallowed by the client

    src = tmp_path / "src"
    contents = {
        "config.json": _write(src / "config.json", b'{"hello": "world"}\n'),
        "nested/deeper/notes.txt": _write(src / "nested" / "deeper" / "notes.txt", b"some notes\n" * 10),
        "data/big.raw": _write(src / "data" / "big.raw", os.urandom(BIG_FILE_SIZE)),
    }
    n_requests = len(hub_server.requests)
    commit = api.upload_folder(folder_path=src, repo_id=hub_repo_id, commit_message="add files")

    # The big file went through the LFS batch API + a basic PUT, and nothing asked for Xet.
    new_requests = hub_server.requests[n_requests:]
    assert f"POST /{hub_repo_id}.git/info/lfs/objects/batch" in new_requests
    assert sum(r.startswith("PUT /_lfs/") for r in new_requests) == 1
    assert not [r for r in hub_server.requests if "xet" in r.lower()]

    assert sorted(api.list_repo_files(hub_repo_id)) == sorted([".gitattributes", *contents])
    assert api.repo_info(hub_repo_id).sha == commit.oid
    assert api.file_exists(hub_repo_id, "nested/deeper/notes.txt")
    assert not api.file_exists(hub_repo_id, "nested/missing.txt")
    [big_info] = api.get_paths_info(hub_repo_id, ["data/big.raw"])
    assert big_info.lfs is not None and big_info.lfs.size == BIG_FILE_SIZE

    for revision in ("main", commit.oid):
        for name, content in contents.items():
            path = hf_hub_download(hub_repo_id, name, revision=revision)
            assert Path(path).read_bytes() == content
    assert hf_hub_download(hub_repo_id, "notes.txt", subfolder="nested/deeper") == hf_hub_download(
        hub_repo_id, "nested/deeper/notes.txt"
    )

    snapshot = Path(snapshot_download(hub_repo_id, local_dir=tmp_path / "snapshot"))
    for name, content in contents.items():
        assert (snapshot / name).read_bytes() == content

    # A second commit moves `main`; the first commit stays addressable.
    new_config = b'{"hello": "again"}\n'
    second = api.upload_file(path_or_fileobj=new_config, path_in_repo="config.json", repo_id=hub_repo_id)
    assert second.oid != commit.oid
    assert Path(hf_hub_download(hub_repo_id, "config.json")).read_bytes() == new_config
    assert (
        Path(hf_hub_download(hub_repo_id, "config.json", revision=commit.oid)).read_bytes() == contents["config.json"]
    )


def test_missing_repo_file_and_revision(hub_repo_id):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("tester/does-not-exist")

    api.create_repo(hub_repo_id)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(hub_repo_id, "missing.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(hub_repo_id, ".gitattributes", revision="no-such-branch")


def test_branches_tree_deletes_and_resumed_download(hub_repo_id):
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get

    api = HfApi()
    api.create_repo(hub_repo_id)
    api.upload_file(path_or_fileobj=b"main text", path_in_repo="a/b/file.txt", repo_id=hub_repo_id)
    api.create_branch(hub_repo_id, branch="dev")
    api.upload_file(path_or_fileobj=b"dev text", path_in_repo="a/b/file.txt", repo_id=hub_repo_id, revision="dev")
    assert {ref.name for ref in api.list_repo_refs(hub_repo_id).branches} == {"main", "dev"}
    assert Path(hf_hub_download(hub_repo_id, "a/b/file.txt", revision="dev")).read_bytes() == b"dev text"
    assert Path(hf_hub_download(hub_repo_id, "a/b/file.txt")).read_bytes() == b"main text"

    assert [entry.path for entry in api.list_repo_tree(hub_repo_id)] == ["a", ".gitattributes"]
    assert [entry.path for entry in api.list_repo_tree(hub_repo_id, "a", recursive=True)] == [
        "a/b",
        "a/b/file.txt",
    ]

    buffer = io.BytesIO()  # resuming a download sends "Range: bytes=5-"
    http_get(hf_hub_url(hub_repo_id, "a/b/file.txt"), buffer, resume_size=5)
    assert buffer.getvalue() == b"text"

    api.delete_folder("a", repo_id=hub_repo_id)
    assert api.list_repo_files(hub_repo_id) == [".gitattributes"]
    api.delete_repo(hub_repo_id)
    assert not api.repo_exists(hub_repo_id)


def test_transformers_push_to_hub_and_from_pretrained(hub_server, hub_repo_id):
    from transformers import AutoModel

    model = _tiny_bert()
    model.push_to_hub(hub_repo_id)
    assert {"config.json", "model.safetensors", "README.md"} <= set(HfApi().list_repo_files(hub_repo_id))
    assert f"POST /{hub_repo_id}.git/info/lfs/objects/batch" in hub_server.requests  # .safetensors -> LFS

    loaded = AutoModel.from_pretrained(hub_repo_id)
    assert type(loaded) is type(model)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_peft_push_to_hub_and_from_pretrained(hub_repo_id):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel

    base_repo_id, adapter_repo_id = f"{hub_repo_id}-base", f"{hub_repo_id}-lora"
    _tiny_bert().push_to_hub(base_repo_id)

    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModel.from_pretrained(base_repo_id), lora_config).eval()
    peft_model.push_to_hub(adapter_repo_id)
    adapter_files = set(HfApi().list_repo_files(adapter_repo_id))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter_files

    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(base_repo_id), adapter_repo_id).eval()
    input_ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).last_hidden_state
        actual = loaded(input_ids=input_ids).last_hidden_state
        base_output = AutoModel.from_pretrained(base_repo_id).eval()(input_ids=input_ids).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert not torch.allclose(actual, base_output)  # the adapter really is applied
