"""Push T-Switch adapters to the Hub with their model card."""

from __future__ import annotations

import os
import tempfile

from huggingface_hub import HfApi
from peft import PeftModel

from .tswitch.config import TSwitchConfig
from .tswitch.model_card import write_model_card


def push_to_hub(
    adapter: PeftModel | str | os.PathLike,
    repo_id: str,
    *,
    adapter_name: str = "default",
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a T-Switch adapter (a ``PeftModel`` or a saved folder) to ``repo_id`` with its model card.

    ``PeftModel.push_to_hub`` uploads the same files, but transformers replaces the model card with a generic one;
    this function keeps the card's T-Switch section (density, bits per parameter, size vs fp32, a loading snippet
    naming ``repo_id``). Returns the URL of the commit.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as work_dir:
        if isinstance(adapter, PeftModel):
            adapter.save_pretrained(work_dir, selected_adapters=[adapter_name])
            folder = work_dir
        else:
            folder = os.fspath(adapter)
            if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
                raise FileNotFoundError(f"{folder} holds no adapter_config.json: save the adapter there first.")
        config = TSwitchConfig.from_pretrained(folder)
        card_folder = os.path.join(work_dir, "_card")
        os.makedirs(card_folder, exist_ok=True)
        existing = os.path.join(folder, "README.md")
        if os.path.exists(existing):
            with (
                open(existing, encoding="utf-8") as src,
                open(os.path.join(card_folder, "README.md"), "w") as dst,
            ):
                dst.write(src.read())
        write_model_card(card_folder, config, repo_id=repo_id)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or "Upload T-Switch adapter",
            create_pr=create_pr,
            ignore_patterns=["README.md", "_card/*"],
        )
        commit = api.upload_file(
            path_or_fileobj=os.path.join(card_folder, "README.md"),
            path_in_repo="README.md",
            repo_id=repo_id,
            revision=revision,
            commit_message="Update model card",
            create_pr=create_pr,
        )
    return str(commit)
