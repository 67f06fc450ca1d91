"""BM25 over a user's own history (rank-bm25, as LaMP's retrieval baseline): the user-majority baseline and
retrieval-augmented prompts. Each user's index holds that user's items only."""
from __future__ import annotations

import math
import re
from collections import Counter

from rank_bm25 import BM25Okapi

from ..prompts import truncate_words
from ..tasks import Task

_WORD = re.compile(r"\w+")

def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _doc(task: Task, item: dict) -> str:
    """The text BM25 matches a query against: the task's query field, else every field of the item but the answer
    (a tweet is its own text)."""
    if task.query_field:
        return str(item.get(task.query_field, ""))
    fields = [f for f in task.item_fields if f != task.target_field] or list(task.item_fields)
    return " ".join(str(item.get(f, "")) for f in fields)


class UserIndex:
    def __init__(self, task: Task, items: list[dict]):
        self.task, self.items = task, items
        docs = [words(_doc(task, it)) for it in items]
        # BM25Okapi divides by the mean document length: an index of empty documents would fail
        self.bm25 = BM25Okapi([d or ["<empty>"] for d in docs]) if items else None

    def top(self, query: str, k: int) -> list[dict]:
        """The k most relevant items, best first (ties: the later item, i.e. the more recent, first)."""
        if self.bm25 is None or k <= 0:
            return []
        scores = self.bm25.get_scores(words(query))
        order = sorted(range(len(self.items)), key=lambda i: (-scores[i], -i))
        return [self.items[i] for i in order[:k]]


def most_frequent(task: Task, items: list[dict]) -> str:
    """The most frequent target among items (ties: the one seen most recently)."""
    counts = Counter(str(it[task.target_field]) for it in items)
    best = max(counts.values())
    return next(str(it[task.target_field]) for it in reversed(items) if counts[str(it[task.target_field])] == best)


def majority_answer(task: Task, items: list[dict], query: str, index: UserIndex | None = None,
                    options: dict[str, str] | None = None) -> str:
    """The per-user answer without a model. Labels: the user's most frequent label (ties: the latest). Ratings: the
    user's mean score, rounded (halves up). Citation (items without labels): the option (`options`: label -> text)
    whose words the user's own papers use most. Free text: the target of the user's item closest to the query by
    BM25."""
    if not items:
        return ""
    if task.metric_kind == "rating":
        mean = sum(float(it[task.target_field]) for it in items) / len(items)
        return str(min(max(int(math.floor(mean + 0.5)), int(task.labels[0])), int(task.labels[-1])))
    if task.has_labels and task.labelled_items:
        return most_frequent(task, items)
    if task.has_labels:  # the option whose words the user's own items use most (per word of the option)
        seen = Counter(w for it in items for f in task.item_fields for w in words(str(it.get(f, ""))))
        score = {lab: sum(math.log1p(seen[w]) for w in words(text)) / max(len(words(text)), 1)
                 for lab, text in (options or {}).items()}
        return max(task.labels, key=lambda lab: (score.get(lab, 0.0), -task.labels.index(lab)))
    index = index or UserIndex(task, items)
    return str(index.top(query, 1)[0][task.target_field])


def rag_prompt(tpl: dict, query_input: str, retrieved: list[dict], item_words: int) -> str:
    """LaMP's retrieval-augmented prompt: the retrieved items as the task's phrases (`rag_item`, joined with
    ", and "), then the query's own prompt, in the task's `rag_format`."""
    if not retrieved:
        return query_input
    phrases = [tpl["rag_item"].format_map({k: truncate_words(str(v), item_words) for k, v in it.items()}) for it in retrieved]
    return tpl.get("rag_format", "{items}. {input}").format(items=", and ".join(phrases), input=query_input)
