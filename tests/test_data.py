import json

import polars as pl
import pytest

from memoe.data import SCHEMA, EditDataError, load_edits, sample_edits, split_rounds

from .conftest import CF, CF_FLAT, ZSRE


def test_shared_datasets_load_into_one_schema():
    z, rz = load_edits(ZSRE, "zsre")
    c, rc = load_edits(CF, "counterfact")
    f, rf = load_edits(CF_FLAT, "counterfact-flat")
    assert (z.height, c.height, f.height) == (1037, 1031, 1919)
    for df in (z, c, f):
        assert dict(df.schema) == SCHEMA
    r = z.row(0, named=True)
    assert r["prompt"] == "When was the inception of IAAF Combined Events Challenge?"
    assert r["target_new"] == "2006" and r["target_true"] == "1998"
    assert r["locality_prompts"][0].startswith("nq question:")
    assert r["portability_answers"] == ["Athletics"]
    r = c.row(0, named=True)
    assert r["prompt"] == "Spike Hughes originates from" and r["target_new"] == "Philadelphia"
    assert r["rephrase_prompts"][1].startswith("Amateur Athletic Union")  # ROME's prefix is kept
    assert set(r["locality_answers"]) == {"London"} and len(r["locality_prompts"]) == 10
    assert r["relation"] == "P19"  # requested_rewrite.relation_id: what its neighbours ask too
    assert z["relation"].null_count() == z.height and f["relation"].null_count() == f.height  # not in the files


def test_sampling_is_deterministic_and_splits():
    z, _ = load_edits(ZSRE, "zsre")
    a = sample_edits(z, 20, seed=3, how="random")
    b = sample_edits(z, 20, seed=3, how="random")
    assert a["id"].to_list() == b["id"].to_list()
    assert a["id"].to_list() != sample_edits(z, 20, seed=4, how="random")["id"].to_list()
    rounds = split_rounds(a, 4, 5)
    assert [r.height for r in rounds] == [5] * 4
    assert pl.concat(rounds)["id"].to_list() == a["id"].to_list()
    with pytest.raises(ValueError, match="only 20 available"):
        split_rounds(a, 5, 5)


def _zsre_rec(**kw):
    r = {
        "subject": "Paris",
        "src": "Where is Paris?",
        "rephrase": "Paris is in which country?",
        "alt": "Italy",
        "answers": ["France"],
        "loc": "nq question: who am i",
        "loc_ans": "me",
    }
    r.update(kw)
    return r


def _write(tmp_path, recs, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(recs))
    return p


def test_malformed_json(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"subject": "x",]')
    with pytest.raises(EditDataError, match=r"d.json: malformed JSON at line 1"):
        load_edits(p, "zsre")


def test_malformed_jsonl_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"subject": "Paris", "prompt": "Paris is in", "target_new": "Italy"}\n{oops\n')
    with pytest.raises(EditDataError, match=r"d.jsonl, record line 2: malformed JSON"):
        load_edits(p, "jsonl")


def test_malformed_csv_names_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("subject,prompt,target_new\nParis,Paris is in,Italy\nRome,Rome is in,Spain,extra\n")
    with pytest.raises(EditDataError, match=r"d.csv, record line 3: more cells"):
        load_edits(p, "csv")


def test_missing_field(tmp_path):
    rec = _zsre_rec()
    del rec["alt"]
    with pytest.raises(EditDataError, match=r"record 1, field 'alt': missing field"):
        load_edits(_write(tmp_path, [_zsre_rec(), rec]), "zsre")


def test_missing_nested_field_counterfact(tmp_path):
    rec = json.loads(CF.read_text())[0]
    del rec["requested_rewrite"]["target_new"]
    with pytest.raises(EditDataError, match=r"record 0, field 'requested_rewrite.target_new.str': missing"):
        load_edits(_write(tmp_path, [rec]), "counterfact")


def test_empty_target(tmp_path):
    with pytest.raises(EditDataError, match=r"record 0, field 'alt': empty value"):
        load_edits(_write(tmp_path, [_zsre_rec(alt="  ")]), "zsre")
    p = tmp_path / "d.csv"
    p.write_text("subject,prompt,target_new\nParis,Paris is in,\n")
    with pytest.raises(EditDataError, match=r"record line 2, field 'target_new': missing"):
        load_edits(p, "csv")


def test_subject_not_in_prompt(tmp_path):
    with pytest.raises(EditDataError, match=r"record 0, field 'subject': subject 'Rome' does not occur"):
        load_edits(_write(tmp_path, [_zsre_rec(subject="Rome")]), "zsre")
    # tolerant of case and punctuation
    df, _ = load_edits(_write(tmp_path, [_zsre_rec(subject="paris!")]), "zsre")
    assert df.height == 1


def test_duplicate_ids(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"id": "a", "subject": "Paris", "prompt": "Paris is in", "target_new": "Italy"}] * 2
    p.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(EditDataError, match=r"record line 2, field 'id': duplicate id 'a' \(first at record line 1\)"):
        load_edits(p, "jsonl")


