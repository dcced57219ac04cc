"""Generates the embedded offline task suite from hand-written lexicons and templates, deterministically.

Run `python tools/suite_generator.py` (from any directory) to rewrite `memmcl/tasks/embedded/` and `configs/tasks/`;
a test checks that the committed files are exactly what this script writes (the extraction tasks come from
`tools/extraction_suite.py`). Templates use negation ("not good"), intensifiers,
contrast ("good food but rude staff": the clause after "but" decides), several aspects per sentence, distractor
sentences, and event/valence composition (irony), so tasks differ in difficulty and a model must read the sentence.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import yaml

POS = ["good", "great", "excellent", "wonderful", "fantastic", "lovely", "superb", "pleasant", "delightful", "brilliant",
       "enjoyable", "charming", "impressive", "solid", "nice"]
NEG = ["bad", "terrible", "awful", "poor", "horrible", "dreadful", "disappointing", "boring", "mediocre", "weak",
       "lousy", "dull", "annoying", "unpleasant", "sloppy"]
NEU = ["okay", "average", "ordinary", "acceptable", "standard", "so-so", "unremarkable", "fair", "passable"]
STRONG_POS = ["outstanding", "perfect", "amazing", "incredible", "magnificent", "flawless", "phenomenal"]
STRONG_NEG = ["atrocious", "unbearable", "disgusting", "abysmal", "appalling", "horrendous", "pathetic"]
INTENS = ["very", "really", "extremely", "truly", "incredibly", "remarkably"]
MILD = ["somewhat", "slightly", "fairly", "a little", "rather"]
FILLER = ["I watched it on a Sunday evening.", "My friend recommended it to me.", "We went there last week.",
          "It was raining outside.", "I had read about it online.", "My sister came along too.", "It was my first time.",
          "The place was busy.", "I paid with a card.", "We arrived around eight."]
MOVIE = ["the movie", "the film", "the plot", "the acting", "the soundtrack", "the script", "the ending", "the cast",
         "the dialogue", "the pacing", "the visuals", "the story", "this show", "the sequel"]
RESTAURANT = ["food", "service", "staff", "ambience", "prices", "drinks", "dessert", "pasta", "pizza", "waiter",
              "music", "portions", "wine list", "decor", "coffee"]
LAPTOP = ["battery", "screen", "keyboard", "price", "speed", "touchpad", "speakers", "design", "camera", "fan",
          "charger", "display", "hinge", "memory", "trackpad"]
GROUPS = ["the Zorbians", "people from Glimmerton", "the Vellish", "Quarrin immigrants", "the Morvati",
          "northerners from Osk", "the Tellurians", "families from Brask"]
PEOPLE = ["my neighbour", "the referee", "my coworker", "the landlord", "the new coach", "that reviewer",
          "the moderator", "my cousin", "the cashier", "the driver"]
TARGETS = ["remote work", "electric cars", "the new park", "school uniforms", "nuclear power", "a four-day week",
           "the bike lanes", "the sugar tax", "online voting", "the new stadium"]
PRODUCTS = ["the Nexa phone", "the Orbit phone", "the Lumo tablet", "the Vega laptop", "the Pico camera",
            "the Zephyr laptop", "the Atlas watch", "the Nova tablet"]


PLURAL = {"prices", "drinks", "portions", "speakers"}


def _clause(rng: random.Random, subject: str, polarity: int, strength: int = 1) -> str:
    """Returns a clause about `subject`: polarity +1/-1/0, strength 2 = strong, 1 = plain, 0 = mild."""
    return _clause_was(rng, subject, polarity, strength).replace(" was ", " were ", 1) if subject.split()[-1] in PLURAL \
        else _clause_was(rng, subject, polarity, strength)


def _clause_was(rng: random.Random, subject: str, polarity: int, strength: int) -> str:
    if polarity == 0:
        return rng.choice([f"{subject} was {rng.choice(NEU)}", f"{subject} was neither good nor bad",
                           f"{subject} was {rng.choice(NEU)}, nothing special"])
    lex, strong, opposite = (POS, STRONG_POS, NEG) if polarity > 0 else (NEG, STRONG_NEG, POS)
    if strength == 2:
        return rng.choice([f"{subject} was {rng.choice(strong)}", f"{subject} was {rng.choice(INTENS)} {rng.choice(lex)}",
                           f"{subject} was {rng.choice(INTENS)} {rng.choice(strong)}"])
    if strength == 0:
        return f"{subject} was {rng.choice(MILD)} {rng.choice(lex)}"
    return rng.choice([f"{subject} was {rng.choice(lex)}", f"{subject} was not {rng.choice(opposite)}",
                       f"{subject} was not at all {rng.choice(opposite)}", f"{subject} was {rng.choice(lex)}"])


def _sentence(clause: str) -> str:
    return clause[0].upper() + clause[1:] + "."


def _review(rng: random.Random, polarity: int, strength: int = 1) -> str:
    """Returns a review whose overall polarity is that of its last (or only) evaluative clause."""
    a, b = rng.sample(MOVIE, 2)
    form = rng.random()
    if form < 0.45:
        body = _sentence(_clause(rng, a, polarity, strength))
    elif form < 0.8 and polarity != 0:
        body = _sentence(f"{_clause(rng, a, -polarity, 1)}, but {_clause(rng, b, polarity, strength)}")
    else:
        body = _sentence(f"{_clause(rng, a, polarity, strength)} and {_clause(rng, b, polarity, 1)}")
    if rng.random() < 0.4:
        body = f"{rng.choice(FILLER)} {body}" if rng.random() < 0.5 else f"{body} {rng.choice(FILLER)}"
    return body


def sc_binary(rng):
    label = rng.choice(["negative", "positive"])
    return _review(rng, 1 if label == "positive" else -1), label, None


def sc_3class(rng):
    label = rng.choice(["negative", "neutral", "positive"])
    return _review(rng, {"negative": -1, "neutral": 0, "positive": 1}[label]), label, None


def sc_5class(rng):
    label = rng.choice(["very_negative", "negative", "neutral", "positive", "very_positive"])
    polarity = {"very_negative": -1, "negative": -1, "neutral": 0, "positive": 1, "very_positive": 1}[label]
    strength = 2 if label.startswith("very") else rng.choice([0, 1])
    return _review(rng, polarity, strength), label, None


def _absa(rng, aspects):
    chosen = rng.sample(aspects, rng.choice([1, 2, 2, 3]))
    pols = [rng.choice([-1, 0, 1]) for _ in chosen]
    clauses = [_clause(rng, f"the {a}", p) for a, p in zip(chosen, pols, strict=True)]
    joined = clauses[0]
    for c, prev, cur in zip(clauses[1:], pols, pols[1:], strict=False):
        joined += (", but " if prev * cur < 0 else rng.choice([" and ", ", ", " while "])) + c
    text = _sentence(joined)
    if rng.random() < 0.3:
        text = f"{rng.choice(FILLER)} {text}"
    k = rng.randrange(len(chosen))
    return text, {-1: "negative", 0: "neutral", 1: "positive"}[pols[k]], chosen[k]


NEG_EVENTS = ["my flight got cancelled again", "the printer jammed twice", "my phone died during the call",
              "it rained all weekend", "the bus was an hour late", "I got stuck in traffic for three hours",
              "the wifi went down again", "my laptop crashed before saving", "I missed the last train",
              "the heating broke in January", "my coffee spilled on my notes", "the meeting ran two hours over"]
POS_EVENTS = ["I got a raise", "the sun is out all weekend", "my team won the final", "I finished the marathon",
              "my package arrived early", "we got free dessert", "my sister had a baby", "I passed the exam",
              "the concert tickets arrived", "I found my lost keys", "the holidays start tomorrow", "my code compiled first time"]
POS_EXCL = ["Great", "Wonderful", "Fantastic", "Just perfect", "Oh lovely", "Awesome", "Brilliant", "Oh joy"]
NEG_EXCL = ["Ugh", "Terrible", "Awful", "Sadly", "How annoying", "What a pain", "Unbelievable", "So frustrating"]


def irony(rng):
    ironic = rng.random() < 0.4
    positive_event = rng.random() < 0.5
    if ironic:  # praise for a bad event
        event, excl, verb = rng.choice(NEG_EVENTS), rng.choice(POS_EXCL), "love"
    elif positive_event:
        event, excl, verb = rng.choice(POS_EVENTS), rng.choice(POS_EXCL), "love"
    else:
        event, excl, verb = rng.choice(NEG_EVENTS), rng.choice(NEG_EXCL), "hate"
    form = rng.randrange(3)
    text = [f"{excl}, {event}.", f"{event[0].upper() + event[1:]}. {excl}!", f"I just {verb} it when {event}."][form]
    return text, "ironic" if ironic else "not_ironic", None


HATE = ["{g} are vermin and should be driven out of town.", "{g} are a plague on this country.",
        "I wish {g} would all just disappear.", "{g} are subhuman and do not deserve rights.",
        "Never trust {g}, they are all criminals by nature.", "{g} should be banned from every school."]
NOT_HATE = ["{g} opened a new bakery downtown.", "I met some of {g} at the festival yesterday.",
            "{g} celebrate their new year in March.", "A documentary about {g} aired last night.",
            "{g} won the regional football cup.", "The museum has an exhibit on the history of {g}.",
            "I strongly disagree with the policy that {g} proposed.", "The traffic near the market of {g} is awful."]


def hate(rng):
    hateful = rng.random() < 0.3
    text = rng.choice(HATE if hateful else NOT_HATE).format(g=rng.choice(GROUPS))
    text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text = f"{text} {rng.choice(FILLER)}"
    return text, "hateful" if hateful else "not_hateful", None


OFFENSIVE = ["{p} is a clueless idiot.", "Shut up, {p}, nobody cares about your garbage opinion.",
             "{p} is a pathetic loser.", "What a moron {p} turned out to be.", "{p} can go to hell.",
             "{p} has the brain of a rotten potato."]
NOT_OFFENSIVE = ["I disagree with {p} about the schedule.", "{p} made a decision I did not like.",
                 "{p} was late again, which was frustrating.", "I had a long talk with {p} today.",
                 "{p} gave a terrible presentation, but meant well.", "{p} helped me carry the boxes.",
                 "I think {p} is wrong about the budget.", "{p} fixed my bike for free."]


def offensive(rng):
    off = rng.random() < 0.35
    text = rng.choice(OFFENSIVE if off else NOT_OFFENSIVE).format(p=rng.choice(PEOPLE))
    text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text = f"{rng.choice(FILLER)} {text}"
    return text, "offensive" if off else "not_offensive", None


FAVOR = ["{t} is the best thing that happened to our city.", "We need more of {t}, and soon.",
         "I fully support {t}.", "Anyone who has tried {t} knows it works."]
AGAINST = ["We must stop {t} now.", "{t} is a waste of public money.", "I am strongly opposed to {t}.",
           "Nobody asked for {t} and nobody wants it."]
NONE = ["The council discussed {t} yesterday.", "A report on {t} will be published next month.",
        "My uncle asked me what I think about {t}.", "There was a radio show about {t} this morning."]


def stance(rng):
    label = rng.choice(["favor", "against", "none"])
    target, other = rng.sample(TARGETS, 2)
    sentences = [rng.choice({"favor": FAVOR, "against": AGAINST, "none": NONE}[label]).format(t=target)]
    if rng.random() < 0.5:  # a distractor sentence with a stance on another target
        sentences.insert(rng.randrange(2), rng.choice(rng.choice([FAVOR, AGAINST])).format(t=other))
    return " ".join(s[0].upper() + s[1:] for s in sentences), label, target


EMOTION_CUES = {
    "joy": ["I am thrilled", "I am so happy", "I am overjoyed", "I feel delighted", "I could dance"],
    "sadness": ["I am heartbroken", "I cannot stop crying", "I feel so lonely", "I am deeply sad", "I miss the old days"],
    "anger": ["I am furious", "I am fed up", "I am livid", "this makes my blood boil", "I am outraged"],
    "fear": ["I am terrified", "I am so scared", "I feel nervous", "I am afraid", "my hands are shaking"],
}
EMOTION_EVENTS = ["after the phone call", "since the news this morning", "now that the results are in",
                  "about tomorrow", "after what happened at work", "thinking about the trip", "after reading the letter"]


def emotion(rng):
    label = rng.choice(list(EMOTION_CUES))
    text = f"{rng.choice(EMOTION_CUES[label])} {rng.choice(EMOTION_EVENTS)}."
    text = text[0].upper() + text[1:]
    if rng.random() < 0.4:
        text = f"{rng.choice(FILLER)} {text}"
    return text, label, None


IMPLICIT = {
    "positive": ["the battery lasted two full days", "the package arrived a day early", "the waiter refilled our water without asking",
                 "the repair took five minutes", "the room had a view of the sea", "the update fixed every crash",
                 "we got a table right away", "the refund came within an hour", "the jacket kept me dry all day"],
    "negative": ["the battery lasted only an hour", "the package arrived two weeks late", "we waited forty minutes for the menu",
                 "the screen cracked on the first day", "the room smelled of smoke", "the update deleted my photos",
                 "the soup came out cold", "the refund never came", "the zipper broke after one wash"],
    "neutral": ["the battery is a lithium-ion pack", "the package came in a brown box", "the waiter wore a black shirt",
                "the room is on the third floor", "the update was released on Tuesday", "the menu has twelve pages",
                "the jacket comes in three colours", "the store opens at nine", "the phone weighs 180 grams"],
}


def implicit(rng):
    label = rng.choice(list(IMPLICIT))
    fact = rng.choice(IMPLICIT[label])
    lead = rng.choice(["", "I noticed that ", "To be honest, ", "After a week, ", "Well, "])
    text = (lead + fact)[0].upper() + (lead + fact)[1:] + "."
    if rng.random() < 0.5:
        text = f"{text} {rng.choice(FILLER)}"
    return text, label, None


BETTER = ["has a sharper screen than", "is faster than", "is cheaper than", "is lighter than", "is more reliable than",
          "has a longer battery life than", "takes better photos than"]
WORSE = ["is slower than", "is heavier than", "is more expensive than", "is less reliable than",
         "has a dimmer screen than", "takes worse photos than", "breaks more often than"]
EQUAL = ["is as fast as", "is just as good as", "costs the same as", "is as reliable as", "is no better than"]


def comparative(rng):
    a, b = rng.sample(PRODUCTS, 2)
    kind = rng.choice(["better", "worse", "equal"])
    text = f"{a} {rng.choice({'better': BETTER, 'worse': WORSE, 'equal': EQUAL}[kind])} {b}."
    text = text[0].upper() + text[1:]
    if rng.random() < 0.5:  # asked about the second product: better/worse swap
        target, label = b, {"better": "worse", "worse": "better", "equal": "equal"}[kind]
    else:
        target, label = a, kind
    return text, label, target.removeprefix("the ")


# name -> (group, labels -> answer words, instruction, generator, aspect field name in the prompt or None)
SUITE: dict[str, tuple[str, dict[str, str], str, Callable, str | None]] = {
    "sc_binary": ("SC", {"negative": "negative", "positive": "positive"},
                  "Classify the sentiment of the review as positive or negative.", sc_binary, None),
    "sc_3class": ("SC", {"negative": "negative", "neutral": "neutral", "positive": "positive"},
                  "Classify the sentiment of the review as positive, neutral or negative.", sc_3class, None),
    "sc_5class": ("SC", {"very_negative": "terrible", "negative": "bad", "neutral": "neutral", "positive": "good",
                         "very_positive": "great"},
                  "Rate the review on a five-point scale: terrible, bad, neutral, good or great.", sc_5class, None),
    "absa_restaurant": ("SC", {"negative": "negative", "neutral": "neutral", "positive": "positive"},
                        "What is the sentiment towards the given aspect of the restaurant? Answer positive, neutral or negative.",
                        lambda rng: _absa(rng, RESTAURANT), "Aspect"),
    "absa_laptop": ("SC", {"negative": "negative", "neutral": "neutral", "positive": "positive"},
                    "What is the sentiment towards the given aspect of the laptop? Answer positive, neutral or negative.",
                    lambda rng: _absa(rng, LAPTOP), "Aspect"),
    "irony": ("MAST", {"not_ironic": "no", "ironic": "yes"}, "Is the text ironic? Answer yes or no.", irony, None),
    "hate": ("MAST", {"not_hateful": "no", "hateful": "yes"},
             "Is the text hate speech against a group of people? Answer yes or no.", hate, None),
    "offensive": ("MAST", {"not_offensive": "no", "offensive": "yes"},
                  "Is the text offensive or insulting? Answer yes or no.", offensive, None),
    "stance": ("MAST", {"against": "against", "favor": "favor", "none": "none"},
               "What is the author's stance towards the target? Answer favor, against or none.", stance, "Target"),
    "emotion": ("MAST", {"anger": "anger", "fear": "fear", "joy": "joy", "sadness": "sadness"},
                "Which emotion does the author express? Answer anger, fear, joy or sadness.", emotion, None),
    "implicit": ("MAST", {"negative": "negative", "neutral": "neutral", "positive": "positive"},
                 "The text states a fact without sentiment words. Is the implied sentiment positive, neutral or negative?",
                 implicit, None),
    "comparative": ("MAST", {"better": "better", "equal": "equal", "worse": "worse"},
                    "Compared with the other product, is the target product better, worse or equal?", comparative, "Product"),
}
SPLIT_SIZES = {"train": 300, "validation": 100, "test": 100}


def generate_task(name: str, seed: int = 1234) -> dict[str, list[dict]]:
    """Returns the splits of one task: unique (text, aspect) pairs, never shared between splits."""
    _, _, _, make, _ = SUITE[name]
    rng = random.Random(f"{seed}:{name}")
    seen: set[tuple[str, str | None]] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in SPLIT_SIZES.items():
        rows: list[dict] = []
        for _ in range(size * 200):
            if len(rows) == size:
                break
            text, label, aspect = make(rng)
            if (text, aspect) in seen:
                continue
            seen.add((text, aspect))
            row = {"id": f"{name}-{split}-{len(rows)}", "text": text, "label": label}
            if aspect is not None:
                row["aspect"] = aspect
            rows.append(row)
        if len(rows) < size:
            raise RuntimeError(f"{name}: only {len(rows)} unique examples for split {split}; the templates are too few")
        splits[split] = rows
    return splits


def write_suite(data_dir: Path, spec_dir: Path, seed: int = 1234) -> None:
    """Writes every task's JSONL splits into `data_dir/<task>/` and its spec YAML into `spec_dir`."""
    spec_dir.mkdir(parents=True, exist_ok=True)
    for name, (group, labels, instruction, _, aspect_name) in SUITE.items():
        (data_dir / name).mkdir(parents=True, exist_ok=True)
        for split, rows in generate_task(name, seed).items():
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            (data_dir / name / f"{split}.jsonl").write_text(lines, encoding="utf-8")
        spec = {"name": name, "group": group, "instruction": instruction, "labels": labels, "format": "jsonl",
                "fields": {"text": "text", "label": "label", "aspect": "aspect" if aspect_name else None, "id": "id"},
                "splits": {s: f"embedded:{name}/{s}.jsonl" for s in SPLIT_SIZES}}
        if aspect_name:
            spec["aspect_name"] = aspect_name
        (spec_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, width=120), encoding="utf-8")


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    write_suite(root / "memmcl" / "tasks" / "embedded", root / "configs" / "tasks")
    print(f"wrote {len(SUITE)} tasks")
