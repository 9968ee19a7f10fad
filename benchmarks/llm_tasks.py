"""The generative suite's tasks: labelled text tasks asked as chat prompts whose answer is one word.

Every task has two prompt styles: ``instruction`` (the task's question and its answer words, then the input) and
``raw`` (the input alone, as real traffic often comes: the model, or the router, has to tell the task from the
content). Answers are scored by exact match after :func:`normalise`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .tasks import load_task

STYLES = ("instruction", "raw")


@dataclass(frozen=True)
class GenerativeTask:
    """One generative task: a labelled dataset of :mod:`benchmarks.tasks` and the word that answers each label."""

    name: str
    question: str
    answers: tuple[str, ...]

    def instruction(self) -> str:
        """The task's question with its answer words, e.g. ``"... Answer with one word: spam or ham."``."""
        words = ", ".join(self.answers[:-1]) + f" or {self.answers[-1]}"
        return f"{self.question} Answer with one word: {words}."

    def user_message(self, text: str, style: str) -> str:
        if style == "instruction":
            return f"{self.instruction()}\n\n{text}"
        if style == "raw":
            return text
        raise ValueError(f"Unknown prompt style {style!r}; expected one of {STYLES}.")


GENERATIVE_TASKS: dict[str, GenerativeTask] = {
    task.name: task
    for task in (
        GenerativeTask("sms_spam", "Is this SMS message spam?", ("ham", "spam")),
        GenerativeTask(
            "trec",
            "What kind of answer does this question ask for?",
            ("abbreviation", "description", "entity", "human", "location", "number"),
        ),
        GenerativeTask(
            "language_id",
            "Which language is this text written in?",
            ("english", "german", "spanish", "italian", "polish", "czech", "russian"),
        ),
        GenerativeTask(
            "wordnet_supersense",
            "What kind of thing does this dictionary definition describe?",
            ("animal", "plant", "food", "artifact", "person", "location", "body", "substance"),
        ),
        GenerativeTask("movie_sentiment", "Is this movie review positive or negative?", ("negative", "positive")),
    )
}
DEFAULT_LLM_TASKS = ("sms_spam", "trec", "language_id", "wordnet_supersense")


@dataclass(frozen=True)
class Example:
    """One prompt of a task: the input text (already cut to length), its label and the answer word."""

    task: int
    text: str
    label: int
    answer: str


def normalise(answer: str) -> str:
    """The first word of a generated answer, lower case, letters only (``" Spam."`` -> ``"spam"``)."""
    words = re.sub(r"[^a-z]+", " ", answer.lower()).split()
    return words[0] if words else ""


def messages(
    task: GenerativeTask,
    text: str,
    style: str,
    answer: str | None = None,
    shots: Sequence[tuple[str, str]] = (),
) -> list[dict[str, str]]:
    """The chat of one prompt (``shots``: earlier ``(text, answer)`` turns), with the answer when given."""
    chat: list[dict[str, str]] = []
    for shot_text, shot_answer in shots:
        chat += [
            {"role": "user", "content": task.user_message(shot_text, style)},
            {"role": "assistant", "content": shot_answer},
        ]
    chat.append({"role": "user", "content": task.user_message(text, style)})
    if answer is not None:
        chat.append({"role": "assistant", "content": answer})
    return chat


def cut(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` on one line, cut to its first ``max_tokens`` tokens."""
    text = " ".join(text.split())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).strip()


def balanced_examples(
    task_index: int, task: GenerativeTask, split: Any, count: int, tokenizer: Any, max_tokens: int, seed: int
) -> list[Example]:
    """``count`` examples of a split, labels taken in turn (as balanced as the split allows), order shuffled."""
    rng = random.Random(f"{task.name}-{seed}-{count}")
    by_label: dict[int, list[str]] = {}
    for text, label in zip(split["text"], split["label"]):
        by_label.setdefault(int(label), []).append(text)
    for texts in by_label.values():
        rng.shuffle(texts)
    chosen: list[tuple[str, int]] = []
    position = 0
    while len(chosen) < count and any(position < len(texts) for texts in by_label.values()):
        for label in sorted(by_label):
            if position < len(by_label[label]) and len(chosen) < count:
                chosen.append((by_label[label][position], label))
        position += 1
    rng.shuffle(chosen)
    return [Example(task_index, cut(tokenizer, text, max_tokens), label, task.answers[label]) for text, label in chosen]


@dataclass
class TaskData:
    """The examples of one task: ``train`` (fine-tuning), ``query`` (routing and FlexSwitch), ``test``, ``shots``."""

    task: GenerativeTask
    train: list[Example]
    query: list[Example]
    test: list[Example]
    shots: list[Example]


def load_generative_task(
    name: str, index: int, tokenizer: Any, *, train: int, query: int, test: int, max_tokens: int, seed: int
) -> TaskData:
    """A task's examples from its dataset's splits: train and few-shot examples from ``train``, query examples from
    ``validation``, test examples from ``test`` (disjoint)."""
    if name not in GENERATIVE_TASKS:
        raise ValueError(f"Unknown generative task {name!r}; known: {', '.join(GENERATIVE_TASKS)}.")
    task = GENERATIVE_TASKS[name]
    splits = load_task(name, seed=seed)
    labels = splits["train"].features["label"].names
    if len(labels) != len(task.answers):
        raise ValueError(f"{name}: the dataset has {len(labels)} labels, the task {len(task.answers)} answers.")
    pool = balanced_examples(index, task, splits["train"], train + len(labels), tokenizer, max_tokens, seed)
    shots_by_label: dict[int, Example] = {}
    rest = []
    for example in pool:
        if example.label not in shots_by_label:
            shots_by_label[example.label] = example
        else:
            rest.append(example)
    return TaskData(
        task=task,
        train=rest[:train],
        query=balanced_examples(index, task, splits["validation"], query, tokenizer, max_tokens, seed),
        test=balanced_examples(index, task, splits["test"], test, tokenizer, max_tokens, seed),
        shots=[shots_by_label[label] for label in sorted(shots_by_label)],
    )
