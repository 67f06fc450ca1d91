"""Generate LaMP-format data with known per-user preferences.

Classification: each item's text draws keywords from 2-3 candidate labels, so it plausibly fits each of
them; every user has a hidden preference order over the 15 labels and the gold label is the user's
favourite among the item's candidates. A model that ignores the user can only guess among the candidates;
one that knows the preference order is always right.
Headlines: each user has a hidden style (opening word, question form, case, length habit, trademark
phrase) applied to a headline derived from the article's content.
"""
from __future__ import annotations

import os
import random

from ..errors import ConfigError
from ..prompts import PromptBuilder
from ..tasks import get_task
from .schema import LABEL_FILE, OTHERS_FILE, TEST_FILE, write_json_atomic

MANIFEST_FILE = "manifest.json"

MOVIE_VOCAB = {
    "sci-fi": ["starship", "alien signal", "time machine", "android", "distant galaxy", "warp drive", "cyborg"],
    "based on a book": ["bestselling novel", "literary adaptation", "the author's trilogy", "a classic novel", "the memoir it adapts"],
    "comedy": ["hilarious mishaps", "slapstick", "witty banter", "goofy roommates", "laugh-out-loud gags"],
    "action": ["car chases", "explosive shootouts", "a daring heist", "hand-to-hand combat", "a rooftop escape"],
    "twist ending": ["a shocking final reveal", "nothing is what it seems", "an unexpected last scene", "a hidden identity"],
    "dystopia": ["a totalitarian regime", "a ruined future city", "surveillance state", "rationed water", "rebels underground"],
    "dark comedy": ["morbid humor", "a botched funeral", "deadpan murder plot", "gallows jokes", "absurd misfortune"],
    "classic": ["black-and-white", "golden-age Hollywood", "timeless masterpiece", "a 1950s studio picture", "legendary stars"],
    "psychology": ["a troubled mind", "therapy sessions", "split personality", "obsessive thoughts", "memory loss"],
    "fantasy": ["dragons", "an enchanted forest", "a wizard's quest", "elven kingdoms", "a magic sword"],
    "romance": ["star-crossed lovers", "a summer love affair", "a wedding", "falling in love", "a first kiss"],
    "thought-provoking": ["moral dilemmas", "questions about free will", "the meaning of life", "philosophical debate"],
    "social commentary": ["class inequality", "racial injustice", "corporate greed", "a divided town", "political satire"],
    "violence": ["brutal fights", "gang warfare", "bloody revenge", "a massacre", "graphic killings"],
    "true story": ["real events", "a historical figure", "a true crime case", "based on actual people", "a real-life rescue"],
}
NEWS_VOCAB = {
    "travel": ["beach resorts", "cheap flights", "a road trip", "passport rules", "hidden islands"],
    "education": ["public schools", "student loans", "teachers' pay", "college admissions", "classroom testing"],
    "parents": ["toddlers", "bedtime routines", "raising teenagers", "new moms", "screen time for kids"],
    "style & beauty": ["red carpet gowns", "skincare routines", "fashion week", "hairstyles", "makeup trends"],
    "entertainment": ["a hit TV series", "box office records", "celebrity couple", "the Oscars", "a pop star's tour"],
    "food & drink": ["easy recipes", "craft beer", "a new restaurant", "holiday baking", "coffee shops"],
    "science & technology": ["artificial intelligence", "a NASA mission", "smartphones", "climate research", "a new vaccine study"],
    "business": ["stock markets", "a corporate merger", "small businesses", "inflation", "quarterly earnings"],
    "sports": ["the NBA finals", "a quarterback", "the World Cup", "Olympic athletes", "a record-breaking season"],
    "healthy living": ["daily exercise", "better sleep", "mental health", "a balanced diet", "stress relief"],
    "women": ["gender equality", "women in leadership", "reproductive rights", "female founders", "the pay gap"],
    "politics": ["the Senate vote", "the White House", "campaign trail", "Congress", "the governor's race"],
    "crime": ["a police investigation", "an armed robbery", "the murder trial", "a fraud scheme", "arrests downtown"],
    "culture & arts": ["a museum exhibit", "Broadway", "a poetry festival", "street art", "an orchestra"],
    "religion": ["the Pope", "church leaders", "a holy pilgrimage", "interfaith prayer", "Ramadan"],
}
MOVIE_FRAMES = ["A film about {a} and {b}, with {c} and {d}.", "{A} collides with {b} in a story of {c}, {d}.",
                "Expect {a}, {b} and {c}; critics mention {d}.", "The plot mixes {a} with {c}, then {b} and {d}."]
