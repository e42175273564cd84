"""Knowledge anchors: which named entity an input asks about, and its embedding.

An edit's anchor is its gold subject. Any other text (rephrases, locality prompts, free prompts)
goes through :class:`AnchorExtractor`:

1. **known subjects** - the longest occurrence of a subject the editor has edited, matched on
   word sequences after lower-casing, Unicode accent folding and dropping punctuation, so
   ``"the eiffel tower's height"`` matches the subject ``"Eiffel Tower"``;
2. **named-entity fallback** - spaCy is not used (no English model installs from PyPI cleanly),
   so a documented heuristic: the longest run of capitalised words (connectors such as "of",
   "de", "von" allowed inside a run; a sentence-initial function word such as "What" or "The" is
   not a name on its own);
3. **no anchor** - neither found: ``Anchor(text=None)``. The adapter treats this input as having
   no knowledge anchor (silent in ``gate_mode=anchor``, zero anchor vector in ``always``).

Only a known-subject match has ``known=True``; the adapter's anchor gate fires on those.
This module knows nothing about the editor.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

_WORD = re.compile(r"\w+", re.UNICODE)


def _fold(s: str) -> str:
    s = unicodedata.normalize("NFKD", s)
    return "".join(c for c in s if not unicodedata.combining(c)).lower()


def words(text: str) -> list[tuple[str, int, int]]:
    """Normalised words of ``text`` with their character spans in the original text."""
    # spans index the folded text; they equal the original's unless folding changed lengths
    # (ligatures, decomposed accents), where they are approximate
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(_fold(text))]


def normalise_subject(s: str) -> str:
    return " ".join(w for w, _, _ in words(s))


@dataclass(frozen=True)
class Anchor:
    text: str | None  # canonical anchor text (a known subject as given at edit time), None: no anchor
    start: int = -1  # character span of the match in the input
    end: int = -1
    known: bool = False  # True only for a match of a known (edited) subject
    source: str = "none"  # "gold" | "known" | "ner" | "none"

    @property
    def found(self) -> bool:
        return self.text is not None


NO_ANCHOR = Anchor(None)

# words that start sentences and questions but are not names
_FUNCTION = {
    "a",
    "an",
    "the",
    "what",
    "which",
    "who",
    "whom",
    "whose",
    "when",
    "where",
    "why",
    "how",
    "is",
    "are",
    "was",
    "were",
    "do",
    "does",
    "did",
    "in",
    "on",
    "at",
    "of",
    "for",
    "to",
    "from",
    "by",
    "with",
    "and",
    "or",
    "but",
    "if",
    "it",
    "its",
    "this",
    "that",
    "these",
    "those",
    "there",
    "he",
    "she",
    "they",
    "we",
    "i",
    "you",
    "my",
    "his",
    "her",
    "their",
    "our",
    "nq",
    "question",
    "can",
    "could",
    "would",
    "should",
    "will",
    "has",
    "have",
    "had",
    "name",
    "tell",
    "as",
    "after",
    "before",
    "during",
    "since",
}
_CONNECT = {
    "of",
    "de",
    "von",
    "van",
    "der",
    "den",
    "la",
    "le",
    "du",
    "da",
    "di",
    "del",
    "the",
    "and",
    "&",
    "y",
    "bin",
    "al",
}
_TOKEN = re.compile(r"[\w'&.-]+", re.UNICODE)


def capitalised_span(text: str) -> Anchor:
    """Heuristic named entity: the longest run of capitalised words (or words with digits inside a
    run), connectors allowed inside; a lone sentence-initial function word does not count."""
    toks = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]
    best: tuple[int, int, int] | None = None  # (n_words, start_idx, end_idx)
    i = 0
    n = len(toks)
    while i < n:
        w = toks[i][0].strip(".-'")
        if w and (w[0].isupper() or (w[0].isdigit() and i > 0)) and w.lower() not in _FUNCTION:
            j = i + 1
            last = i
            while j < n:
                wj = toks[j][0].strip(".-'")
                if wj and (wj[0].isupper() or wj[0].isdigit()):
                    last = j
                elif wj.lower() in _CONNECT and j + 1 < n and toks[j + 1][0][:1].isupper():
                    pass
                else:
                    break
                j += 1
            size = last - i + 1
            if best is None or size > best[0]:
                best = (size, i, last)
            i = last + 1
        else:
            i += 1
    if best is None:
        return NO_ANCHOR
    _, a, b = best
    s, e = toks[a][1], toks[b][2]
    span = text[s:e].strip(".-'")
    if not span or len(span) < 2:
        return NO_ANCHOR
    return Anchor(span, s, s + len(span), known=False, source="ner")


class AnchorExtractor:
    """Longest known-subject match, then the named-entity heuristic, then no anchor."""

    def __init__(self, subjects: Iterable[str] = (), ner: bool = True, min_chars: int = 2):
        self.ner = ner
        self.min_chars = min_chars
        self._index: dict[str, str] = {}  # normalised -> canonical subject
        self._max_words = 0
        self.add(subjects)

    def add(self, subjects: Iterable[str]) -> None:
        for s in subjects:
            if s is None:
                continue
            key = normalise_subject(s)
            if len(key.replace(" ", "")) < self.min_chars:
                continue
            self._index.setdefault(key, s)
            self._max_words = max(self._max_words, len(key.split()))

    @property
    def subjects(self) -> list[str]:
        return list(self._index.values())

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, subject: str) -> bool:
        return normalise_subject(subject) in self._index

    def canonical(self, subject: str) -> str:
        return self._index.get(normalise_subject(subject), subject)

    def known(self, text: str) -> Anchor:
        ws = words(text)
        for n in range(min(self._max_words, len(ws)), 0, -1):
            # the rightmost match of the longest length: a question's subject usually follows
            # any preamble (CounterFact paraphrases start with an unrelated sentence)
            for i in range(len(ws) - n, -1, -1):
                key = " ".join(w for w, _, _ in ws[i : i + n])
                if key in self._index:
                    return Anchor(self._index[key], ws[i][1], ws[i + n - 1][2], known=True, source="known")
        return NO_ANCHOR

    def __call__(self, text: str) -> Anchor:
        a = self.known(text)
        if a.found:
            return a
        if self.ner:
            return capitalised_span(text)
        return NO_ANCHOR

    def extract_all(self, texts: Sequence[str]) -> list[Anchor]:
        return [self(t) for t in texts]


def gold_anchor(prompt: str, subject: str) -> Anchor:
    """An edit's own anchor: its gold subject (span located in the prompt when present)."""
    ws, sw = words(prompt), normalise_subject(subject).split()
    for i in range(len(ws) - len(sw), -1, -1):
        if [w for w, _, _ in ws[i : i + len(sw)]] == sw and sw:
            return Anchor(subject, ws[i][1], ws[i + len(sw) - 1][2], known=True, source="gold")
    return Anchor(subject, -1, -1, known=True, source="gold")


