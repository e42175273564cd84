import torch

from memoe.anchors import NO_ANCHOR, AnchorExtractor, anchor_embeddings, anchor_end_token, capitalised_span, gold_anchor


def test_longest_known_match_wins():
    ex = AnchorExtractor(["New York", "New York City", "York"])
    a = ex("What is the population of New York City today?")
    assert a.known and a.text == "New York City" and a.source == "known"
    assert "What is the population of New York City today?"[a.start : a.end] == "New York City"


def test_case_whitespace_punctuation_tolerant():
    ex = AnchorExtractor(["Eiffel Tower", "St. Louis Cardinals", "Zoë Saldaña"])
    assert ex("how tall is the  EIFFEL   tower's spire?").text == "Eiffel Tower"
    assert ex("Who owns the St Louis Cardinals?").text == "St. Louis Cardinals"
    assert ex("films with zoe saldana").text == "Zoë Saldaña"
    # no match inside words
    ex2 = AnchorExtractor(["Art"])
    assert not ex2.known("the artist paints").found


def test_ner_fallback_and_no_anchor():
    ex = AnchorExtractor(["Eiffel Tower"])
    a = ex("nq question: who played Count Dracula in the 1931 film?")
    assert not a.known and a.source == "ner" and a.text == "Count Dracula"
    assert capitalised_span("Which river flows through the University of Oxford campus?").text == "University of Oxford"
    assert ex("what is the boiling point of water") == NO_ANCHOR
    assert AnchorExtractor(["X"], ner=False)("who is Barack Obama") == NO_ANCHOR


def test_gold_anchor_and_token_end(tokenizer):
    p = "The mother tongue of Danielle Darrieux is"
    a = gold_anchor(p, "Danielle Darrieux")
    assert p[a.start : a.end] == "Danielle Darrieux" and a.known
    j = anchor_end_token(tokenizer, p, a)
    ids = tokenizer(p).input_ids
    assert "Darrieux".endswith(tokenizer.decode(ids[j]).strip()[-3:])
    assert tokenizer.decode(ids[j + 1]).strip() == "is"


def test_anchor_embedding_pooling(tokenizer):
    emb = torch.nn.Embedding(len(tokenizer), 8)
    e = anchor_embeddings(emb, tokenizer, ["Paris", None, "Paris"], "mean")
    assert torch.equal(e[0], e[2]) and torch.count_nonzero(e[1]) == 0
    ids = tokenizer(" New York", add_special_tokens=False).input_ids
    for pool, ref in [
        ("mean", emb.weight[ids].mean(0)),
        ("last", emb.weight[ids[-1]]),
        ("sum", emb.weight[ids].sum(0)),
    ]:
        assert torch.allclose(anchor_embeddings(emb, tokenizer, ["New York"], pool)[0], ref)
