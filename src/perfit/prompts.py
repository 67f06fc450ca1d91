"""History item / query -> (prompt, target). The only place prompt templates are filled."""
from __future__ import annotations

import string
from dataclasses import dataclass

from .errors import ConfigError
from .tasks import Task, templates


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str  # what the model learns to emit after the prompt (EOS is added at tokenization)
    user_id: str = ""
    item_id: str = ""


def truncate_words(text: str, max_words: int) -> str:
    if max_words <= 0:
        return text
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


class PromptBuilder:
    """A task's templates (configs/prompts.json or --prompts_file): `prompt` and `target` turn a history item into a
    training example; `cue` (default: the literal `prompt` ends with, such as " category:") ends a query whose input
    lacks it; `query` (optional) is the task's LaMP question, whose fields generated queries fill; `rag_item` and
    `rag_format` phrase retrieved items the way LaMP's retrieval baseline does."""

    def __init__(self, task: Task, prompts_file: str | None = None, max_field_words: int = 768, query_cue: bool = True):
        self.task = task
        self.tpl = templates(task.name, prompts_file or None)
        self.max_field_words = max_field_words
        parts = list(string.Formatter().parse(self.tpl["prompt"]))
        self.prompt_fields = [f for _, f, _, _ in parts if f]  # what of an item its history prompt reads
        # the answer cue history prompts end with (" category:"); LaMP's own query inputs stop before it
        derived = parts[-1][0] if parts and parts[-1][1] is None and len(parts) > 1 else ""
        self.cue = self.tpl.get("cue", derived) if query_cue else ""
        # where a query's own text sits in its input, to find it among history items: between the literal head and
        # the cue of a one-field template ("... description: {description} tag:"), or the task's query field in its
        # `query` template (a LaMP question)
        qparts = list(string.Formatter().parse(self.tpl.get("query") or self.tpl["prompt"]))
        fields = [(lit, f) for lit, f, _, _ in qparts if f is not None]
        pick = [x for x in fields if x[1] == task.query_field] or (fields if len(fields) == 1 else [])
        self.content_field = pick[0][1] if pick else ""
        self.head = fields[0][0] if len(fields) == 1 else ""
        self._query_re = self._pattern(qparts) if "query" in self.tpl else None
        names = {f for k in ("prompt", "target", "rag_item") for _, f, _, _ in string.Formatter().parse(self.tpl.get(k, "")) if f}
        unknown = names - set(task.item_fields) - {"id", "date"}
        if unknown:
            raise ConfigError(f"prompt template of {task.name} uses unknown fields {sorted(unknown)}; "
                             f"history items have {list(task.item_fields)}")

    @staticmethod
    def _pattern(parts):
        """A regex matching a (whitespace-normalised) input of a `query` template, one named group per field."""
        import re

        rx = "".join(r"\s*".join(re.escape(w) for w in lit.split()) + (rf"\s*(?P<{f}>.*?)\s*" if f else "")
                     for lit, f, _, _ in parts)
        return re.compile("^" + rx + r"$", re.S)

    def _fields(self, item: dict) -> dict:
        return {k: truncate_words(str(v), self.max_field_words) if isinstance(v, str) else v for k, v in item.items()}

    def prompt(self, item: dict) -> str:
        return self.tpl["prompt"].format_map(self._fields(item))

    def history_example(self, item: dict, user_id: str = "") -> Example:
        f = self._fields(item)
        return Example(self.tpl["prompt"].format_map(f), self.tpl["target"].format_map(f), user_id, str(item.get("id", "")))

    def query_prompt(self, text: str) -> str:
        """A query's `input`, ended with the template's answer cue when it lacks it (so queries end as the history
        prompts a model was trained on end)."""
        cue = self.cue.strip()
        return text if not cue or text.rstrip().endswith(cue) else text.rstrip() + " " + cue

    def query_example(self, query, user_id: str = "") -> Example:
        """A query's prompt is its `input` (see `query_prompt`); its target the gold answer (possibly empty)."""
        gold = getattr(query, "gold", "") or ""
        return Example(self.query_prompt(query.input), (" " + gold) if gold else "", user_id, query.id)

    def query(self, fields: dict) -> str:
        """A query's input in the task's LaMP phrasing (`query` template; without one, the history prompt)."""
        return self.tpl.get("query", self.tpl["prompt"]).format_map(self._fields(fields))

    def query_fields(self, text: str) -> dict[str, str]:
        """The fields of a query input written in the task's `query` template ({} when it is not)."""
        m = self._query_re.match(" ".join(text.split())) if self._query_re is not None else None
        return {k: v.strip() for k, v in m.groupdict().items()} if m else {}

    def options(self, text: str) -> dict[str, str]:
        """{label: option text} of a query that lists its options (citation's [1] and [2])."""
        f = self.query_fields(text)
        return {lab: f[k] for lab, k in zip(self.task.labels, self.task.option_fields) if k in f}

    def query_content(self, text: str) -> str | None:
        """The item text a query was made from, when its input follows the template (head, text, cue); else None."""
        if not self.content_field:
            return None
        if self._query_re is not None:
            return self.query_fields(text).get(self.content_field)
        t, cue = " ".join(text.split()), " ".join(self.tpl["prompt"].rsplit("}", 1)[-1].split())
        head = " ".join(self.head.split())
        if not t.startswith(head):
            return None
        body = t[len(head):].strip()
        return body[: -len(cue)].strip() if cue and body.endswith(cue) else body

    def user_examples(self, user, include_gold_queries: bool) -> list[Example]:
        ex = [self.history_example(it, user.user_id) for it in user.profile]
        if include_gold_queries:
            ex += [self.query_example(q, user.user_id) for q in user.query if q.gold]
        return ex


def clean_prediction(text: str) -> str:
    """Cut a generation at its first newline after any leading blank lines (EOS is cut by the decoder), then strip."""
    return text.strip().split("\n", 1)[0].strip()
