"""The sequential protocol's pieces (memoe/protocol.py): what is scored after each round, the
re-edit bookkeeping, the per-round seed, and the in-process loop on a tiny model."""

import polars as pl

from memoe.data import split_rounds
from memoe.protocol import eval_records, overwritten_ids, round_seed, run_sequential, split_overwritten

from .test_adapter import _records

PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "Homer's most famous poem is",
    "The capital of Norway is",
    "Paris is located in",
    "The Eiffel Tower is in",
    "Danielle Darrieux was born in",
]
TARGETS = ["Klingon", "Blue Lagoon", "Bergen", "Peru", "Rome", "Oslo"]
SUBJECTS = ["Danielle Darrieux", "Homer", "Norway", "Paris", "Eiffel Tower", "Danielle Darrieux"]


def _rounds(n_rounds=3, batch=2):
    df = _records(PROMPTS, TARGETS, SUBJECTS)
    return [df.slice(t * batch, batch) for t in range(n_rounds)]


def test_round_seed_is_the_studies_formula():
    # stored studies, cache keys and their retention samples depend on it
    assert round_seed(0, 0) == 0 and round_seed(2, 3) == 2003


def test_eval_records_own_edits_a_seeded_sample_of_earlier_and_all_after_the_last_round():
    rounds = _rounds()
    own, n = eval_records(rounds, 0, 1, seed=0, final=False)
    assert n == 0 and own["id"].to_list() == ["0", "1"] and own["current"].all()
    recs, n = eval_records(rounds, 2, 1, seed=0, final=False)
    assert n == 1 and recs.height == 3 and recs["id"].to_list()[1:] == ["4", "5"]  # earlier first
    assert recs["current"].to_list() == [False, True, True] and recs["round_of_edit"].to_list()[1:] == [2, 2]
    assert recs.equals(eval_records(rounds, 2, 1, seed=0, final=False)[0])  # seeded
    prev = pl.concat(
        r.with_columns(pl.lit(i).alias("round_of_edit"), pl.lit(False).alias("current"))
        for i, r in enumerate(rounds[:2])
    )
    assert recs.head(1).equals(prev.sample(n=1, seed=round_seed(0, 2), shuffle=False))
    every, n = eval_records(rounds, 2, 1, seed=0, final=True)
    assert n == 4 and every["id"].to_list() == [str(i) for i in range(6)]
    assert eval_records(rounds, 2, None, seed=0, final=False)[0].height == 6  # no sample: every edit


def test_a_re_edit_supersedes_the_edit_it_re_edits():
    rounds = split_rounds(_records(PROMPTS[:4], TARGETS[:4], SUBJECTS[:4]), 3, 2, re_edit=(3, 1))
    assert overwritten_ids(rounds[:2]) == set()
    assert overwritten_ids(rounds) == {"0", "1"}
    recs, _ = eval_records(rounds, 2, None, seed=0, final=True)
    in_force, old = split_overwritten(recs, overwritten_ids(rounds))
    assert in_force["id"].to_list() == ["2", "3", "0#re3", "1#re3"] and old["id"].to_list() == ["0", "1"]


def test_run_sequential_scores_each_round_and_the_re_edits_apart(tokenizer):
    from memoe.editors import make_editor
    from memoe.editors.memoe import MEMoEMethod
    from memoe.metrics import locality_predictions

    from .conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    rounds = split_rounds(_records(PROMPTS[:4], TARGETS[:4], SUBJECTS[:4]), 3, 2, re_edit=(3, 1))
    base = locality_predictions(model, tokenizer, pl.concat(rounds))
    ed = make_editor(
        model, tokenizer, MEMoEMethod(layers=[1], rank=8, lr=5e-2, steps=10, early_stop_loss=0.0, precision="float32")
    )
    edited = []
    out = list(
        run_sequential(
            model, tokenizer, ed, rounds, base, retention_sample=1, generation=False, after_edit=edited.append
        )
    )
    assert [r.index for r in out] == [0, 1, 2] and edited == [0, 1, 2]
    assert all(r.edit.steps == 10 and r.train_s > 0 and r.eval_s > 0 for r in out)
    assert [r.scores.table.height for r in out] == [2, 3, 6] and [r.n_earlier for r in out] == [0, 1, 4]
    assert "reedit_reliability" not in out[1].scores.table.columns
    last = out[-1].scores.table
    assert last.filter(pl.col("overwritten_reliability").is_not_null())["id"].to_list() == ["0", "1"]
    gone = last.filter(pl.col("overwritten_reliability").is_not_null())
    # the earlier target against the latest: the latest is the more likely one after the re-edit
    assert gone["overwritten_preferred"].to_list() == [0.0, 0.0]
    assert "overwritten_generation" not in last.columns  # generation off
    assert last.filter(pl.col("reedit_reliability").is_not_null())["id"].to_list() == ["0#re3", "1#re3"]
    assert last.filter(pl.col("reliability").is_not_null()).height == 4  # in force
    assert out[-1].scores.diagnostics  # the editor's own figures on the round's edits
    only_last = list(run_sequential(model, tokenizer, None, rounds, base, every_round=False, generation=False))
    assert [r.scores is None for r in only_last] == [True, True, False] and only_last[-1].edit is None
    ed.remove()
