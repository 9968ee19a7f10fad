"""``router.pipeline(...)``: transformers pipelines (text-classification, text-generation, image-classification)
running through an Auto-Switch router; each answer equals what the router itself computes for that input."""

from __future__ import annotations

import pytest
import torch
from tiny_models import finetune_copy, tiny_bert_classifier, tiny_llama
from transformers import ViTImageProcessor

from switch_adapter import AutoSwitchConfig, AutoSwitchModel, TSwitchConfig, from_finetuned

TASKS = ("alpha", "beta", "gamma")


def tokenizer():
    """A word-level tokenizer: word ``w<i>`` is token id ``i``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def texts(task: int, count: int, seed: int = 0) -> list[str]:
    """Texts of task ``task``: words from its own id range ``[10 + 10 t, 15 + 10 t)``."""
    generator = torch.Generator().manual_seed(1000 * task + seed)
    ids = torch.randint(10 + 10 * task, 15 + 10 * task, (count, 6), generator=generator)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def _switches(make_base, folder, config=None, make_tuned=None) -> dict[str, str]:
    paths = {}
    for t, name in enumerate(TASKS):
        base = make_base()
        tuned = make_tuned(t) if make_tuned else finetune_copy(base, seed=t + 1, noise=0.05)
        from_finetuned(base, tuned, config or TSwitchConfig(density=0.3), progress=False).save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def _text_router(make_base, paths) -> AutoSwitchModel:
    return AutoSwitchModel.from_pretrained(
        make_base(), adapters=paths, query_sets={name: texts(t, 12) for t, name in enumerate(TASKS)},
        config=AutoSwitchConfig(metric="euclidean"), tokenizer=tokenizer(), progress=False,
    )  # fmt: skip


def mixed_texts() -> list[str]:
    return [text for t in range(len(TASKS)) for text in texts(t, 1, seed=9)]


def test_text_classification_pipeline_answers_as_the_router(tmp_path):
    def classifier():
        return tiny_bert_classifier(num_labels=3)

    config = TSwitchConfig(density=0.3, task_type="SEQ_CLS", modules_to_save=["classifier"])
    router = _text_router(classifier, _switches(classifier, tmp_path, config))
    pipe = router.pipeline("text-classification", top_k=None)
    prompts = mixed_texts()
    answers = pipe(prompts)
    outputs, routing = router(prompts, return_routing=True)
    assert routing.top_task == list(TASKS)  # each prompt ran with its own task's switch and head
    probabilities = outputs.logits.softmax(-1)
    labels = router.inner.config.id2label
    for answer, row in zip(answers, probabilities):
        got = {entry["label"]: entry["score"] for entry in answer}
        assert got == pytest.approx({labels[i]: float(p) for i, p in enumerate(row)}, abs=1e-5)


def test_text_generation_pipeline_generates_as_the_router(tmp_path):
    router = _text_router(tiny_llama, _switches(tiny_llama, tmp_path))
    assert router.can_generate() and router.generation_config is not None
    pipe = router.pipeline("text-generation")
    tok = router.tokenizer
    for prompt in mixed_texts():
        answer = pipe(prompt, max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
        ids = router.generate([prompt], max_new_tokens=4, do_sample=False)
        prompt_length = len(tok(prompt)["input_ids"])
        assert answer == tok.decode(ids[0, prompt_length:], skip_special_tokens=True)


def test_tokenize_gives_the_batch_generate_runs(tmp_path):
    tok = tokenizer()
    tok.chat_template = (
        "{% for m in messages %}w4 {{ m['content'] }} w5 {% endfor %}{% if add_generation_prompt %}w6 {% endif %}"
    )
    router = AutoSwitchModel.from_pretrained(
        tiny_llama(), adapters=_switches(tiny_llama, tmp_path), tokenizer=tok, progress=False,
        query_sets={name: texts(t, 12) for t, name in enumerate(TASKS)},
        config=AutoSwitchConfig(metric="euclidean", chat_template=True),
    )  # fmt: skip
    prompts = [texts(0, 1, seed=9)[0], " ".join(texts(2, 1, seed=9)[0].split()[:3])]  # 6 and 3 words
    batch = router.tokenize(prompts, padding_side="left")
    assert set(batch) == {"input_ids", "attention_mask"}
    templated = [f"w4 {prompt} w5 w6 " for prompt in prompts]
    expected = tok(templated, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"]) and batch["attention_mask"][1, 0] == 0
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])

    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    from_strings, routing = router.generate(prompts, return_routing=True, **settings)
    from_batch, again = router.generate(batch, return_routing=True, **settings)
    assert torch.equal(from_strings, from_batch) and again.top_task == routing.top_task
    assert torch.equal(from_batch[:, : batch["input_ids"].shape[1]], batch["input_ids"])  # new tokens follow
    with pytest.raises(TypeError, match="tokenize takes text"):
        router.tokenize(batch["input_ids"])


def test_image_classification_pipeline_answers_as_the_router(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    from test_autoswitch_vision import SIZE, images, tiny_vit

    processor = ViTImageProcessor(size={"height": SIZE, "width": SIZE}, do_normalize=False)
    router = AutoSwitchModel.from_pretrained(
        tiny_vit(), adapters=_switches(tiny_vit, tmp_path), query_sets={n: images(t, 12) for t, n in enumerate(TASKS)},
        config=AutoSwitchConfig(metric="euclidean"), image_processor=processor, progress=False,
    )  # fmt: skip
    assert router.device == torch.device("cpu") and router.dtype == torch.float32 and not router.can_generate()
    pictures = [
        pil.fromarray(((images(t, 1, seed=5)[0].permute(1, 2, 0) + 3) * 40).clamp(0, 255).byte().numpy())
        for t in range(len(TASKS))
    ]
    answers = router.pipeline("image-classification", top_k=3)(pictures)
    pixels = processor(pictures, return_tensors="pt")["pixel_values"]
    outputs, routing = router(pixels, return_routing=True)
    assert len(set(routing.top_task)) > 1
    probabilities = outputs.logits.softmax(-1)
    labels = router.inner.config.id2label
    for answer, row in zip(answers, probabilities):
        got = {entry["label"]: entry["score"] for entry in answer}
        assert got == pytest.approx({labels[i]: float(p) for i, p in enumerate(row)}, abs=1e-5)

    router.save_pretrained(tmp_path / "bundle")  # the image processor travels with the bundle
    loaded = AutoSwitchModel.from_pretrained(tmp_path / "bundle", base_model=tiny_vit())
    assert loaded.image_processor is not None
    assert loaded.pipeline("image-classification", top_k=3)(pictures) == answers


def test_a_plain_module_router_has_no_pipeline(tmp_path):
    from test_autoswitch_vision import conv_net, images, save_switches

    queries = {n: images(t, 4) for t, n in enumerate(TASKS)}
    router = AutoSwitchModel.from_pretrained(
        conv_net(), adapters=save_switches(conv_net, tmp_path), query_sets=queries, progress=False
    )
    with pytest.raises(TypeError, match="Call the router directly"):
        router.pipeline("image-classification")
