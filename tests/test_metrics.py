"""The metrics of memoe/metrics.py on cases computed by hand (../shared/design/MEMOE.md, "Metrics").

The model is a bigram table: the logits of the next token depend only on the current token
(``TABLE[v]``), so every teacher-forced prediction, log-probability and greedy generation below is
known without running a network. The tokenizer is one token per word. No real model is loaded.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import polars as pl
import pytest
import torch

from memoe.data import SCHEMA
from memoe.metrics import (
    contains,
    evaluate,
    exact_match,
    generate,
    locality_predictions,
    mark_locality_conflicts,
    ngram_entropy,
    normalise,
    summarize,
    teacher_forced,
)

WORDS = ["<pad>", "<nl>"] + "a b c d e f g h p q r s t u v w x y z m n o".split()
V = len(WORDS)
ID = {w: i for i, w in enumerate(WORDS)}
HIGH = 5.0  # the logit of a token's successor; every other logit is 0 unless a case says otherwise


def lp_top(n_high: int = 1) -> float:
    """log-softmax of a logit HIGH in a row with ``n_high`` such logits and the rest 0."""
    return HIGH - math.log(n_high * math.exp(HIGH) + (V - n_high))


def lp_rest(n_high: int = 1) -> float:
    return -math.log(n_high * math.exp(HIGH) + (V - n_high))


class WordTokenizer:
    """One token per whitespace-separated word of WORDS (an unknown word is an error)."""

    pad_token_id = ID["<pad>"]
    padding_side = "right"

    def _ids(self, text: str) -> list[int]:
        return [ID[w] for w in text.split()]

    def __call__(self, text, add_special_tokens=True, return_tensors=None, padding=False):
        if isinstance(text, str):
            return SimpleNamespace(input_ids=self._ids(text))
        rows = [self._ids(t) for t in text]
        L = max(map(len, rows))
        ids = torch.full((len(rows), L), self.pad_token_id)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(L - len(r), L) if self.padding_side == "left" else slice(0, len(r))
            ids[i, sl], mask[i, sl] = torch.tensor(r), 1
        return Batch(input_ids=ids, attention_mask=mask)

    def batch_decode(self, ids, skip_special_tokens=False):
        words = {ID["<nl>"]: "\n"}
        return [
            "".join(
                " " + words.get(int(i), WORDS[int(i)])
                for i in row
                if not (skip_special_tokens and int(i) == self.pad_token_id)
            )
            for row in ids
        ]


class Batch(dict):
    __getattr__ = dict.__getitem__

    def to(self, device):
        return self


class Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding.from_pretrained(torch.eye(V))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=self.emb(input_ids))


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits after token v are ``table[v]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.base_model = Body()
        self.head = torch.nn.Linear(V, V, bias=False)
        self.head.weight.data = table.T.clone()  # one-hot(v) @ table = table[v]

    def get_output_embeddings(self):
        return self.head

    steps = 0  # decode steps taken, over all generate calls

    def generate(
        self, input_ids, attention_mask=None, max_new_tokens=1, do_sample=False, pad_token_id=None, stopping_criteria=()
    ):
        """Greedy; as in transformers, a row that a stopping criterion ends is padded from then on, and
        the batch stops once every row has ended."""
        out = input_ids
        done = torch.zeros(len(out), dtype=torch.bool)
        for _ in range(max_new_tokens):
            Bigram.steps += 1
            nxt = self.head(self.base_model(out[:, -1:]).last_hidden_state)[:, -1].argmax(-1, keepdim=True)
            nxt = torch.where(done[:, None], torch.full_like(nxt, pad_token_id or 0), nxt)
            out = torch.cat([out, nxt], 1)
            for c in stopping_criteria or ():
                done |= c(out, None)
            if bool(done.all()):
                break
        return out


def table(succ: dict[str, str], extra: dict[tuple[str, str], float] | None = None) -> torch.Tensor:
    """Logit HIGH for ``succ[v]`` after v (every other word: after it comes 'x'), plus ``extra`` logits."""
    t = torch.zeros(V, V)
    for w in WORDS:
        t[ID[w], ID[succ.get(w, "x")]] = HIGH
    for (a, b), val in (extra or {}).items():
        t[ID[a], ID[b]] = val
    return t


def frame(rows: list[dict]) -> pl.DataFrame:
    """Edit records (memoe.data.SCHEMA, empty lists where not given); other keys: probe columns (lists)."""
    schema = dict(SCHEMA) | {k: pl.List(pl.String) for r in rows for k in r if k not in SCHEMA}
    empty = {k: ([] if isinstance(v, pl.List) else None) for k, v in schema.items()}
    return pl.DataFrame([{**empty, "id": str(i), "subject": "a", **r} for i, r in enumerate(rows)], schema=schema)


TOK = WordTokenizer()


# ------------------------------------------------------------------ teacher forcing: the shared primitive


def test_teacher_forced_scores_each_target_position_on_the_token_before_it():
    """prompt 'a b', target 'c d': 'c' is predicted after 'b' (right: b -> c), 'd' after 'c' (wrong: c -> e);
    the log-prob is the mean of the two target tokens' log-softmax."""
    model = Bigram(table({"b": "c", "c": "e"}))
    r = teacher_forced(model, TOK, ["a b"], ["c d"])
    assert r.target == [[ID["c"], ID["d"]]]
    assert r.pred == [[ID["c"], ID["e"]]]
    assert r.acc() == [0.5]
    assert r.logprob[0] == pytest.approx((lp_top() + lp_rest()) / 2, abs=1e-6)