NEWS_FRAMES = ["A report on {a} and {b}, and what {c} means for {d}.", "{A} meets {b}: experts weigh {c} and {d}.",
               "New details on {a}, {b}, {c} and {d} emerged this week.", "Readers ask about {a} and {c} amid {b} and {d}."]

SUBJECTS = ["The mayor", "A local teacher", "Scientists", "The senator", "A startup", "Fans", "The city council",
            "Researchers", "A young chef", "The coach", "Voters", "An astronaut", "The museum", "Doctors", "A family"]
VERBS = ["unveils", "rejects", "celebrates", "questions", "rebuilds", "discovers", "defends", "launches", "warns about",
         "remembers", "transforms", "fights"]
OBJECTS = ["a bold climate plan", "the new stadium", "a forgotten recipe", "the school budget", "a rare comet",
           "the housing crisis", "an old friendship", "the river cleanup", "a secret archive", "the night market",
           "a winning strategy", "the hospital merger", "a viral dance", "the lost painting", "a cheaper vaccine"]
PLACES = ["in Ohio", "across the country", "after a long wait", "on Monday", "in a packed hall", "downtown",
          "before the holidays", "at the harbor"]
DETAILS = ["Critics were divided.", "Officials promised more updates soon.", "Many residents cheered the news.",
           "The decision surprised observers.", "Supporters called it overdue.", "It could change everything."]
OPENERS = ["", "", "Breaking:", "Watch:", "Exclusive:", "Opinion:"]
SUFFIXES = ["", "", "and Why It Matters", "for Good", "| The Brief", "Again"]


def _label_prefs(rng: random.Random, labels: tuple[str, ...]) -> list[str]:
    order = list(labels)
    rng.shuffle(order)
    return order


def _classification_item(rng: random.Random, task_name: str, prefs: list[str], vocab: dict, frames: list[str]):
    labels = list(vocab)
    # the first candidate follows the user's taste (so histories are informative, as with real authors)
    weights = [1.0 / (r + 1) ** 1.3 for r in range(len(prefs))]
    first = rng.choices(prefs, weights)[0]
    others = rng.sample([l for l in labels if l != first], rng.choice([1, 2]))
    cands = [first] + others
    gold = min(cands, key=prefs.index)
    kws = [w for c in cands for w in rng.sample(vocab[c], 2)]
    rng.shuffle(kws)
    a, b, c, d = kws[:4]
    text = rng.choice(frames).format(a=a, b=b, c=c, d=d, A=a[0].upper() + a[1:])
    if len(kws) > 4:
        text += " Also: " + ", ".join(kws[4:]) + "."
    rng.shuffle(cands)
    return text, gold, cands


def _headline_style(rng: random.Random) -> dict:
    return {"opener": rng.choice(OPENERS), "suffix": rng.choice(SUFFIXES), "question": rng.random() < 0.3,
            "case": rng.choice(["title", "lower", "sentence"]), "length": rng.choice(["short", "full"])}


