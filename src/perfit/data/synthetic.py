"""Generate LaMP-format data with known per-user preferences, one generator per task (GENERATORS), each saying in
manifest.json what every user prefers, so that an oracle and the per-user baselines can be computed.

- Labels (movie_tagging, news_categorize): each item's text draws keywords from 2-3 candidate labels, so it plausibly
  fits each of them; every user has a hidden preference order over the labels and the gold label is the user's
  favourite among the item's candidates. A model that ignores the user can only guess among the candidates.
- Citation: a user's papers are on the research fields it prefers; a query paper's title mixes two fields, its two
  candidate references are one on each, and the gold is the one on the field the user prefers.
- Ratings: a review's words carry its sentiment (1-5); a user is harsh, fair or generous (a bias of -2..+2) and
  scores sentiment + bias, within 1-5. Reading the review alone gets the sentiment, not the user's score.
- Headlines, scholarly titles, tweets: each user has a hidden style (openers, question form, case, length, a
  trademark phrase; a title pattern; abbreviations, hashtags, emoji) applied to the content of the item.
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


# ---------------------------------------------------------------- citation (LaMP-1)

FIELDS = {
    "computer vision": ["image segmentation", "object detection", "visual tracking", "scene understanding", "stereo depth"],
    "natural language": ["machine translation", "question answering", "text summarization", "syntactic parsing", "dialogue systems"],
    "robotics": ["robot grasping", "legged locomotion", "motion planning", "swarm control", "visual servoing"],
    "databases": ["query optimization", "transaction processing", "index structures", "data integration", "stream processing"],
    "security": ["malware detection", "intrusion detection", "side-channel attacks", "access control", "cryptographic protocols"],
    "networking": ["congestion control", "wireless routing", "network coding", "software-defined networks", "packet scheduling"],
    "theory": ["approximation algorithms", "graph coloring", "complexity lower bounds", "online algorithms", "randomized rounding"],
    "bioinformatics": ["protein folding", "gene expression", "sequence alignment", "phylogenetic trees", "single-cell analysis"],
    "hci": ["user studies", "gesture interfaces", "accessibility tools", "visual analytics", "crowdsourcing interfaces"],
    "systems": ["distributed consensus", "file systems", "virtual machines", "energy-aware scheduling", "cache coherence"],
}
METHODS_ = ["A Scalable Approach to", "Revisiting", "Efficient", "Robust", "Learning-Based", "A Probabilistic Model of",
            "Fast", "Adaptive", "A Unified Framework for", "Towards Practical"]


def _paper(rng: random.Random, field: str) -> tuple[str, str]:
    topic, other = rng.sample(FIELDS[field], 2)
    title = f"{rng.choice(METHODS_)} {topic[0].upper() + topic[1:]}"
    abstract = (f"We study {topic} in {field}. Our method improves {other} and {topic} on standard benchmarks, "
                f"and we discuss what it means for {rng.choice(FIELDS[field])}.")
    return title, abstract


def _citation_user(rng: random.Random) -> dict:
    return {"preference": _label_prefs(rng, tuple(FIELDS))}


def _citation_item(rng: random.Random, pref: dict):
    prefs = pref["preference"]
    weights = [1.0 / (r + 1) ** 1.3 for r in range(len(prefs))]
    own = rng.choices(prefs, weights)[0]
    title, abstract = _paper(rng, own)
    a, b = own, rng.choice([f for f in prefs if f != own])  # the query paper mixes its field with another
    qtitle = f"{rng.choice(METHODS_)} {rng.choice(FIELDS[a])} and {rng.choice(FIELDS[b])}"
    refs = {f: _paper(rng, f)[0] for f in (a, b)}
    gold_field = min((a, b), key=prefs.index)
    order = [a, b] if rng.random() < 0.5 else [b, a]
    gold = "[1]" if order[0] == gold_field else "[2]"
    query = {"title": qtitle, "ref1": refs[order[0]], "ref2": refs[order[1]]}
    return {"title": title, "abstract": abstract}, query, gold, order


# ---------------------------------------------------------------- product rating (LaMP-3)

SENTIMENT = {
    1: ["broke after a day", "a complete waste of money", "terrible sound", "I returned it at once"],
    2: ["disappointing", "not worth the price", "the quality is poor", "it barely works"],
    3: ["it is okay", "average at best", "does the job, nothing more", "mixed feelings"],
    4: ["works well", "good value", "I like it a lot", "solid and reliable"],
    5: ["absolutely love it", "the best I have owned", "flawless", "exceeded every expectation"],
}
PRODUCTS = ["this album", "these headphones", "the remastered edition", "this vinyl record", "the box set",
            "this live recording", "the deluxe CD", "this soundtrack", "the debut single", "this compilation"]
BIASES = [-2, -1, -1, 0, 0, 1, 1, 2]
REVIEW_FILLER = ["Shipping was quick.", "I listen to it every week.", "Got it as a gift.", "The packaging was fine.",
                 "It is my second copy.", "My kids play it too.", "Heard it on the radio first."]


def _rating_user(rng: random.Random) -> dict:
    return {"bias": rng.choice(BIASES)}


def _rating_item(rng: random.Random, pref: dict):
    s = rng.randint(1, 5)
    words = rng.sample(SENTIMENT[s], 2)
    text = f"I bought {rng.choice(PRODUCTS)}: {words[0]}, {words[1]}. {rng.choice(REVIEW_FILLER)}"
    score = str(min(5, max(1, s + pref["bias"])))
    return {"text": text, "score": score}, {"text": text}, score, {"sentiment": s}


# ---------------------------------------------------------------- scholarly titles (LaMP-5)

TITLE_PATTERNS = ["{Method}: {Topic} for {Field}", "Towards {Topic} in {Field}", "On the {Topic} of {Field}",
                  "Learning {Topic} with {Method}", "{Method} Meets {Topic}", "What Makes {Topic} Work?",
                  "{Topic}: A {Method} Perspective", "Rethinking {Topic}"]
METHOD_NAMES = ["Transformers", "Graph Networks", "Contrastive Learning", "Bayesian Inference", "Diffusion Models",
                "Sparse Coding", "Reinforcement Learning", "Kernel Methods"]


def _title_user(rng: random.Random) -> dict:
    return {"pattern": rng.choice(TITLE_PATTERNS), "case": rng.choice(["title", "sentence", "lower"]),
            "acronym": rng.random() < 0.3}


def _title_item(rng: random.Random, pref: dict):
    field = rng.choice(list(FIELDS))
    topic = rng.choice(FIELDS[field])
    method = rng.choice(METHOD_NAMES)
    abstract = (f"We present a study of {topic} in {field} using {method.lower()}. Experiments on {rng.choice(FIELDS[field])} "
                f"show consistent gains, and an analysis explains when {topic} helps.")
    title = apply_title_style(pref, method, topic, field)
    return {"title": title, "abstract": abstract}, {"abstract": abstract}, title, None


def apply_title_style(pref: dict, method: str, topic: str, field: str) -> str:
    t = pref["pattern"].format(Method=method, Topic=topic.title(), Field=field.title())
    if pref["case"] == "sentence":
        t = t[:1].upper() + t[1:].lower()
    elif pref["case"] == "lower":
        t = t.lower()
    if pref["acronym"]:
        t = "".join(w[0] for w in topic.split()).upper() + ": " + t
    return t


# ---------------------------------------------------------------- tweet paraphrasing (LaMP-7)

ACTIVITIES = ["finished reading a book about the ocean", "tried a new coffee place downtown", "watched the game with friends",
              "cleaned my whole apartment", "went for a long run in the rain", "baked bread for the first time",
              "missed the last train home", "started learning the guitar", "got tickets for the concert",
              "fixed my old bike", "planted tomatoes on the balcony", "stayed up late coding"]
FEELINGS = ["it was great", "I am exhausted", "best day in a while", "not sure how I feel", "so proud of myself",
            "never again", "totally worth it"]
ABBREV = {"you": "u", "are": "r", "to": "2", "for": "4", "great": "gr8", "tonight": "2nite", "I am": "I'm"}
EMOJI = ["", ":)", "<3", ":D", ";)"]
OPENERS_T = ["", "", "ugh,", "omg", "lol", "honestly,"]


def _tweet_user(rng: random.Random) -> dict:
    return {"lower": rng.random() < 0.4, "abbrev": rng.random() < 0.5, "emoji": rng.choice(EMOJI),
            "hashtag": rng.random() < 0.5, "opener": rng.choice(OPENERS_T), "bang": rng.random() < 0.4}


def apply_tweet_style(pref: dict, neutral: str, tag: str) -> str:
    t = neutral
    if pref["abbrev"]:
        import re

        for a, b in ABBREV.items():
            t = re.sub(rf"\b{a}\b", b, t)
    if pref["opener"]:
        t = f"{pref['opener']} {t[:1].lower() + t[1:]}"
    t = t.rstrip(".") + ("!!" if pref["bang"] else ".")
    if pref["lower"]:
        t = t.lower()
    if pref["hashtag"]:
        t += f" #{tag}"
    if pref["emoji"]:
        t += f" {pref['emoji']}"
    return t


WHEN = ["Today", "Yesterday", "This morning", "Tonight", "Last weekend", "On Sunday", "After work", "Finally"]
COMPANY = ["", " with my sister", " with a friend", " alone", " with the neighbours", " with my dad"]


def _tweet_item(rng: random.Random, pref: dict):
    act = rng.choice(ACTIVITIES)
    neutral = f"{rng.choice(WHEN)} I {act}{rng.choice(COMPANY)}, and {rng.choice(FEELINGS)}."
    tweet = apply_tweet_style(pref, neutral, act.split()[-1])
    return {"text": tweet}, {"text": neutral}, tweet, None


# ---------------------------------------------------------------- the seed tasks, as generators


def _label_generator(vocab: dict, frames: list[str], fields):
    def user(rng):
        return {"preference": _label_prefs(rng, tuple(vocab))}

    def item(rng, pref):
        text, gold, cands = _classification_item(rng, "", pref["preference"], vocab, frames)
        return fields(text, gold), None, gold, cands
    return user, item


def _headline_gen():
    def user(rng):
        return {"style": _headline_style(rng)}

    def item(rng, pref):
        text, title = _headline_item(rng, pref["style"])
        return {"text": text, "title": title}, None, title, None
    return user, item


# task -> (a user's hidden preference, one item: (history item fields, query fields or None, gold, what the manifest
# keeps of it)); a query with no fields of its own is the item's history prompt (the seed tasks)
GENERATORS = {
    "citation": (_citation_user, _citation_item),
    "movie_tagging": _label_generator(MOVIE_VOCAB, MOVIE_FRAMES, lambda text, gold: {"description": text, "tag": gold}),
    "news_categorize": _label_generator(
        NEWS_VOCAB, NEWS_FRAMES,
        lambda text, gold: {"text": text, "title": text.split(",")[0].split(":")[0][:60], "category": gold}),
    "product_rating": (_rating_user, _rating_item),
    "news_headline": _headline_gen(),
    "scholarly_title": (_title_user, _title_item),
    "tweet_paraphrase": (_tweet_user, _tweet_item),
}


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
    new_user, new_item = GENERATORS[task_name]
    manifest: dict = {"task": task_name, "seed": seed, "users": {}, "queries": {}}
    used: set[str] = set()
    text_field = task.query_field or next(f for f in task.item_fields if f != task.target_field or len(task.item_fields) == 1)

    def make_user(uid: str, test: bool) -> dict:
        pref = new_user(rng)
        manifest["users"][uid] = pref | {"test": test}
        items = []
        for k in range(history_per_user + queries_per_user):
            iid = f"{uid}-{k}"
            for _ in range(1000):  # every item text is new: a query's text never reappears as someone's history
                fields, qfields, gold, extra = new_item(rng, pref)
                key = fields[text_field] if qfields is None else pb.query(qfields)
                if key not in used:
                    break
            else:  # a repeated text would make the data its own overlap error (a test query in training)
                raise ConfigError(f"make-data {task_name}: the generator ran out of distinct item texts after "
                                  f"{len(used)} items; ask for fewer users or items (--num_users, --history_per_user)")
            used.add(key)
            items.append(({"id": iid, **fields}, qfields, gold, extra))
        profile = [dict(it, date=f"2020-01-{1 + k % 28:02d}") for k, (it, _, _, _) in enumerate(items[:history_per_user])]
        queries = []
        for it, qfields, gold, extra in items[history_per_user:]:
            queries.append({"id": it["id"], "input": pb.prompt(it) if qfields is None else pb.query(qfields), "gold": gold})
            manifest["queries"][it["id"]] = {"user_id": uid, "gold": gold,
                                             ("candidates" if isinstance(extra, list) or extra is None else "truth"): extra}
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