def test_teacher_forced_is_the_same_for_any_batching_and_order():
    """Rows of different lengths, padded in length buckets: each row's scores are its own."""
    model = Bigram(table({"b": "c", "c": "d", "z": "y", "q": "r"}))
    prompts, targets = ["a b", "s t u v w q", "z", "a b"], ["c d", "r", "y x", "d"]
    one = teacher_forced(model, TOK, prompts, targets, batch_size=1)
    many = teacher_forced(model, TOK, prompts, targets, batch_size=16)
    assert one.acc() == many.acc() == [1.0, 1.0, 1.0, 0.0]
    assert one.logprob == pytest.approx(many.logprob, abs=1e-6)
    assert many.pred[1] == [ID["r"]] and many.pred[3] == [ID["c"]]


def test_a_target_that_tokenises_to_nothing_is_an_error():
    with pytest.raises(ValueError, match="tokenises to nothing"):
        teacher_forced(Bigram(table({})), TOK, ["a b"], ["   "])


# ------------------------------------------------------------------ the per-edit columns of evaluate()

BASE = table({"b": "c", "q": "r", "r": "s", "v": "w", "n": "o", "z": "t"})
# the edit moved q's successor (q -> t); everything else as before
EDITED = table({"b": "c", "q": "t", "r": "s", "v": "w", "n": "o", "z": "t"})


def zsre_like() -> pl.DataFrame:
    return frame(
        [
            {
                "prompt": "a b",
                "target_new": "c",
                "rephrase_prompts": ["x b", "y z"],  # ends in b: c predicted (1.0); in z: t, not c (0.0)
                "locality_prompts": ["p q", "u v"],
                "locality_answers": ["r s", "w"],
                "portability_prompts": ["m n"],
                "portability_answers": ["o"],
            },
            {"prompt": "y z", "target_new": "c d"},  # z -> t: neither target token right; no other prompts
        ]
    )


def test_reliability_generality_locality_portability_by_hand():
    recs = zsre_like()
    base = locality_predictions(Bigram(BASE), TOK, recs)
    # unedited argmax at the locality answers' positions: after q -> r, after r -> s; after v -> w
    assert base["loc_base_pred"].to_list() == [[[ID["r"], ID["s"]], [ID["w"]]], []]
    t = evaluate(Bigram(EDITED), TOK, recs, base, generation=False)
    assert t["reliability"].to_list() == [1.0, 0.0]
    assert t["generality"].to_list() == [0.5, None]  # the mean of its rephrases; none: not scored
    # 'p q' -> 'r s': after q the edited model says t (base r), after r it says s (agrees): 0.5;
    # 'u v' -> 'w' agrees: 1.0; the record's locality is the mean over its prompts
    assert t["locality"].to_list() == [0.75, None]
    assert t["portability"].to_list() == [1.0, None]
    assert "efficacy" not in t.columns  # no true target: no probability comparison


