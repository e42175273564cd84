"""Hard probes any edit dataset gets, built from each record's own fields (no extra data needed).

The standard benchmarks are easy in known ways: ZsRE's locality prompts are unrelated questions,
CounterFact's neighbours are other subjects, and rephrases keep the subject's exact string. These
probes test what users run into:

- **subject specificity** (``specificity_prompts``): the edited *subject* with *other relations*
  ("The currency of Laos is" after an edit of Laos's capital). Scored like locality, against the
  unedited model's own prediction, so no ground truth is needed.
- **restyled rephrases** (``restyled_prompts``): a rephrase with the subject lower-cased, upper-cased,
  or after an unrelated sentence. Scored like generality (the new target).
- **chat-template rephrases** (``chat_prompts``): a rephrase inside the tokenizer's chat template (an
  instruct model used as a chat assistant). Scored like generality.

The relation templates come in two disjoint sets: ``PROBE_RELATIONS`` build the evaluation probes and
``SCOPE_RELATIONS`` the training negatives of scoped editors (memoe/editors/memoe/editor.py ``scope``). No
relation and no template is in both, so a method trained to leave the ``SCOPE_RELATIONS`` of a subject
alone is scored on relations it never saw. A template whose relation words occur in the edit prompt
(the edited relation itself) is never used for that edit.

This module knows nothing about models beyond a tokenizer's chat template.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import polars as pl

# (relation words: any of them in the edit prompt excludes the template, template with {} = subject)
PROBE_RELATIONS: list[tuple[tuple[str, ...], str]] = [
    (("currency", "money"), "The currency of {} is the"),
    (("continent",), "{} is located on the continent of"),
    (("language", "speak", "spoken", "tongue"), "The official language of {} is"),
    (
        ("religion", "faith", "religious", "follower", "follows", "believer"),
        "What religion is most associated with {}?",
    ),
    (("founded", "established", "formed", "founder", "inception"), "{} was founded in the year"),
    (("population", "inhabitants"), "What is the population of {}?"),
    (("known", "famous"), "{} is best known for"),
    (("name", "named", "called"), "The name {} comes from"),
    (("country", "nation", "citizen", "nationality"), "Which country is {} associated with?"),
    (("occupation", "profession", "job", "work", "career"), "What is the profession of {}?"),
    (("headquarters", "headquartered", "based", "hq"), "Where are the headquarters of {}?"),
    (("color", "colour"), "The main color associated with {} is"),
    (("year", "date", "when"), "In what year did {} first become well known?"),
    (("wrote", "written", "author", "book"), "A famous book about {} was written by"),
]

SCOPE_RELATIONS: list[tuple[tuple[str, ...], str]] = [
    (("capital",), "The capital city of {} is"),
    (("born", "birth", "birthplace"), "{} was born in the city of"),
    (("died", "death", "die"), "Where did {} die?"),
    (("employer", "employed", "works", "work", "company"), "Who is the employer of {}?"),
    (("field", "discipline", "area"), "{} works in the field of"),
    (
        ("manufacturer", "manufactured", "made", "produced", "product", "makes", "produces", "company"),
        "Which company manufactures {}?",
    ),
    (("developed", "developer", "created", "creator", "designed"), "{} was developed by"),
    (("owned", "owner", "owns"), "Who owns {}?"),
    (("located", "location", "where", "place", "situated", "city", "region", "state"), "{} is located in"),
    (("instrument", "play", "plays", "played"), "The instrument {} plays is the"),
    (("network", "aired", "broadcast", "premiered", "channel"), "{} originally aired on"),
    (("label", "record", "records", "signed"), "{} is signed to the record label"),
    (("member", "belongs", "part", "affiliated"), "{} is a member of"),
    (("position", "role", "office", "title"), "What position does {} hold?"),
    (("genre", "style", "type", "kind"), "What genre is {}?"),
    (("sport", "team", "club", "league"), "Which sport is {} associated with?"),
    (
        ("mother", "father", "parent", "spouse", "wife", "husband", "child", "sibling", "family", "dad", "mom"),
        "Who is the father of {}?",
    ),
    (("award", "prize", "won", "win"), "Which award did {} receive?"),
]

# the same relations as SCOPE_RELATIONS (the same relation words) in the two shapes edit prompts take most
# often, "The R of S is" and "What is the R of S?": the fact gate compares a prompt with its subject's other
# relations in these shapes too, so a prompt is not taken for an edit's because it has the edit prompt's shape
_SCOPE_NOUNS = [
    "capital city", "birthplace", "place of death", "employer", "field", "manufacturer", "developer",
    "owner", "location", "instrument", "original network", "record label", "organisation", "position", "genre",
    "sport", "father", "award",
]  # fmt: skip
SCOPE_SHAPED: list[tuple[tuple[str, ...], str]] = [
    (keys, shape.format(noun, "{}"))
    for (keys, _), noun in zip(SCOPE_RELATIONS, _SCOPE_NOUNS, strict=True)
    for shape in ("The {} of {} is", "What is the {} of {}?")
]

# unrelated sentences put before a question (CounterFact's paraphrases do the same)
PREAMBLES = [
    "The weather was mild that spring.",
    "Here is a question from a quiz.",
    "My cousin asked me this yesterday.",
    "Answer briefly.",
]

_WORD = re.compile(r"[a-z]+")


def _seed(*parts: str) -> int:
    return int(hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:8], 16)


def relation_templates(
    prompt: str, subject: str, catalogue: Sequence[tuple[tuple[str, ...], str]], n: int, salt: str = ""
) -> list[str]:
    """``n`` templates of ``catalogue`` applied to ``subject``, none of whose relation words occur in the
    edit prompt (outside the subject); a fixed choice per (prompt, subject, salt)."""
    rest = prompt.lower().replace(subject.lower(), " ")
    words = set(_WORD.findall(rest))
    ok = [t for keys, t in catalogue if not any(k in words for k in keys)]
    if not ok or n <= 0:
        return []
    start = _seed(prompt, subject, salt) % len(ok)
    picked = [ok[(start + i) % len(ok)] for i in range(min(n, len(ok)))]
    return [t.format(subject) for t in picked]


def restyle(text: str, subject: str, k: int) -> str:
    """Variant ``k`` of a prompt: 0 subject lower-cased, 1 subject upper-cased, 2 after an unrelated
    sentence (the subject's exact string kept)."""
    style = k % 3
    if style == 2:
        return f"{PREAMBLES[(k // 3) % len(PREAMBLES)]} {text}"
    i = text.lower().find(subject.lower())
    if i < 0:  # subject not in the text: the whole text restyled
        return text.lower() if style == 0 else text.upper()
    s = text[i : i + len(subject)]
    return text[:i] + (s.lower() if style == 0 else s.upper()) + text[i + len(subject) :]


def chat_prompt(tokenizer, question: str) -> str | None:
    """``question`` as the user turn of the tokenizer's chat template, ready for the assistant's answer;
    None when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


PROBE_COLUMNS = ("specificity_prompts", "restyled_prompts", "chat_prompts")


def add_probes(df: pl.DataFrame, tokenizer=None, *, n_specificity: int = 3, n_restyled: int = 3) -> pl.DataFrame:
    """The probe columns for every record (replacing any already there): ``specificity_prompts`` (the
    subject with ``n_specificity`` other relations), ``restyled_prompts`` (``n_restyled`` restyled forms
    of the first rephrase, or of the prompt when there is none) and ``chat_prompts`` (the first rephrase
    in the tokenizer's chat template; empty without one)."""
    spec, rest, chat = [], [], []
    for r in df.iter_rows(named=True):
        subj, prompt = r["subject"], r["prompt"]
        base = (r.get("rephrase_prompts") or [prompt])[0]
        spec.append(relation_templates(prompt, subj, PROBE_RELATIONS, n_specificity, salt=r["id"]))
        rest.append([restyle(base, subj, k) for k in range(n_restyled)])
        c = chat_prompt(tokenizer, base) if tokenizer is not None else None
        chat.append([c] if c else [])
    cols = {"specificity_prompts": spec, "restyled_prompts": rest, "chat_prompts": chat}
    return df.with_columns([pl.Series(k, v, dtype=pl.List(pl.String)) for k, v in cols.items()])


def scope_negatives(prompt: str, subject: str, n: int, salt: str = "") -> list[str]:
    """Training negatives for one edit: its subject with ``n`` relations of ``SCOPE_RELATIONS`` (never
    the edited relation, never a probe relation)."""
    return relation_templates(prompt, subject, SCOPE_RELATIONS, n, salt=salt)


def scope_shaped(prompt: str, subject: str, n: int, salt: str = "") -> list[str]:
    """``n`` of the subject's other relations in the edit prompts' common shapes (``SCOPE_SHAPED``)."""
    return relation_templates(prompt, subject, SCOPE_SHAPED, n, salt=salt)