def apply_style(style: dict, subject: str, verb: str, obj: str) -> str:
    words = [subject, verb] + ([obj] if style["length"] == "full" else [obj.split()[-1]])
    h = " ".join(words)
    if style["case"] == "title":
        h = " ".join(w[:1].upper() + w[1:] for w in h.split())
    elif style["case"] == "lower":
        h = h.lower()
    if style["opener"]:
        h = f"{style['opener']} {h}"
    if style["suffix"]:
        h = f"{h} {style['suffix']}"
    return h + ("?" if style["question"] else "")


def _headline_item(rng: random.Random, style: dict):
    s, v, o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
    text = f"{s} {v} {o} {rng.choice(PLACES)}. {rng.choice(DETAILS)}"
    return text, apply_style(style, s, v, o)


def generate(task_name: str, output_dir: str, num_users: int = 20, history_per_user: int = 20,
             queries_per_user: int = 5, num_other_users: int = 12, seed: int = 0) -> dict:
    """Write <output_dir>/<task_name>/ (the three files + manifest.json). Deterministic for a seed."""
    task = get_task(task_name)
    for name, v in (("num_users", num_users), ("history_per_user", history_per_user), ("queries_per_user", queries_per_user)):
        if v < 1:
            raise ConfigError(f"--{name} must be >= 1, got {v}")
    if num_other_users < 0:
        raise ConfigError(f"--num_other_users must be >= 0, got {num_other_users}")
    rng = random.Random(f"{task_name}:{seed}")
    pb = PromptBuilder(task)
    vocab, frames = (MOVIE_VOCAB, MOVIE_FRAMES) if task_name == "movie_tagging" else (NEWS_VOCAB, NEWS_FRAMES)
    manifest: dict = {"task": task_name, "seed": seed, "users": {}, "queries": {}}
    used: set[str] = set()

    def make_user(uid: str, test: bool) -> dict:
        if task.is_classification:
            prefs = _label_prefs(rng, task.labels)
            manifest["users"][uid] = {"preference": prefs, "test": test}
        else:
            style = _headline_style(rng)
            manifest["users"][uid] = {"style": style, "test": test}
        items = []
        for k in range(history_per_user + queries_per_user):
            iid = f"{uid}-{k}"
            for _ in range(1000):  # every item text is new: a query's text never reappears as someone's history
                if task.is_classification:
                    text, gold, cands = _classification_item(rng, task_name, prefs, vocab, frames)
                else:
                    (text, title), cands = _headline_item(rng, style), None
                if text not in used:
                    break
            used.add(text)
            if task_name == "movie_tagging":
                items.append(({"id": iid, "description": text, "tag": gold}, cands))
            elif task_name == "news_categorize":
                title = text.split(",")[0].split(":")[0][:60]
                items.append(({"id": iid, "text": text, "title": title, "category": gold}, cands))
            else:
                items.append(({"id": iid, "text": text, "title": title}, None))
        profile = [dict(it, date=f"2020-01-{1 + k % 28:02d}") for k, (it, _) in enumerate(items[:history_per_user])]
        queries = []
        for it, cands in items[history_per_user:]:
            gold = it[task.target_field]
            queries.append({"id": it["id"], "input": pb.prompt(it), "gold": gold})
            manifest["queries"][it["id"]] = {"user_id": uid, "gold": gold, "candidates": cands}
        return {"user_id": uid, "profile": profile, "query": queries}

    test = [make_user(f"u{i:04d}", True) for i in range(num_users)]
    others = [make_user(f"o{i:04d}", False) for i in range(num_other_users)]
    labels = {"task": task.lamp_id, "golds": [{"id": q["id"], "output": q["gold"]} for u in test for q in u["query"]]}
    root = os.path.join(output_dir, task_name)
    write_json_atomic(os.path.join(root, OTHERS_FILE), others)
    write_json_atomic(os.path.join(root, TEST_FILE), test)
    write_json_atomic(os.path.join(root, LABEL_FILE), labels)
    write_json_atomic(os.path.join(root, MANIFEST_FILE), manifest)
    return {"task": task_name, "output": root, "test_users": num_users, "other_users": num_other_users,
            "queries": num_users * queries_per_user}