def test_locality_is_agreement_with_the_unedited_model_not_the_data_answer():
    """A locality answer the unedited model does not predict still scores 1.0 when the edit leaves the
    prediction unchanged; without the unedited model's predictions it is not scored."""
    recs = frame([{"prompt": "a b", "target_new": "c", "locality_prompts": ["u v"], "locality_answers": ["g"]}])
    base = locality_predictions(Bigram(BASE), TOK, recs)
    assert evaluate(Bigram(EDITED), TOK, recs, base, generation=False)["locality"].to_list() == [1.0]
    assert evaluate(Bigram(EDITED), TOK, recs, None, generation=False)["locality"].to_list() == [None]


def test_a_locality_prompt_that_asks_an_edited_fact_is_left_out_of_locality_and_counted():
    """Record 0 (relation P1) has the neighbours 'p q' and 'u v'. Subject 'p q' is edited with P1 too, so
    the neighbour 'p q' asks a fact in force: the edited model's new answer there is not a locality failure, and the
    prompt is left out (locality 1.0 on 'u v' alone, locality_conflicts 0.5). Subject 'u v' is edited with
    another relation (P2): 'u v' stays a locality prompt. Without relations nothing is marked."""
    recs = zsre_like().with_columns(pl.Series("relation", ["P1", None]))
    in_force = pl.concat(
        [
            recs,
            frame([{"subject": "p q", "prompt": "p q", "target_new": "t", "relation": "P1"}]),
            frame([{"subject": "u v", "prompt": "u v", "target_new": "w", "relation": "P2"}]),
        ],
        how="diagonal_relaxed",
    )
    marked = mark_locality_conflicts(recs, in_force)
    assert marked["locality_conflict"].to_list() == [[True, False], []]
    base = locality_predictions(Bigram(BASE), TOK, recs)
    t = evaluate(Bigram(EDITED), TOK, marked, base, generation=False)
    assert t["locality"].to_list() == [1.0, None]  # unmarked: 0.75 ('p q' moved, see above)
    assert t["locality_conflicts"].to_list() == [0.5, None]
    assert evaluate(Bigram(EDITED), TOK, recs, base, generation=False)["locality"].to_list() == [0.75, None]
    # the same subject edited with another relation only: nothing to leave out
    other = in_force.with_columns(
        pl.when(pl.col("subject") == "p q").then(pl.lit("P3")).otherwise(pl.col("relation")).alias("relation")
    )
    assert mark_locality_conflicts(recs, other)["locality_conflict"].to_list() == [[False, False], []]
    no_rel = recs.with_columns(pl.lit(None, pl.String).alias("relation"))
    assert "locality_conflict" not in mark_locality_conflicts(no_rel, no_rel).columns


def counterfact_like(locality_answers=("d", "d", "d")) -> pl.DataFrame:
    """One record with its true target; its neighbours' answer is the true target (CounterFact's)."""
    return frame(
        [
            {
                "prompt": "a b",
                "target_new": "c",
                "target_true": "d",
                "rephrase_prompts": ["y z", "x b", "m b"],
                "locality_prompts": ["p q", "u v", "m q"],
                "locality_answers": list(locality_answers),
            }
        ]
    )


def test_efficacy_paraphrase_neighborhood_compare_mean_log_probs():
    """efficacy: log P(new) > log P(true) on the edit prompt; paraphrase: the same per rephrase, averaged;
    neighborhood: log P(true) > log P(new) per neighbour prompt, averaged."""
    recs = counterfact_like()
    # after b: c (new) HIGH, d (true) 2.0; after z: d 3.0 beats c 0; after q: d 1.0 > c 0; after v: c 1.0 > d 0
    m = Bigram(
        table(
            {"b": "c", "z": "t", "q": "r", "v": "w"},
            {("b", "d"): 2.0, ("z", "d"): 3.0, ("q", "d"): 1.0, ("v", "c"): 1.0},
        )
    )
    t = evaluate(m, TOK, recs, locality_predictions(m, TOK, recs), generation=False)
    assert t["efficacy"].to_list() == [1.0]
    assert t["paraphrase"].to_list() == [pytest.approx(2 / 3)]  # 'y z': true wins; 'x b', 'm b': new wins
    assert t["neighborhood"].to_list() == [pytest.approx(2 / 3)]  # 'p q', 'm q': true wins; 'u v': new wins