@torch.no_grad()
def anchor_embeddings(
    embedding: torch.nn.Module, tokenizer, anchors: Sequence[str | None], pooling: str = "mean"
) -> torch.Tensor:
    """(N, d) pooled frozen input embeddings of each anchor's tokens (``" " + anchor``, no special
    tokens); a zero vector for no anchor. ``pooling``: mean | last | sum."""
    w = embedding.weight
    out = torch.zeros(len(anchors), w.shape[1], dtype=w.dtype, device=w.device)
    cache: dict[str, torch.Tensor] = {}
    for i, a in enumerate(anchors):
        if not a:
            continue
        if a not in cache:
            ids = tokenizer(" " + a.strip(), add_special_tokens=False).input_ids
            if not ids:
                cache[a] = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device)
            else:
                e = w[torch.tensor(ids, device=w.device)]
                cache[a] = {"mean": e.mean(0), "last": e[-1], "sum": e.sum(0)}[pooling]
        out[i] = cache[a]
    return out


def anchor_tokens(tokenizer, text: str, anchor: Anchor) -> tuple[int, int]:
    """(first, last) indices (in ``tokenizer(text)`` with special tokens) of the tokens holding the
    anchor's first and last characters; (0, 0) when the anchor has no span in the text."""
    if anchor.end <= 0:
        return 0, 0
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizer: no offsets
        return 0, 0
    spans = [(j, s, e) for j, (s, e) in enumerate(enc["offset_mapping"]) if e > s]
    first = next((j for j, s, e in spans if e > anchor.start), 0)
    last = next((j for j, s, e in spans if e >= anchor.end), 0)
    return first, last


def anchor_end_token(tokenizer, text: str, anchor: Anchor) -> int:
    """Index (in ``tokenizer(text)`` with special tokens) of the token holding the anchor's last
    character; 0 when the anchor has no span in the text (then every position counts)."""
    return anchor_tokens(tokenizer, text, anchor)[1]
