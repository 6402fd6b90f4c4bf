"""Embedded demo corpora, generated deterministically from a seed (nothing is downloaded or committed).

Four sets, written as jsonl with ``question``/``answer`` fields (math) or ``text`` (web):

- ``reference``: clean worked math problems with final answers (the high-quality corpus).
- ``web``: a larger noisy "web" corpus. The math in it is of the same kinds but other problems, posted
  in forum threads and pages among what real web math comes with: navigation and forum chrome,
  usernames, timestamps, page counts, URLs, IDs, ads with prices and phone numbers, off-topic chatter,
  and worked answers with mistakes (a number misread from the question, a calculation that is off, a
  final answer that is not the result just computed).
- ``heldout``: clean problems never seen in training, for the target-domain loss (answer tokens).
- ``offtarget``: held-out web chatter without math, to show what SLM gives up.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

NAMES = ("Ava Ben Carla Dev Elena Farid Grace Hiro Ines Jamal Kira Liam Maya Noah Olga Priya Quinn Rosa Sami Tara "
         "Umar Vera Wes Xena Yusuf Zoe Aditi Bruno Chen Dana Emil Fatima Goran Hana Ivan Jade Kofi Lena Marco "
         "Nadia Oscar Paula Rafael Sofia Tomas Uma Victor Wendy Yara Zane").split()
ITEMS = ("apple pencil notebook sticker cookie marble book ticket shirt candle bottle lemon orange cupcake "
         "balloon card toy plant basket towel").split()
CONTAINERS = ("box bag crate jar basket tray").split()
VEHICLES = ("train car bus cyclist truck boat runner").split()
TOPICS = {
    "football": "the match last night the referee was terrible our striker missed two penalties the league table "
                "looks grim this season the transfer window the coach changed the formation again fans were singing",
    "weather": "it has been raining all week the forecast says sun on saturday the heatwave broke records my "
               "garden is flooded again winter came early this year the wind knocked over our fence",
    "gaming": "the new patch nerfed my favourite build the servers were down all evening ranked mode is full of "
              "smurfs the boss fight took me three hours the graphics card overheats when I stream",
    "cooking": "I tried the recipe with less sugar the oven runs hot so lower the temperature sourdough needs a "
               "warm kitchen my grandmother always added nutmeg the soup tastes better the next day",
    "phones": "my battery drains by noon the update broke bluetooth the camera is great at night the screen "
              "cracked after one drop customer support never answered the charger stopped working",
    "travel": "the flight was delayed four hours the hotel lost our booking the beach was crowded the museum "
              "closes early on mondays we missed the last ferry the street food was amazing",
}
SITES = ("mathhelpforum homeworkhub studyrooms askaquestion quizpond tutorzone brainlybox forumcity "
         "numbertalk schoolchat").split()
ADS = ("Buy cheap {item}s now, 50% OFF today only", "Hot singles in your area want to meet you",
       "You won't believe what this {item} does", "Limited offer: free shipping on every {item}",
       "Click here to claim your prize", "Lose weight fast with this one weird trick")
REPLIES = ("thanks a lot!!", "lol this helped me so much", "can someone explain step 2?", "bump", "+1",
           "I got a different answer", "this is wrong", "great explanation", "my teacher said the same",
           "why do you multiply there?", "ok i get it now", "wow that was fast", "omg finally")


# Numbers stay small enough that the arithmetic is a set of facts a tiny model can learn (products of
# small numbers, adding or taking away a few): the reference model can then tell a right result from
# a wrong one, which is what makes wrong worked answers noise rather than just hard tokens.

def _shopping(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, p = r.randint(2, 9), r.randint(2, 11)
    question = r.choice([
        f"{name} buys {a} {item}s at ${p} each and pays with a $100 bill. How much change does {name} get?",
        f"At the market, {name} gets {a} {item}s for ${p} each and pays with $100. What is the change?",
    ])
    steps = [f"The {item}s cost {a} * {p} = <<{a}*{p}={a * p}>>{a * p} dollars.",
             f"The change is 100 - {a * p} = <<100-{a * p}={100 - a * p}>>{100 - a * p} dollars."]
    return question, steps, 100 - a * p


def _sharing(r: random.Random):
    name, item, box = r.choice(NAMES), r.choice(ITEMS), r.choice(CONTAINERS)
    k, per, extra = r.randint(2, 9), r.randint(2, 11), r.randint(2, 9)
    total = k * per
    question = (f"{name} has a {box} with {total} {item}s and buys {extra} more {item}s. {name} keeps the new ones "
                f"and shares the rest equally among {k} friends. How many {item}s does each friend get?")
    steps = [f"{name} shares the {total} {item}s that were there before.",
             f"Each friend gets {total} / {k} = <<{total}/{k}={per}>>{per} {item}s."]
    return question, steps, per


def _speed(r: random.Random):
    v, s, h, m = r.choice(VEHICLES), r.randint(2, 11), r.randint(2, 9), r.randint(1, 9)
    question = f"A {v} travels at {s} km per hour for {h} hours and then {m} km more. How far does it travel?"
    steps = [f"First it covers {s} * {h} = <<{s}*{h}={s * h}>>{s * h} km.",
             f"Altogether it travels {s * h} + {m} = <<{s * h}+{m}={s * h + m}>>{s * h + m} km."]
    return question, steps, s * h + m


def _discount(r: random.Random):
    item, price, pct = r.choice(ITEMS), r.randint(1, 9) * 10, r.choice([10, 20, 50])
    off = price * pct // 100
    question = f"A {item} costs ${price}. It is on sale for {pct}% off. How much does it cost on sale?"
    steps = [f"The discount is {price} * {pct} / 100 = <<{price}*{pct}/100={off}>>{off} dollars.",
             f"On sale it costs {price} - {off} = <<{price}-{off}={price - off}>>{price - off} dollars."]
    return question, steps, price - off


def _ages(r: random.Random):
    a, b = r.sample(NAMES, 2)
    age, k, y = r.randint(2, 12), r.randint(2, 4), r.randint(1, 9)
    question = f"{a} is {age} years old. {b} is {k} times as old as {a}. How old will {b} be in {y} years?"
    steps = [f"{b} is {k} * {age} = <<{k}*{age}={k * age}>>{k * age} years old now.",
             f"In {y} years {b} will be {k * age} + {y} = <<{k * age}+{y}={k * age + y}>>{k * age + y} years old."]
    return question, steps, k * age + y


def _remaining(r: random.Random):
    name, friend, item = *r.sample(NAMES, 2), r.choice(ITEMS)
    n, g, b = r.randint(12, 60), r.randint(1, 9), r.randint(1, 9)
    question = f"{name} had {n} {item}s, gave {g} to {friend} and then bought {b} more. How many {item}s does {name} have now?"
    steps = [f"After giving some away, {name} has {n} - {g} = <<{n}-{g}={n - g}>>{n - g} {item}s.",
             f"After buying more, {name} has {n - g} + {b} = <<{n - g}+{b}={n - g + b}>>{n - g + b} {item}s."]
    return question, steps, n - g + b


def _rectangle(r: random.Random):
    w, h, cost = r.randint(2, 9), r.randint(2, 9), r.randint(2, 5)
    question = f"A garden is {w} m wide and {h} m long. Fencing costs ${cost} per metre. How much does it cost to fence the garden?"
    p = 2 * (w + h)
    steps = [f"The perimeter is 2 * ({w} + {h}) = <<2*({w}+{h})={p}>>{p} m.",
             f"The fence costs {p} * {cost} = <<{p}*{cost}={p * cost}>>{p * cost} dollars."]
    return question, steps, p * cost


def _savings(r: random.Random):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    x, w, spend = r.randint(2, 11), r.randint(2, 9), r.randint(1, 9)
    question = f"{name} saves ${x} every week for {w} weeks and then spends ${spend} on a {item}. How much money is left?"
    steps = [f"{name} saves {x} * {w} = <<{x}*{w}={x * w}>>{x * w} dollars.",
             f"After the {item}, {x * w} - {spend} = <<{x * w}-{spend}={x * w - spend}>>{x * w - spend} dollars are left."]
    return question, steps, x * w - spend


PROBLEMS = (_shopping, _sharing, _speed, _discount, _ages, _remaining, _rectangle, _savings)


CALC = re.compile(r"<<([^=<>]+)=(-?\d+)>>(-?\d+)")


def _off_by(r: random.Random, value: int) -> int:
    return max(0, value + r.choice([-1, 1]) * r.choice([1, 2, 10, r.randint(3, 9)]))


def _corrupt(r: random.Random, question: str, answer: str) -> tuple[str, int | None]:
    """Make a worked answer wrong the ways posted solutions are: a number misread from the question,
    a calculation that is off, or a final answer that is not the result just computed."""
    kind = r.choice(["misread", "calculation", "final"])
    calcs = list(CALC.finditer(answer))
    if kind == "misread":
        numbers = [m for m in re.finditer(r"\d+", answer) if m.group() in question.split() or
                   f"${m.group()}" in question]
        if numbers:
            m = r.choice(numbers)
            return answer[: m.start()] + str(_off_by(r, int(m.group()))) + answer[m.end():], None
    if kind == "final":
        return answer, _off_by(r, int(calcs[-1].group(2)))
    bad = {i for i in range(len(calcs)) if r.random() < 0.5} or {len(calcs) - 1}
    pieces, last, final = [], 0, None
    for i, m in enumerate(calcs):
        shown = _off_by(r, int(m.group(2))) if i in bad else int(m.group(2))
        pieces.append(answer[last : m.start()] + f"<<{m.group(1)}={shown}>>{shown}")
        last, final = m.end(), shown
    return "".join(pieces) + answer[last:], final


def math_problem(r: random.Random, wrong: bool = False) -> dict:
    """One worked problem ``{"question", "answer"}``; with ``wrong``, the solution has a mistake."""
    question, steps, result = r.choice(PROBLEMS)(r)
    answer, final = "\n".join(steps), result
    if wrong:
        answer, wrong_final = _corrupt(r, question, answer)
        final = wrong_final if wrong_final is not None else int(list(CALC.finditer(answer))[-1].group(3))
    return {"question": question, "answer": answer + f"\n#### {final}"}


def _username(r: random.Random) -> str:
    base = r.choice(NAMES).lower() + r.choice(["", "_", "x", "99", "_the_", "."]) + r.choice(
        ["gamer", "math", "cat", "king", "pro", "star", "wolf", "", "dude"])
    return base + str(r.randint(0, 9999)) if r.random() < 0.7 else base


def _timestamp(r: random.Random) -> str:
    return (f"{r.randint(2008, 2024)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} "
            f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}")


def _url(r: random.Random) -> str:
    path = "/".join(r.choice(["t", "thread", "q", "post", "p", "forum", "math", "help"]) for _ in range(r.randint(1, 3)))
    return f"https://www.{r.choice(SITES)}.com/{path}/{r.randint(1000, 9999999)}?ref={r.getrandbits(32):08x}"


SUBJECTS = ("my neighbour", "the new coach", "our landlord", "my little brother", "the whole team", "everyone at work",
            "the delivery guy", "my cousin", "the mayor", "this streamer", "the waiter", "our teacher", "my cat")
VERBS = ("complained about", "posted a video of", "could not stop talking about", "finally fixed", "forgot",
         "argued about", "lost", "recommended", "spilled coffee on", "tried to sell", "laughed at", "ignored")
OBJECTS = ("the parking situation", "the broken elevator", "a vintage guitar", "the group chat", "the noisy fridge",
           "last week's barbecue", "the league standings", "a cheap vacuum cleaner", "the weekend forecast",
           "his old motorbike", "the wifi password", "a mystery novel", "the garden hose", "the concert tickets")
TAILS = ("again", "for no reason", "during the meeting", "at two in the morning", "before lunch", "in the rain",
         "right in front of everyone", "all weekend", "like it was a big deal", "honestly", "on live stream")


def _chatter(r: random.Random, n_sentences: int) -> str:
    """Off-topic chatter: fixed topic phrases mixed with combinatorial sentences (learnable, never-ending)."""
    sentences = []
    for _ in range(n_sentences):
        if r.random() < 0.4:
            topic = TOPICS[r.choice(list(TOPICS))].split()
            start = r.randrange(0, len(topic) - 6)
            words = " ".join(topic[start : start + r.randint(5, 12)])
        else:
            words = f"{r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(OBJECTS)} {r.choice(TAILS)}"
        sentences.append(words[0].upper() + words[1:] + r.choice([".", "!", "...", "?", " lol.", " smh."]))
    return " ".join(sentences)


def web_page(r: random.Random, math_share: float = 0.5, exclude: frozenset | set = frozenset(),
             wrong_share: float = 0.5) -> str:
    """A forum thread or page: chrome, users, ads, chatter, and (often) a math problem with a worked answer."""
    user = _username(r)
    parts = [
        f"{r.choice(['Home', 'Forums', 'Index'])} > {r.choice(['Homework Help', 'General', 'Off Topic', 'Math', 'Lounge'])} > "
        f"Thread #{r.randint(10000, 999999)}",
        f"Posted by {user} on {_timestamp(r)} | Views: {r.randint(10, 99999)} | Replies: {r.randint(0, 80)}",
        f"Page {r.randint(1, 9)} of {r.randint(9, 60)} | Member since {r.randint(2001, 2024)} | Posts: {r.randint(1, 9999)}",
    ]
    if r.random() < math_share:
        problem = math_problem(r, wrong=r.random() < wrong_share)
        while problem["question"] in exclude:  # keep held-out problems out of the training corpus
            problem = math_problem(r, wrong=r.random() < wrong_share)
        parts.append(r.choice(["need help with this one??", "Q:", "homework question:", "can anyone solve this"])
                     + " " + problem["question"])
        helper = _username(r)
        parts.append(f"Re: reply from {helper} at {_timestamp(r)}")
        parts.append(problem["answer"])
    else:
        parts.append(_chatter(r, r.randint(2, 6)))
    for _ in range(r.randint(1, 4)):
        kind = r.random()
        if kind < 0.35:
            parts.append(f"{_username(r)} wrote: {r.choice(REPLIES)} {_chatter(r, r.randint(0, 2))}".strip())
        elif kind < 0.55:
            parts.append(f"Sponsored: {r.choice(ADS).format(item=r.choice(ITEMS))}, only ${r.randint(1, 999)}.99, "
                         f"call {r.randint(200, 999)}-{r.randint(100, 999)}-{r.randint(1000, 9999)} {_url(r)}")
        elif kind < 0.75:
            parts.append(f"Source: {_url(r)} (archived {_timestamp(r)}) id={r.getrandbits(64):016x}")
        else:
            parts.append(_chatter(r, r.randint(1, 3)))
    parts.append(f"Report | Quote | Like ({r.randint(0, 250)}) | Share | {r.choice(['Log in to reply', 'Sign up'])}")
    return "\n".join(parts)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def generate(out: str | Path, seed: int = 0, n_reference: int = 3000, n_web: int = 12000, n_heldout: int = 400,
             n_offtarget: int = 300, math_share: float = 0.5, wrong_share: float = 0.5) -> dict[str, Path]:
    """Write the four demo sets under ``out`` and return their paths. Same seed, same bytes."""
    out = Path(out)
    r = random.Random(f"rho1-demo-{seed}")
    seen: set[str] = set()

    def fresh_problems(n: int):
        while n:
            p = math_problem(r)
            if p["question"] not in seen:
                seen.add(p["question"])
                n -= 1
                yield p

    return {
        "reference": write_jsonl(out / "reference.jsonl", fresh_problems(n_reference)),
        "heldout": write_jsonl(out / "heldout.jsonl", fresh_problems(n_heldout)),
        "web": write_jsonl(out / "web.jsonl", ({"text": web_page(r, math_share, seen, wrong_share)} for _ in range(n_web))),
        "offtarget": write_jsonl(out / "offtarget.jsonl", ({"text": web_page(r, 0.0)} for _ in range(n_offtarget))),
    }
