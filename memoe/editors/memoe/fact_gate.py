"""The fact gate: MEMoE's adapter acts on a row only where its prompt asks for an edited *fact*, not
merely names an edited *subject*.

The anchor finds the subject ("Laos"); the gate asks whether the question around it reads as one of
that subject's edit prompts ("What is the capital of Laos?") rather than as one of the subject's other
relations ("The currency of Laos is the"). Each text is described by the frozen model's own hidden
states at a few layers below the adapter (``layers``): at each position, the state of that token and
the mean of the states so far of the sentence holding the subject (``sentence``; the row's first token,
the attention sink, and the subject's own tokens left out), each normalised, concatenated, centred and
normalised again. For every edited subject the gate keeps

- *keys*: that description at the last token of each of the subject's edit prompts, in the forms the
  editor trains (as written, subject lower-cased, inside the chat template);
- *negatives*: the same for the subject with ``negatives`` other relations (``memoe.probes
  .SCOPE_RELATIONS``, never a relation the subject's edits edit and never an evaluation probe's), each also
  in the two shapes edit prompts most often take ("The R of S is", "What is the R of S?":
  ``SCOPE_SHAPED``), so that a prompt does not pass for having the edit prompt's shape.

At position t of a row naming subject s, ``margin(t) = max_k cos(v_t, key) - max_n cos(v_t, neg)``;
the gate opens at the first position at or after the anchor's last token where the margin exceeds
``margin`` and stays open for the rest of the row (its target tokens, the decode steps of a KV cache).
The decision is relative to the subject's own other relations, so no global threshold has to hold
for every subject; the states are the frozen model's, so the gate needs no training and costs one
short forward per key at edit time (keys and negatives: 2 x layers x hidden floats each, stored in
float16).

Written by hand: no library gates an adapter on a nearest-prototype test over the base model's states.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

from memoe.anchors import anchor_tokens, gold_anchor
from memoe.models import decoder_layers
from memoe.probes import chat_prompt, restyle, scope_negatives, scope_shaped


class _Stop(Exception):
    pass


class FactGate:
    def __init__(
        self,
        model,
        tokenizer,
        layers: Sequence[int],
        margin: float,
        negatives: int,
        wanted: Callable[[], bool],
        chat: bool = True,
        sentence: bool = False,
    ):
        n = len(decoder_layers(model))
        self.model, self.tokenizer = model, tokenizer
        self.layers = sorted({int(l) % n for l in layers})
        self.margin = float(margin)
        self.negatives = int(negatives)
        self.chat = chat
        self.sentence = sentence
        self.mu: torch.Tensor | None = None  # (F,) the centre, fixed by the first edits
        self.keys: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # subject -> (keys, negatives) float16
        self._f32: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._states: dict[int, torch.Tensor] = {}  # the current call's hidden states at the gate layers
        self._run: tuple | None = None  # (sums (B, L, d), counts (B,), open (B,)) carried over decode steps
        self.capturing = False
        self.wanted = wanted  # whether a forward's routing context asks for the gate (its states kept)
        self._mask: torch.Tensor | None = None  # this call's gate, shared by every adapter layer
        self._handles = [
            decoder_layers(model)[l].register_forward_pre_hook(self._keep(l), with_kwargs=True) for l in self.layers
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _keep(self, layer: int):
        def hook(module, args, kwargs):
            if self.capturing or self.wanted():
                if layer == self.layers[0]:
                    self._states, self._mask = {}, None
                self._states[layer] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    # ------------------------------------------------------------------ descriptions
    def vectors(self, states: dict[int, torch.Tensor], real: torch.Tensor, skip: torch.Tensor, carry=None):
        """(B, T, F) descriptions at every position of a call, and the running sums to carry on.
        ``real`` (B, T): the call's real tokens; ``skip`` (B, T): tokens left out of the mean (the row's
        first real token, the attention sink, the subject's own tokens and any sentence before the
        subject's: the mean describes the question around the subject); ``carry``: the sums and counts
        of earlier calls (decode steps)."""
        B, T = real.shape
        w = (real & ~skip).float()
        parts, sums = [], []
        cnt0 = carry[1] if carry is not None else torch.zeros(B, device=real.device)
        cnt = cnt0[:, None] + w.cumsum(1)
        for i, l in enumerate(self.layers):
            h = states[l].float()
            s = (carry[0][:, i] if carry is not None else torch.zeros_like(h[:, 0]))[:, None] + (
                h * w[..., None]
            ).cumsum(1)
            mean = torch.where(cnt[..., None] > 0, s / cnt.clamp(min=1)[..., None], h)
            parts += [torch.nn.functional.normalize(h, dim=-1), torch.nn.functional.normalize(mean, dim=-1)]
            sums.append(s[:, -1])
        v = torch.cat(parts, -1)
        if self.mu is not None:  # centred and normalised (before the centre exists: the raw concatenation)
            v = torch.nn.functional.normalize(v - self.mu.to(v.device), dim=-1)
        return v, (torch.stack(sums, 1), cnt[:, -1])

    def spans(self, texts: Sequence[str], subjects: Sequence[str]) -> list[tuple[int, int, int]]:
        """Each text's subject tokens (first, last) in ``tokenizer(text)`` and the first token of their
        sentence (``begin``); (0, 0, 0) where the subject is absent."""
        out = []
        for t, s in zip(texts, subjects):
            first, last = anchor_tokens(self.tokenizer, t, gold_anchor(t, s))
            out.append((first, last, self.text_begin(t, first)))
        return out

    def text_begin(self, text: str, first: int) -> int:
        """``begin`` for a text (tokenized only when ``sentence`` asks for it)."""
        return self.begin(self.tokenizer(text).input_ids, first) if self.sentence else 0

    def begin(self, ids: Sequence[int], first: int) -> int:
        """The first token of the sentence holding token ``first`` (the subject's): the one after the
        last earlier token that ends a sentence (its text ends in . ! or ? or holds a line break); 0 where
        none does, or without ``sentence``. Tokens, not characters, so that a row known only by its ids
        (a plain forward) gets the same answer as its text."""
        if not self.sentence:
            return 0
        for j in range(first - 1, -1, -1):
            piece = self.tokenizer.decode([int(ids[j])])
            if "\n" in piece or piece.rstrip().endswith((".", "!", "?")):
                return j + 1
        return 0

    @staticmethod
    def skip_mask(full: torch.Tensor, spans: Sequence[tuple[int, int, int]], past: int, T: int) -> torch.Tensor:
        """(B, T) tokens of this call left out of the mean: each row's first real token, its subject's
        tokens and those before the subject's sentence (``spans``: (first, last, begin), indices of the
        row's real tokens; ``full`` is the (B, past + T) attention mask)."""
        pad = (~full).long().cumprod(1).sum(1)
        first = full & (full.long().cumsum(1) == 1)
        pos = torch.arange(full.shape[1], device=full.device)[None, :] - pad[:, None]  # index in the real row
        lo = torch.tensor([a for a, _, _ in spans], device=full.device)[:, None]
        hi = torch.tensor([b for _, b, _ in spans], device=full.device)[:, None]
        start = torch.tensor([c for _, _, c in spans], device=full.device)[:, None]
        subj = (pos >= lo) & (pos <= hi) & (hi > 0)
        return (first | subj | (pos < start))[:, past : past + T]

    @torch.no_grad()
    def _forward(self, texts: Sequence[str]):
        """``texts`` right-padded through the layers up to the top gate layer (its input kept, nothing
        above it run); the states are left in ``_states``. Returns the encoding."""
        tok, dev = self.tokenizer, next(self.model.parameters()).device
        side = tok.padding_side
        tok.padding_side = "right"
        try:
            enc = tok(list(texts), return_tensors="pt", padding=True).to(dev)
        finally:
            tok.padding_side = side

        def stop(module, args, kwargs):
            raise _Stop

        self._states, self._mask, self.capturing = {}, None, True
        h = decoder_layers(self.model)[self.layers[-1]].register_forward_pre_hook(stop, with_kwargs=True)
        try:  # registered after the gate's own hook on that layer, so its input is kept first
            self.model.base_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
            self.capturing = False
        return enc

    @torch.no_grad()
    def describe(self, texts: Sequence[str], subjects: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N, F) descriptions of whole texts (at their last token), the model's adapter silent."""
        out = []
        for i in range(0, len(texts), batch_size):
            chunk, subj = list(texts[i : i + batch_size]), list(subjects[i : i + batch_size])
            enc = self._forward(chunk)
            real = enc.attention_mask.bool()
            v, _ = self.vectors(self._states, real, self.skip_mask(real, self.spans(chunk, subj), 0, real.shape[1]))
            out.append(v[torch.arange(v.shape[0]), real.long().sum(1) - 1])
        self._states = {}
        return torch.cat(out) if out else torch.zeros(0)

    # ------------------------------------------------------------------ keys
    def forms(self, prompt: str, subject: str) -> list[str]:
        out = [prompt, restyle(prompt, subject, 0)]
        c = chat_prompt(self.tokenizer, prompt) if self.chat else None
        return out + ([c] if c else [])

    def update(self, prompts_by_subject: dict[str, list[str]], salt: str = "") -> None:
        """(Re)build the keys and negatives of these subjects from all their edit prompts in force."""
        texts, subjects, owners = [], [], []
        for subj, prompts in prompts_by_subject.items():
            pos = [f for p in prompts for f in self.forms(p, subj)]
            joined = " ".join(prompts)
            neg = scope_negatives(joined, subj, self.negatives, salt=salt)
            neg += scope_shaped(joined, subj, 2 * self.negatives, salt=salt)
            neg = neg + [c for c in (chat_prompt(self.tokenizer, q) for q in neg) if c] if self.chat else neg
            texts += pos + neg
            subjects += [subj] * (len(pos) + len(neg))
            owners += [(subj, 1)] * len(pos) + [(subj, 0)] * len(neg)
        if not texts:
            return
        if self.mu is None:  # the centre: the mean raw description of the first edits and their negatives
            raw = self.describe(texts, subjects)
            self.mu = raw.mean(0)
            v = torch.nn.functional.normalize(raw - self.mu, dim=-1)
        else:
            v = self.describe(texts, subjects)
        for subj in prompts_by_subject:
            kp = [v[i] for i, o in enumerate(owners) if o == (subj, 1)]
            kn = [v[i] for i, o in enumerate(owners) if o == (subj, 0)]
            self.keys[subj] = (torch.stack(kp).half().cpu(), (torch.stack(kn) if kn else v[:0]).half().cpu())
            self._f32.pop(subj, None)

    @staticmethod
    def _margin(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """(T,) how much closer each position reads to the subject's edit prompts than to its other relations."""
        return pos.max(-1).values - (neg.max(-1).values if neg.shape[-1] else -1.0)

    def _subject(self, subj: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._f32.get(subj)
        if hit is None or hit[0].device != device:
            k, n = self.keys[subj]
            hit = self._f32[subj] = (k.to(device).float(), n.to(device).float())
        return hit

    # ------------------------------------------------------------------ the gate
    def open_mask(
        self,
        rows: Sequence[tuple[str, int, int, int] | None],
        attention_mask: torch.Tensor | None,
        past: int,
        B: int,
        T: int,
        device,
    ) -> torch.Tensor:
        """(B, T) bool: where the gate is open in this call (after the states were captured)."""
        if self._mask is not None and tuple(self._mask.shape) == (B, T):
            return self._mask  # a second adapter layer in the same call
        if set(self._states) != set(self.layers) or self._states[self.layers[0]].shape[:2] != (B, T):
            raise RuntimeError("fact gate: no hidden states captured for this call (the gate layers did not run)")
        am = attention_mask if attention_mask is not None and attention_mask.shape[0] == B else None
        full = am.bool() if am is not None and am.shape[1] >= past + T else torch.ones(B, past + T, dtype=torch.bool)
        full = full.to(device)
        real = full[:, past : past + T]
        spans = [(r[1], r[2], r[3]) if r is not None else (0, 0, 0) for r in rows]
        skip = self.skip_mask(full, spans, past, T)
        carry = self._run if past > 0 and self._run is not None and self._run[0].shape[0] == B else None
        v, (sums, cnt) = self.vectors(self._states, real, skip, carry[:2] if carry else None)
        pad = (~full).long().cumprod(1).sum(1)
        pos = past + torch.arange(T, device=device)[None, :]
        begin = pad + torch.tensor([b for _, b, _ in spans], device=device)  # from the subject's last token on
        ok = torch.zeros(B, T, dtype=torch.bool, device=device)
        for b, row in enumerate(rows):
            subj = row[0] if row is not None else None
            if subj is None or subj not in self.keys:
                continue
            k, n = self._subject(subj, device)
            m = self._margin(v[b] @ k.T, v[b] @ n.T)
            ok[b] = m > self.margin
        ok = ok & real & (pos >= begin[:, None])
        opened = ok.long().cummax(1).values.bool()
        if carry is not None:
            opened = opened | carry[2][:, None]
        self._run = (sums, cnt, opened[:, -1])
        self._mask = opened
        return opened

    @torch.no_grad()
    def open_from(self, texts: Sequence[str], subjects: Sequence[str], batch_size: int = 32) -> list[int | None]:
        """The first position (in ``tokenizer(text)``) where the gate opens on each whole text, or None."""
        out: list[int | None] = []
        for i in range(0, len(texts), batch_size):
            chunk, subj = list(texts[i : i + batch_size]), list(subjects[i : i + batch_size])
            enc = self._forward(chunk)
            B, T = enc.input_ids.shape
            rows = [(s, *span) for s, span in zip(subj, self.spans(chunk, subj))]
            mask = self.open_mask(rows, enc.attention_mask, 0, B, T, enc.input_ids.device)
            out += [int(m.nonzero()[0]) if bool(m.any()) else None for m in mask]
        self._run, self._mask, self._states = None, None, {}
        return out

    def digest(self, subject: str) -> str:
        """What the gate's decisions on rows of ``subject`` depend on: its settings, the centre, the
        subject's keys (``MEMoEEditor.row_versions``)."""
        h = hashlib.sha1(repr((self.layers, self.margin, self.negatives, self.chat, self.sentence)).encode())
        for t in ([] if self.mu is None else [self.mu]) + list(self.keys.get(subject, ())):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        subjects = sorted(self.keys)
        if self.mu is None:
            return {}, []
        rows, sign, owner = [], [], []
        for i, s in enumerate(subjects):
            k, n = self.keys[s]
            rows += [k, n]
            sign += [1] * len(k) + [0] * len(n)
            owner += [i] * (len(k) + len(n))
        return {
            "fact_gate.mu": self.mu.float().cpu(),
            "fact_gate.keys": torch.cat(rows),
            "fact_gate.sign": torch.tensor(sign, dtype=torch.int8),
            "fact_gate.owner": torch.tensor(owner, dtype=torch.int32),
        }, subjects

    def load_state_dict(self, state: dict[str, torch.Tensor], subjects: list[str]) -> None:
        self.keys, self._f32 = {}, {}
        if "fact_gate.mu" not in state:
            self.mu = None
            return
        self.mu = state["fact_gate.mu"].float()
        keys, sign, owner = state["fact_gate.keys"], state["fact_gate.sign"].bool(), state["fact_gate.owner"].long()
        for i, s in enumerate(subjects):
            mine = owner == i
            self.keys[s] = (keys[mine & sign], keys[mine & ~sign])
