"""The RULER tasks (Hsieh et al. 2024, arXiv 2404.06654), generated locally as token ids.

Every case is an instruction, a haystack (a real text or repeated filler, cut only at sentence
ends) with one or more needles inserted, and a question with the start of the answer. The
phrasing follows RULER's templates; scoring is its `string_match_all`: the fraction of the
expected strings that appear in the answer (case-insensitive).

- niah_number / niah_word / niah_uuid: one needle "One of the special magic numbers for {key}
  is: {value}." with a 7-digit number, a word or a uuid as value; ask for the key's value.
- multikey: four needles with different keys, ask for one (the others are distractors).
- multivalue: four needles with the same key, ask for all four values.
- multiquery: four needles with different keys, ask for all four.
- vt (variable tracking): a chain "VAR AAAAA = 12345", "VAR BBBBB = VAR AAAAA", ... of five
  names, ask for every name bound to the value.

The depth of a case is where its first needle goes (percent of the haystack); further needles go
at seeded random places after it for vt (a chain must come in order) and anywhere for the
others. Cases are a pure function of (seed, task, length, depth, trial), so every strategy reads
the same trials, and adding a task or a length leaves the other cases as they were.

A case carries what `passkey.run_camelot` / `run_full` need (`needle_at`, `suffix`, `ids`), so
the suite runs on that machinery: the prefix before the first needle is read once per group.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass, field, replace

from camelot.eval.passkey import Haystack, _ids, haystack_room, sentence_end

from camelot.cli import UserError

TASKS = ("niah_number", "niah_word", "niah_uuid", "multikey", "multivalue", "multiquery", "vt")
NEEDLES = 4  # needles of multikey / multivalue / multiquery (RULER's default)
HOPS = 4  # vt: names bound after the first one

ADJECTIVES = ("ancient", "bitter", "bright", "calm", "clever", "curious", "damp", "eager", "fancy", "fierce",
              "gentle", "glossy", "hollow", "humble", "icy", "jolly", "keen", "lively", "lucky", "misty",
              "noisy", "odd", "pale", "proud", "quiet", "rapid", "rusty", "shy", "silent", "sleepy",
              "smooth", "steady", "tame", "tidy", "vast", "wakeful", "wary", "witty", "young", "zealous")
NOUNS = ("anchor", "badger", "banjo", "basket", "beacon", "bucket", "cactus", "candle", "canoe", "crayon",
         "dolphin", "falcon", "fiddle", "garden", "harbor", "helmet", "island", "kettle", "ladder", "lantern",
         "magnet", "meadow", "mitten", "needle", "orchard", "otter", "parrot", "pebble", "pillow", "quarry",
         "rocket", "saddle", "spider", "teapot", "thimble", "tunnel", "violin", "walrus", "wizard", "zipper")


@dataclass(frozen=True)
class Prompt:
    """How text becomes a prompt: plain, or wrapped in the model's chat template."""

    before: str = ""  # template text before the user's message
    after: str = ""  # template text between the user's message and the answer
    bos: tuple[int, ...] = ()


def make_prompt(tok, chat_template: bool) -> Prompt:
    """The chat template's text around one user message (as a user of an instruct model would
    send it), or a plain prompt for base models."""
    bos = (tok.bos_token_id,) if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else ()
    if not chat_template:
        return Prompt(bos=bos)
    if not getattr(tok, "chat_template", None):
        raise UserError("the tokenizer has no chat template; use --no-chat-template for a base model")
    mark = "\x00MESSAGE\x00"
    text = tok.apply_chat_template([{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True)
    before, _, after = text.partition(mark)
    # the template writes its own BOS where the model wants one
    return Prompt(before=before, after=after)


@dataclass
class RetrievalCase:
    """One trial: needles at stream places, a question; ids = intro + haystack + question."""

    task: str
    length: int
    depth: int
    trial: int
    key: str  # the queried key(s), for the report
    expected: list[str]
    inserts: list[tuple[int, list[int]]]  # (stream index, needle ids), ascending
    question: list[int] = field(repr=False)
    hay_len: int = 0  # stream tokens, needles excluded
    # the question and the answer's start without the chat template (camelot-question reads it first)
    asked: list[int] = field(default_factory=list, repr=False)

    @property
    def needle_at(self) -> int:
        return self.inserts[0][0]

    def suffix(self, hay: Haystack) -> list[int]:
        out, pos = [], self.needle_at
        for at, ids in self.inserts:
            out += hay.stream[pos:at] + ids
            pos = at
        return out + hay.stream[pos : self.hay_len] + self.question

    def ids(self, hay: Haystack) -> list[int]:
        return hay.intro + hay.stream[: self.needle_at] + self.suffix(hay)


def score(answer: str, expected: list[str]) -> float:
    """RULER's string_match_all: the fraction of expected strings found in the answer."""
    low = answer.lower()
    return sum(e.lower() in low for e in expected) / len(expected)


# ---------------------------------------------------------------------------- task texts
def _kind(task: str) -> str:
    return {"niah_word": "word", "niah_uuid": "uuid"}.get(task, "number")


def _noun(kind: str, plural: bool = False) -> str:
    return {"number": "numbers", "word": "words", "uuid": "uuids"}[kind] if plural else kind


def _value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128)))


