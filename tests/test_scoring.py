"""ROUGE against values counted by hand.

rouge_score's tokenizer lowercases, turns every non-alphanumeric character into a space, and Porter-stems
only tokens longer than 3 characters. For counts, F1 = 2 * hits / (prediction tokens + reference tokens).
"""

from __future__ import annotations

import pytest

from samsum_qlora.errors import PipelineError
from samsum_qlora.evaluation.scoring import ROUGE_KEYS, score_corpus, score_pair, split_sentences


def test_exact_match_scores_one_on_every_key():
    scores = score_pair(
        "Amanda will bring the cake. Tom buys drinks.", "Amanda will bring the cake. Tom buys drinks."
    )

    assert scores == {key: pytest.approx(1.0) for key in ROUGE_KEYS}
    assert list(scores) == list(ROUGE_KEYS)


def test_partial_overlap_with_precision_different_from_recall():
    # reference:  john will meet mari at noon       (6 tokens; "mary" stems to "mari" on both sides)
    # prediction: mari will meet john tomorrow      (5 tokens)
    # rouge1: hits john, will, meet, mari = 4        -> P 4/5, R 4/6, F 2*4/(5+6) = 8/11
    # rouge2: reference bigrams  john-will will-meet meet-mari mari-at at-noon (5)
    #         prediction bigrams mari-will will-meet meet-john john-tomorrow   (4)
    #         hits will-meet = 1                     -> P 1/4, R 1/5, F 2*1/(4+5) = 2/9
    # rougeL: LCS "will meet" = 2 (nothing after "meet" is shared in order) -> F 2*2/(5+6) = 4/11
    # rougeLsum: one sentence each, so the same LCS  -> 4/11
    scores = score_pair("Mary will meet John tomorrow", "John will meet Mary at noon")

    assert scores["rouge1"] == pytest.approx(8 / 11)
    assert scores["rouge2"] == pytest.approx(2 / 9)
    assert scores["rougeL"] == pytest.approx(4 / 11)
    assert scores["rougeLsum"] == pytest.approx(4 / 11)


def test_f1_is_reported_not_precision_or_recall():
    # reference "the cat sat on the mat" (6), prediction "the cat sat" (3): P = 1, R = 1/2.
    # rouge1 hits 3 -> F 2*3/9 = 2/3; rouge2 hits the-cat cat-sat = 2 of 2 vs 5 -> F 2*2/7 = 4/7.
    scores = score_pair("the cat sat", "the cat sat on the mat")

    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(4 / 7)
    assert scores["rougeL"] == pytest.approx(2 / 3)


def test_stemming_matches_inflected_forms():
    # "cats running" -> cat run; "cat runs" -> cat run: identical token lists, every key 1.0.
    assert score_pair("cat runs", "cats running") == {key: pytest.approx(1.0) for key in ROUGE_KEYS}

    # reference "Amanda baked cookies"      -> amanda bake cooki          (3)
    # prediction "amanda is baking a cookie" -> amanda is bake a cooki    (5; "is", "a" too short to stem)
    # rouge1 hits amanda, bake, cooki = 3 -> F 2*3/8 = 3/4 (without stemming only "amanda": 2/8)
    # rouge2: amanda-bake, bake-cooki vs amanda-is, is-bake, bake-a, a-cooki -> 0
    # rougeL: LCS amanda bake cooki = 3 -> 3/4
    scores = score_pair("amanda is baking a cookie", "Amanda baked cookies")

    assert scores["rouge1"] == pytest.approx(3 / 4)
    assert scores["rouge2"] == 0.0
    assert scores["rougeL"] == pytest.approx(3 / 4)