def test_a_tie_in_probability_is_not_a_success():
    """Equal log-probabilities of the new and the true target: efficacy and neighbourhood are strict."""
    recs = counterfact_like()
    m = Bigram(table({"b": "c", "q": "c", "v": "c"}, {("b", "d"): HIGH, ("q", "d"): HIGH, ("v", "d"): HIGH}))
    t = evaluate(m, TOK, recs, locality_predictions(m, TOK, recs), generation=False)
    assert t["efficacy"].to_list() == [0.0]
    assert t["neighborhood"].to_list() == [0.0]


def test_probability_scores_need_every_true_target_and_true_neighbours():
    """No efficacy where a record lacks its true target; no neighbourhood where the locality answers are
    not the true target (ZsRE's unrelated questions)."""
    m = Bigram(BASE)
    mixed = pl.concat([counterfact_like(), zsre_like().head(1).with_columns(pl.lit("9").alias("id"))])
    t = evaluate(m, TOK, mixed, locality_predictions(m, TOK, mixed), generation=False)
    assert "efficacy" not in t.columns and "neighborhood" not in t.columns
    other = counterfact_like(locality_answers=("d", "e", "d"))
    t = evaluate(m, TOK, other, locality_predictions(m, TOK, other), generation=False)
    assert "efficacy" in t.columns and "neighborhood" not in t.columns


def test_probes_restyled_chat_and_specificity():
    """Restyled and chat rephrases score against the new target; specificity is agreement with the unedited
    model's own 4-token continuation of each probe."""
    recs = frame(
        [
            {
                "prompt": "a b",
                "target_new": "c",
                "restyled_prompts": ["x b", "y z"],
                "chat_prompts": ["u b"],
                "specificity_prompts": ["p q"],
            }
        ]
    )
    base = locality_predictions(Bigram(BASE), TOK, recs)
    # unedited greedy continuation of 'p q': r s x x (q -> r -> s -> x -> x)
    assert base["spec_answers"].to_list() == [["r s x x"]]
    t = evaluate(Bigram(EDITED), TOK, recs, base, generation=False)
    assert t["restyled_generality"].to_list() == [0.5]
    assert t["chat_generality"].to_list() == [1.0]
    # edited: after q -> t (base r) wrong; after r, s, x: as before -> 3 of 4 positions agree
    assert t["specificity"].to_list() == [0.75]


def test_generation_reliability_and_contains():
    """Greedy generation, cut at the first newline: 'a b' -> 'c <nl> ...' is 'c'; 'y z' -> 't x x ...'."""
    m = Bigram(table({"b": "c", "c": "<nl>", "z": "t"}))
    assert generate(m, TOK, ["a b", "y z"], max_new_tokens=4) == ["c", "t x x x"]
    recs = frame(
        [
            {"prompt": "a b", "target_new": "c"},
            {"prompt": "y z", "target_new": "x"},
            {"prompt": "u v", "target_new": "x x"},
        ]
    )
    t = evaluate(m, TOK, recs, None, generation=True)
    assert t["generation"].to_list()[:2] == ["c", " ".join(["t"] + ["x"] * 15)]  # eval.max_new_tokens: 16
    assert t["generation_reliability"].to_list() == [1.0, 0.0, 1.0]
    assert t["generation_contains"].to_list() == [1.0, 1.0, 1.0]


def test_a_batch_stops_decoding_once_every_row_is_cut_and_keeps_the_same_texts():
    """'a b' -> 'c <nl>' is cut after 2 tokens, 'p q' -> 'r <nl>' too: a batch of both stops there; one
    with 'y z' (no newline) decodes every step. The texts are those of decoding every step."""
    m = Bigram(table({"b": "c", "c": "<nl>", "q": "r", "r": "<nl>", "z": "t"}))
    Bigram.steps = 0
    assert generate(m, TOK, ["a b", "p q"], max_new_tokens=8) == ["c", "r"]
    assert Bigram.steps == 2
    Bigram.steps = 0
    full = generate(m, TOK, ["a b", "p q", "y z"], max_new_tokens=8, stop_early=False)
    assert Bigram.steps == 8
    Bigram.steps = 0
    assert generate(m, TOK, ["a b", "p q", "y z"], max_new_tokens=8) == full == ["c", "r", "t x x x x x x x"]
    assert Bigram.steps == 8
    # a newline first is blank space, not the cut ('<nl> c' -> 'c', as without stopping early)
    m = Bigram(table({"b": "<nl>", "<nl>": "c", "c": "<nl>"}))
    assert generate(m, TOK, ["a b"], max_new_tokens=4) == generate(m, TOK, ["a b"], max_new_tokens=4, stop_early=False)


