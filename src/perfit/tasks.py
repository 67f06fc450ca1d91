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


@dataclass(frozen=True)
class Task:
    name: str
    lamp_id: str  # the `task` field of LaMP label files
    metric_kind: str  # "classification" | "generation"
    item_fields: tuple[str, ...]  # required fields of a history item besides `id`
    target_field: str  # the history field the model learns to produce
    labels: tuple[str, ...] = ()  # closed label set (classification only)
    max_new_tokens: int = 16

    @property
    def is_classification(self) -> bool:
        return self.metric_kind == "classification"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("movie_tagging", "LaMP_2M", "classification", ("description", "tag"), "tag", MOVIE_TAGS, 8),
        Task("news_categorize", "LaMP_2N", "classification", ("text", "title", "category"), "category", NEWS_CATEGORIES, 8),
        Task("news_headline", "LaMP_4", "generation", ("text", "title"), "title", (), 32),
    )
}
LAMP_IDS = {t.lamp_id: t.name for t in TASKS.values()} | {"LaMP_2": "news_categorize"}  # LaMP v1 name of 2N


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task_name {name!r}; choose one of {', '.join(TASKS)}") from None


@lru_cache(maxsize=None)
def _packaged_json(name: str) -> dict:
    return json.loads(resources.files("perfit").joinpath("configs", name).read_text(encoding="utf-8"))


BUNDLED_MODEL = "smollm2-135m"


def preset(task_name: str, model_path: str = "") -> dict:
    """The seed's (the paper's) preset of a task, overlaid with the bundled model's own section (`models` in
    presets.json, chosen by `perfit tune`) when `model_path` is empty. Any other model gets the seed's presets."""
    get_task(task_name)
    data = _packaged_json("presets.json")
    out = dict(data[task_name])
    if not model_path:
        out.update(data.get("models", {}).get(BUNDLED_MODEL, {}).get(task_name, {}))
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
