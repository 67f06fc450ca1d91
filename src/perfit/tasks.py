"""The task registry: the one place that knows what a LaMP task is.

A new task is a new `Task` entry here plus its templates in configs/prompts.json and preset in presets.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from .errors import ConfigError

MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)
NEWS_CATEGORIES = (
    "travel", "education", "parents", "style & beauty", "entertainment", "food & drink", "science & technology",
    "business", "sports", "healthy living", "women", "politics", "crime", "culture & arts", "religion",
)


CITATION_LABELS = ("[1]", "[2]")
SCORES = ("1", "2", "3", "4", "5")


@dataclass(frozen=True)
class Task:
    """What a LaMP task is. Everything the code does differently per task follows from these fields (and the task's
    templates in configs/prompts.json, its preset in presets.json, its generator in data/synthetic.py)."""
    name: str
    lamp_id: str  # the `task` field of LaMP label files
    metric_kind: str  # "classification" (accuracy, F1) | "rating" (MAE, RMSE) | "generation" (ROUGE-1, ROUGE-L)
    item_fields: tuple[str, ...]  # required fields of a history item besides `id`
    target_field: str  # the history field the model learns to produce
    labels: tuple[str, ...] = ()  # the closed answer set of queries (classification and rating)
    max_new_tokens: int = 16
    labelled_items: bool = True  # history items' target is one of `labels` (not so for citation: a paper's title)
    query_field: str = ""  # the item field a query's text is made of (BM25 matches it); empty: every non-target field
    option_fields: tuple[str, ...] = ()  # fields of the `query` template holding the text of each label's option

    @property
    def is_classification(self) -> bool:
        """Answers are exact labels (accuracy / F1)."""
        return self.metric_kind == "classification"

    @property
    def has_labels(self) -> bool:
        """Answers come from a closed set (classification and rating)."""
        return bool(self.labels)

    @property
    def lower_is_better(self) -> bool:
        return self.metric_kind == "rating"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("citation", "LaMP_1", "classification", ("title", "abstract"), "title", CITATION_LABELS, 8,
             labelled_items=False, query_field="title", option_fields=("ref1", "ref2")),
        Task("movie_tagging", "LaMP_2M", "classification", ("description", "tag"), "tag", MOVIE_TAGS, 8),
        Task("news_categorize", "LaMP_2N", "classification", ("text", "title", "category"), "category", NEWS_CATEGORIES, 8),
        Task("product_rating", "LaMP_3", "rating", ("text", "score"), "score", SCORES, 4),
        Task("news_headline", "LaMP_4", "generation", ("text", "title"), "title", (), 32),
        Task("scholarly_title", "LaMP_5", "generation", ("title", "abstract"), "title", (), 32),
        Task("tweet_paraphrase", "LaMP_7", "generation", ("text",), "text", (), 48),
    )
}
LAMP_IDS = {t.lamp_id: t.name for t in TASKS.values()} | {"LaMP_2": "news_categorize"}  # LaMP v1 name of 2N
NOT_PUBLIC = {"LaMP_6": "personalized e-mail subject generation (Avocado): the corpus is licensed, not public"}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task_name {name!r}; choose one of {', '.join(TASKS)}") from None


@lru_cache(maxsize=None)
def _packaged_json(name: str) -> dict:
    return json.loads(resources.files("perfit").joinpath("configs", name).read_text(encoding="utf-8"))


BUNDLED_MODEL = "smollm2-135m"


PRESETS = ("auto", "paper")


def preset(task_name: str, model_path: str = "", which: str = "auto") -> dict:
    """A task's preset. `paper`: the seed's (the paper's, for Llama-2-7B) as published. `auto`: the seed's overlaid
    with the bundled model's own section (`models` in presets.json, chosen by `perfit tune`) when `model_path` is
    empty, else with `any_model`, the recipe found to transfer across models (depth-relative layers; docs/tuning.md)."""
    get_task(task_name)
    if which not in PRESETS:
        raise ConfigError(f"--preset {which!r}: choose from {', '.join(PRESETS)}")
    data = _packaged_json("presets.json")
    out = dict(data[task_name])
    if which == "auto":
        section = data.get("models", {}).get(BUNDLED_MODEL, {}) if not model_path else data.get("any_model", {})
        out.update(section.get(task_name, {}))
    return out


def templates(task_name: str, path: str | None = None) -> dict:
    """Prompt templates of a task, from the packaged prompts.json or a user's own file."""
    get_task(task_name)
    if path is None:
        return dict(_packaged_json("prompts.json")[task_name])
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--prompts_file {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--prompts_file {path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if task_name not in data or not {"prompt", "target"} <= set(data[task_name]):
        raise ConfigError(f"{path}: needs an entry {task_name!r} with fields 'prompt' and 'target'")
    return dict(data[task_name])