def test_fluency_is_the_ngram_entropy_of_each_generation():
    """'g' and 'h' alternate: 64 generated words, bigrams and trigrams two kinds each, about 1 bit."""
    m = Bigram(table({"g": "h", "h": "g"}))
    recs = frame([{"prompt": "a b", "target_new": "c", "generation_prompts": ["g"]}])
    t = evaluate(m, TOK, recs, None, generation=False, fluency=True)
    text = " ".join(["h", "g"] * 32)
    assert t["fluency"].to_list() == [pytest.approx(ngram_entropy([text]))]
    assert t["fluency"][0] == pytest.approx(1.0, abs=0.01)
    assert "fluency" not in evaluate(m, TOK, recs, None, generation=False).columns  # off by default


# ------------------------------------------------------------------ string and entropy helpers


def test_normalise_exact_match_and_contains():
    assert normalise("  The  City,  of PARIS! ") == "the city of paris"
    assert exact_match("Paris, France.", "paris") == 1.0
    assert exact_match("It is Paris", "Paris") == 0.0  # must start with the target
    assert contains("It is Paris", "Paris") == 1.0
    assert contains("It is Pari", "Paris") == 0.0
    # a target with nothing left after normalising matches anything (the data checks refuse empty targets)
    assert exact_match("anything", "") == 1.0 and contains("anything", "!") == 1.0


def test_ngram_entropy_by_hand():
    """'a b a b': bigrams ab x2, ba x1 (H = 0.918 bits), trigrams aba, bab (1 bit); weights 2/3 and 4/3."""
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(["a b a b"]) == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy(["a b a b", "a a a a"]) == pytest.approx((2 / 3 * h2 + 4 / 3) / 4)  # mean over texts
    assert ngram_entropy(["one"]) == 0.0  # too short for any bigram
    assert math.isnan(ngram_entropy([]))


# ------------------------------------------------------------------ summarize


def test_summarize_means_over_the_records_that_have_a_value():
    t = pl.DataFrame(
        {
            "id": ["0", "1", "2"],
            "reliability": [1.0, 0.5, 0.0],
            "generality": [1.0, None, 0.0],
            "locality": [None, None, None],
            "unregistered": [5.0, 5.0, 5.0],
        }
    )
    s = summarize(t)
    assert s["reliability"] == 0.5 and s["generality"] == 0.5
    assert "locality" not in s and "unregistered" not in s  # no value; not a registered metric
    assert s["avg"] == pytest.approx(0.5)  # the mean of the ones there (Rel, Gen)
    assert "fact_avg" not in s and "cf_score" not in s
    assert s["n_edits"] == 3.0


def test_summarize_avg_fact_avg_and_the_cf_score():
    t = pl.DataFrame(
        {
            "reliability": [1.0, 1.0],
            "generality": [0.5, 0.5],
            "locality": [0.0, 0.3],
            "specificity": [0.2, 0.4],
            "efficacy": [1.0, 0.0],
            "paraphrase": [1.0, 1.0],
            "neighborhood": [0.25, 0.25],
        }
    )
    s = summarize(t)
    assert s["avg"] == pytest.approx((1.0 + 0.5 + 0.15) / 3)
    assert s["fact_avg"] == pytest.approx((1.0 + 0.5 + 0.3) / 3)
    assert s["cf_score"] == pytest.approx(3 / (1 / 0.5 + 1 / 1.0 + 1 / 0.25))  # harmonic mean
    zero = summarize(t.with_columns(pl.lit(0.0).alias("neighborhood")))
    assert zero["cf_score"] == pytest.approx(0.0, abs=1e-8)  # a zero score sinks the harmonic mean


def test_summarize_counts_edits_in_force():
    """An overwritten edit's row carries only overwritten_reliability: not an edit in force."""
    t = pl.DataFrame({"reliability": [1.0, None], "overwritten_reliability": [None, 0.0]})
    s = summarize(t)
    assert s["n_edits"] == 1.0 and s["overwritten_reliability"] == 0.0