def test_rouge_lsum_uses_sentences_so_reordered_sentences_still_match():
    # reference  "Tom is late. Ann is early." -> [tom is late] [ann is earli]
    # prediction "Ann is early. Tom is late." -> [ann is earli] [tom is late]
    # rouge1: all 6 tokens hit -> 1
    # rouge2: reference tom-is is-late late-ann ann-is is-earli; prediction ann-is is-earli earli-tom
    #         tom-is is-late; hits 4 of 5 each side -> 4/5
    # rougeL over the whole text: LCS is "tom is late" or "ann is earli" = 3 -> 2*3/12 = 1/2
    # rougeLsum: each reference sentence is matched in full by one prediction sentence: 3 + 3 hits -> 1
    scores = score_pair("Ann is early. Tom is late.", "Tom is late. Ann is early.")

    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rouge2"] == pytest.approx(4 / 5)
    assert scores["rougeL"] == pytest.approx(1 / 2)
    assert scores["rougeLsum"] == pytest.approx(1.0)


@pytest.mark.parametrize("prediction", ["", "   ", "\n\t"])
def test_empty_prediction_scores_zero_on_every_key(prediction):
    scores = score_pair(prediction, "Tom is late.")

    assert scores == dict.fromkeys(ROUGE_KEYS, 0.0)
    assert all(type(value) is float for value in scores.values())


def test_case_and_punctuation_are_ignored():
    assert score_pair("hello world", "Hello, WORLD!") == {key: pytest.approx(1.0) for key in ROUGE_KEYS}
    # The apostrophe splits "Tom's" into two tokens, "tom" and "s".
    # reference tom s car (3), prediction tom car (2): rouge1 hits 2 -> 2*2/5 = 4/5
    assert score_pair("Tom car", "Tom's car.")["rouge1"] == pytest.approx(4 / 5)


def test_scores_are_plain_floats_in_the_unit_interval():
    scores = score_pair("Mary will meet John tomorrow", "John will meet Mary at noon")

    assert all(type(value) is float and 0.0 <= value <= 1.0 for value in scores.values())


def test_corpus_mean_is_the_mean_of_per_example_f1():
    per_example, means = score_corpus(
        ["cat runs", "dogs sleep", "Mary will meet John tomorrow"],
        ["cats running", "birds sing", "John will meet Mary at noon"],
    )

    assert [scores["rouge1"] for scores in per_example] == pytest.approx([1.0, 0.0, 8 / 11])
    # (1 + 0 + 8/11) / 3 and (1 + 0 + 4/11) / 3, by hand from the cases above
    assert means["rouge1"] == pytest.approx((1 + 8 / 11) / 3)
    assert means["rougeL"] == pytest.approx((1 + 4 / 11) / 3)
    assert set(means) == set(ROUGE_KEYS)
    assert all(type(value) is float for value in means.values())


def test_corpus_with_mismatched_lengths_is_an_error():
    with pytest.raises(PipelineError, match="2 predictions against 1 references"):
        score_corpus(["a summary", "another"], ["a reference"])


def test_empty_corpus_is_an_error():
    with pytest.raises(PipelineError, match="nothing to score"):
        score_corpus([], [])


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Tom is late. Ann is early!", ["Tom is late.", "Ann is early!"]),
        ("Really?! Yes... ok", ["Really?!", "Yes...", "ok"]),
        ('He said "go." Then he left.', ['He said "go."', "Then he left."]),
        ("Version 3.5 is out.", ["Version 3.5 is out."]),
        ("first line\nsecond line\n\n", ["first line", "second line"]),
        ("  Tom is late.  ", ["Tom is late."]),
        ("", []),
        ("   ", []),
    ],
)
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


def test_scores_are_rouge_scores_own_with_its_stemmer():
    """Each word is stemmed once (a cache): the scores must be the library's own with `use_stemmer=True`."""
    from rouge_score import rouge_scorer

    pairs = [
        ("Anna is running late; she'll call Tom.", "Anna runs late and calls Tom later."),
        ("The meetings were cancelled.\nThey'll reschedule.", "Meeting cancelled. Rescheduling happens next week!"),
        ("Zoë feeds José's cats on 12/03.", "José's cat is fed by Zoë on 12/03, generously."),
        ("Relational generalizations", "relate generalize generalization relational"),
    ] * 3  # repeated words come from the cache the second time
    library = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    for prediction, reference in pairs:
        expected = library.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
        token_level = library.score(reference, prediction)
        ours = score_pair(prediction, reference)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert ours[key] == token_level[key].fmeasure
        assert ours["rougeLsum"] == expected["rougeLsum"].fmeasure