def test_prompt_longer_than_context(tmp_path):
    long = "Paris " + "very " * 50 + "far?"
    with pytest.raises(
        EditDataError, match=r"record 0, field 'prompt': prompt of \d+ tokens exceeds the model's context of 20"
    ):
        load_edits(
            _write(tmp_path, [_zsre_rec(src=long)]), "zsre", max_prompt_tokens=20, count_tokens=lambda s: len(s.split())
        )


def test_skip_bad_counts(tmp_path):
    recs = [_zsre_rec(), _zsre_rec(alt=""), _zsre_rec(subject="Rome"), _zsre_rec(src="Where is Paris now?")]
    df, rep = load_edits(_write(tmp_path, recs), "zsre", skip_bad=True)
    assert df.height == 2 and rep.n_skipped == 2 and rep.n_read == 4
    assert "record 1, field 'alt'" in rep.skipped[0]


def test_user_formats(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text(
        "subject,prompt,target_new,target_true,rephrases,locality_prompts,locality_answers\n"
        'Paris,Paris is the capital of,Italy,France,"[""The capital Paris is in""]",'
        "Rome is in|Oslo is in,Italy|Norway\n"
    )
    df, _ = load_edits(p, "csv")
    r = df.row(0, named=True)
    assert r["rephrase_prompts"] == ["The capital Paris is in"] and r["locality_answers"] == ["Italy", "Norway"]
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps(
            {
                "subject": "Paris",
                "prompt": "Paris is in",
                "target_new": "Italy",
                "locality_prompts": ["a"],
                "locality_answers": [],
            }
        )
    )
    with pytest.raises(EditDataError, match=r"field 'locality_answers': 1 locality prompts but 0 answers"):
        load_edits(p, "jsonl")


def test_file_not_found(tmp_path):
    with pytest.raises(EditDataError, match="file not found"):
        load_edits(tmp_path / "none.json", "zsre")


def test_a_re_edit_round_brings_an_earlier_rounds_edits_back_with_new_targets():
    a = load_edits(ZSRE, "zsre")[0].head(8)
    rounds = split_rounds(a, 4, 2, re_edit=(3, 1), seed=0)
    assert [r.height for r in rounds] == [2, 2, 2, 2]
    first, again = rounds[0], rounds[2]
    assert again["id"].to_list() == [i + "#re3" for i in first["id"].to_list()]
    assert again["prompt"].to_list() == first["prompt"].to_list()
    assert again["target_true"].to_list() == first["target_new"].to_list()  # what the edited model said
    assert all(n != o for n, o in zip(again["target_new"], first["target_new"]))
    assert sorted(again["target_new"]) == sorted(first["target_new"])  # a derangement of the round's targets
    assert rounds[3]["id"].to_list() == a["id"].to_list()[4:6]  # later rounds take the next new edits
    assert split_rounds(a, 4, 2, re_edit=(3, 1), seed=0)[2].equals(again)  # seeded
    with pytest.raises(ValueError, match="re_edit: round 2 cannot re-edit round 2"):
        split_rounds(a, 4, 2, re_edit=(2, 2))


def test_every_catalogue_dataset_loads_with_its_format():
    """The dataset catalogue (configs/datasets/catalogue.yaml): every entry names a registered format, its file
    is there and loads, and its description says what it is."""
    from memoe.catalogue import datasets
    from memoe.data import FORMATS

    assert {"zsre", "counterfact", "counterfact-val"} <= set(datasets())
    for ds in datasets().values():
        assert ds.format in FORMATS, ds.name
        df, rep = load_edits(ds.resolved(), ds.format)
        assert df.height > 0 and rep.n_skipped == 0, ds.name
        assert f"{df.height:,}" in ds.description, ds.name  # the record count it states


def test_dataset_paths_live_in_the_catalogue_only():
    """No Python file holds a data file's path or name: the library, the pipeline, the benchmarks, the scripts
    and the tests ask the catalogue (memoe.catalogue)."""
    import os
    from pathlib import Path

    from memoe.catalogue import datasets

    root = Path(__file__).resolve().parent.parent
    paths = [ds.path for ds in datasets().values()]
    needles = [os.path.commonpath(paths)] + [Path(p).name for p in paths]  # their folder and their names
    found = []
    for folder in ("memoe", "tasks", "flows", "benchmarks", "scripts", "tests"):
        for f in sorted((root / folder).rglob("*.py")):
            text = f.read_text()
            found += [f"{f.relative_to(root)}: {n}" for n in needles if n in text]
    assert found == []
