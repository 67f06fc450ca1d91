"""Test users must be disjoint from the training data: no test user id or query id among the other users, and no
test query's text among any history item a shift trains on (other users' items, other test users' items and the
user's own), nor among the other users' labelled queries. One streaming pass over user_others.json.

Each check also returns the user without what it found (`other`, `tests`), for `--allow_overlap 2`, which trains on
the rest instead of stopping."""
from __future__ import annotations

from typing import Iterable

from ..prompts import PromptBuilder
from .schema import User

SHOWN = 10


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


class OverlapCheck:
    def __init__(self, test_users: list[User], builder: PromptBuilder, others_path: str = "user_others.json",
                 test_path: str = "the test users"):
        self.builder, self.others_path, self.test_path = builder, others_path, test_path
        self.user_ids = {u.user_id for u in test_users}
        self.query_ids = {q.id: u.user_id for u in test_users for q in u.query}
        self.texts: dict[str, tuple[str, str]] = {}  # normalised prompt or item text -> (user, query id)
        for u in test_users:
            for q in u.query:
                self.texts[_norm(builder.query_prompt(q.input))] = (u.user_id, q.id)
                content = builder.query_content(q.input)
                if content and len(content.split()) >= 3:  # a few words can repeat by chance
                    self.texts[_norm(content)] = (u.user_id, q.id)
        self.problems: list[str] = []
        self.count = 0

    def _add(self, msg: str) -> None:
        self.count += 1
        if len(self.problems) < SHOWN:
            self.problems.append(msg)

    def _item_hit(self, item: dict) -> tuple[str, str] | None:
        hit = self.texts.get(_norm(self.builder.prompt(item)))
        field = self.builder.content_field
        if hit is None and field and isinstance(item.get(field), str):
            hit = self.texts.get(_norm(item[field]))
        return hit

    def _items(self, user: User, where: str) -> list[dict]:
        kept = []
        for it in user.profile:
            hit = self._item_hit(it)
            if hit:
                self._add(f"{where}: history item {it.get('id')!r} of user {user.user_id!r} has the text of query "
                          f"{hit[1]!r} of test user {hit[0]!r}")
            else:
                kept.append(it)
        return kept

    def other(self, user: User) -> User | None:
        """Checks one other user; returns it without the overlapping items and queries (None: it is a test user)."""
        dropped = user.user_id in self.user_ids
        if dropped:
            self._add(f"{self.others_path}: user {user.user_id!r} is also a test user")
        queries = []
        for q in user.query:
            bad = q.id in self.query_ids
            if bad:
                self._add(f"{self.others_path}: query id {q.id!r} of user {user.user_id!r} is also a query of test user "
                          f"{self.query_ids[q.id]!r}")
            hit = self.texts.get(_norm(self.builder.query_prompt(q.input))) if q.gold else None
            if hit:
                self._add(f"{self.others_path}: labelled query {q.id!r} of user {user.user_id!r} has the text of query "
                          f"{hit[1]!r} of test user {hit[0]!r}")
            if not (bad or hit):
                queries.append(q)
        profile = self._items(user, self.others_path)
        return None if dropped else User(user.user_id, profile, queries)

    def tests(self, test_users: Iterable[User]) -> list[User]:
        """Checks the test users' own histories; returns them without the overlapping items."""
        return [User(u.user_id, self._items(u, self.test_path), u.query) for u in test_users]

    def identity(self) -> str:
        """What the check removes depends on the test queries' texts: their hash (for reuse keys under drop)."""
        import hashlib

        return hashlib.sha256("\n".join(sorted(self.texts)).encode()).hexdigest()[:16]

    def message(self, mode: int = 0) -> list[str]:
        """The problems found, headed for `--allow_overlap` `mode` (0: an error; 1: kept; 2: dropped)."""
        if not self.count:
            return []
        more = f" (and {self.count - len(self.problems)} more)" if self.count > len(self.problems) else ""
        head = {0: "pass --allow_overlap 2 to train without the items named, or 1 to keep them:",
                1: "kept, as --allow_overlap 1 asks:",
                2: "these are left out of training (--allow_overlap 2):"}[mode]
        return [f"test data overlaps the training data{more}; {head}"] + self.problems