def intro_text(task: str) -> str:
    if task == "vt":
        return "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    noun = _noun(_kind(task), plural=True)
    return (f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {noun} afterwards.\n")


def _needle(kind: str, key: str, value: str) -> str:
    return f" One of the special magic {_noun(kind, plural=True)} for {key} is: {value}."


def _draw(task: str, rng: random.Random) -> tuple[list[str], str, str, list[str], str]:
    """(needle texts in insertion order, question, answer start, expected, queried key)."""
    kind = _kind(task)
    keys = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], NEEDLES)
    if task.startswith("niah_"):
        value = _value(rng, kind)
        return ([_needle(kind, keys[0], value)],
                f"What is the special magic {kind} for {keys[0]} mentioned in the provided text?",
                f" The special magic {kind} for {keys[0]} mentioned in the provided text is", [value], keys[0])
    if task == "multikey":
        values = [_value(rng, kind) for _ in keys]
        return ([_needle(kind, k, v) for k, v in zip(keys, values)],
                f"What is the special magic number for {keys[0]} mentioned in the provided text?",
                f" The special magic number for {keys[0]} mentioned in the provided text is", [values[0]], keys[0])
    if task == "multivalue":
        values = [_value(rng, kind) for _ in keys]
        return ([_needle(kind, keys[0], v) for v in values],
                f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?",
                f" The special magic numbers for {keys[0]} mentioned in the provided text are", values, keys[0])
    if task == "multiquery":
        values = [_value(rng, kind) for _ in keys]
        asked = ", ".join(keys[:-1]) + f", and {keys[-1]}"
        return ([_needle(kind, k, v) for k, v in zip(keys, values)],
                f"What are all the special magic numbers for {asked} mentioned in the provided text?",
                f" The special magic numbers for {asked} mentioned in the provided text are", values, ",".join(keys))
    if task == "vt":
        value = str(rng.randint(10_000, 99_999))
        names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(HOPS + 1)]
        chain = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return (chain, f"Question: Find all variables that are assigned the value {value} in the text above.",
                f" Answer: According to the chain(s) of variables assignment in the text above, {len(names)} "
                f"variables are assigned the value {value}, they are:", names, value)
    raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


# ---------------------------------------------------------------------------- cases
def task_haystack(base: Haystack, task: str, prompt: Prompt) -> Haystack:
    """The shared stream with this task's instruction in front (one haystack per task: the
    instruction is part of every case's shared prefix)."""
    tok = base.tokenizer
    return replace(base, intro=list(prompt.bos) + _ids(tok, prompt.before + intro_text(task)), question=[])


def make_cases(hay: Haystack, task: str, prompt: Prompt, lengths: list[int], depths: list[int], trials: int,
               max_new_tokens: int, seed: int = 0) -> list[RetrievalCase]:
    """Cases of one task for every length x depth x trial; lengths count the answer tokens."""
    tok, cases = hay.tokenizer, []
    for n in lengths:
        for d in depths:
            for t in range(trials):
                rng = random.Random(f"{seed}:{task}:{n}:{d}:{t}")
                needles, question, answer, expected, key = _draw(task, rng)
                needle_ids = [_ids(tok, x) for x in needles]
                # in a chat the answer starts the assistant's turn (no leading space)
                q = _ids(tok, "\n" + question + prompt.after + (answer.lstrip() if prompt.after else answer))
                fixed = len(hay.intro) + sum(map(len, needle_ids)) + len(q) + max_new_tokens
                hay_len = haystack_room(hay, n, fixed, f"{task}'s instruction, needles, question and answer")
                places = _places(rng, task, d, hay_len, len(needle_ids), hay)
                if task == "vt":  # the chain in reading order, its first link at the depth
                    inserts = list(zip(sorted(places), needle_ids))
                else:  # the first needle (the asked one) at the depth; sorting keeps ties in order
                    inserts = sorted(zip(places, needle_ids), key=lambda p: p[0])
                asked = _ids(tok, question + " " + answer.lstrip())
                cases.append(RetrievalCase(task, n, d, t, key, expected, inserts, q, hay_len, asked))
    return cases


def _places(rng: random.Random, task: str, depth: int, hay_len: int, count: int, hay: Haystack) -> list[int]:
    """Stream places (sentence ends) for `count` needles: the first at `depth`; the others after
    it for vt (a chain is read in order), anywhere for the rest. Several needles may share a
    place; they then follow each other in their drawn order."""
    first = round(depth / 100 * hay_len)
    lo = first if task == "vt" else 0
    targets = [first] + [rng.randint(lo, hay_len) for _ in range(count - 1)]
    return [sentence_end(hay, x, hay_len) for x in targets]

