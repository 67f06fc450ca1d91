"""BM25 over a user's own history (rank-bm25, as LaMP's retrieval baseline): the user-majority baseline and
retrieval-augmented prompts. Each user's index holds that user's items only."""
from __future__ import annotations

import re
from collections import Counter

from rank_bm25 import BM25Okapi

from ..prompts import truncate_words
from ..tasks import Task

_WORD = re.compile(r"\w+")

# LaMP's per-item profile phrases (LaMP prompts.py); items are joined with ", and " before the query input
RAG_ITEM = {
    "movie_tagging": 'the tag for the movie: "{description}" is "{tag}"',
    "news_categorize": 'the category for the article: "{text}" is "{category}"',
    "news_headline": '"{title}" is the title for "{text}"',
}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _doc(task: Task, item: dict) -> str:
    """The text BM25 matches a query against: every field of the item but the answer."""
    return " ".join(str(item.get(f, "")) for f in task.item_fields if f != task.target_field)


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


def majority_answer(task: Task, items: list[dict], query: str, index: UserIndex | None = None) -> str:
    """Classification: the user's most frequent label (ties: the label seen most recently). Headlines: the title
    of the user's history article closest to the query by BM25."""
    if not items:
        return ""
    if task.is_classification:
        counts = Counter(str(it[task.target_field]) for it in items)
        best = max(counts.values())
        return next(str(it[task.target_field]) for it in reversed(items) if counts[str(it[task.target_field])] == best)
    index = index or UserIndex(task, items)
    return str(index.top(query, 1)[0][task.target_field])


def rag_prompt(task: Task, query_input: str, retrieved: list[dict], item_words: int) -> str:
    """LaMP's retrieval-augmented prompt: the retrieved items as phrases, then the query's own prompt."""
    if not retrieved:
        return query_input
    phrases = [RAG_ITEM[task.name].format_map({k: truncate_words(str(v), item_words) for k, v in it.items()}) for it in retrieved]
    return f"{', and '.join(phrases)}. {query_input}"
