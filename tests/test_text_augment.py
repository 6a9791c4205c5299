"""Offline caption augmentation: EDA for CleanCLIP, positive / negative subtexts for TA-Cleaner."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from datamodules import text_augment as ta

CAPTIONS = [
    "A man riding a horse on a beach next to the ocean.",
    "Two dogs playing with a red frisbee in the park",
    "A cat is sleeping on a couch",
    "A woman holding an umbrella while walking down a busy street",
    "three people are standing next to buses",
    "a photo of a class0 number 3",  # no word of the table: RS / RD only, no subtexts
    "Pizza",
    "xyzzy plugh",
    "zork frobnicate quux grue",
]


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    remaining = iter(whole)
    return all(word in remaining for word in part)


def test_table_is_consistent_and_a_few_hundred_words():
    counts = Counter(word for group in ta.GROUPS for word in group.words)
    assert [w for w, c in counts.items() if c > 1] == []  # a word belongs to one group of one kind
    assert len(ta.WORD_GROUP) >= 300
    for word in ta.WORD_GROUP:
        assert ta.normalise(word) == [word], word
    kinds = Counter(group.kind for group in ta.GROUPS)
    assert set(kinds) == set(ta.KINDS) and min(kinds.values()) >= 30
    assert sum(len(group.words) > 1 for group in ta.GROUPS) >= 100  # groups with synonyms, for SR / RI


def test_no_corpus_is_loaded():
    for caption in CAPTIONS:
        ta.augment_caption(caption, 0)
    assert "nltk" not in sys.modules


def test_plural_nouns_keep_their_number():
    assert set(ta.synonyms("dogs")) == {"puppies", "pups", "pooches", "hounds", "canines"}
    assert "women" not in ta.synonyms("men") and "gentlemen" in ta.synonyms("men")
    plurals = ta.replacements("dogs")
    assert "cats" in plurals and "mice" in plurals and "cat" not in plurals and "mouse" not in plurals


@pytest.mark.parametrize("caption", CAPTIONS)
def test_augment_caption_is_deterministic_never_empty_and_varies(caption):
    outputs = [ta.augment_caption(caption, seed) for seed in range(30)]
    assert outputs == [ta.augment_caption(caption, seed) for seed in range(30)]
    assert all(out.strip() for out in outputs)
    words = ta.normalise(caption)
    if len(words) >= 2:
        assert all(out != " ".join(words) for out in outputs)  # every operation changes a caption it can
        assert len(set(outputs)) > min(5, len(words))


def test_without_table_words_only_swap_and_deletion():
    caption = "the zork of a frobnicate number 3"
    words = ta.normalise(caption)
    for seed in range(40):
        out = ta.augment_caption(caption, seed).split()
        assert sorted(out) == sorted(words) or is_subsequence(out, words)
        assert set(out) <= set(words)  # nothing inserted or replaced


def test_synonym_replacement_uses_the_table():
    import random

    words = ta.normalise("a dog sitting on a table")
    replaced = ta.synonym_replacement(words, 2, random.Random(0))
    changed = [(a, b) for a, b in zip(words, replaced) if a != b]
    assert len(changed) == 2
    for before, after in changed:
        assert after in ta.synonyms(before)


@pytest.mark.parametrize("caption", CAPTIONS)
def test_negatives_differ_in_exactly_one_content_word(caption):
    words = ta.normalise(caption)
    for seed in range(10):
        negatives = ta.negative_subtexts(caption, seed, 3)
        assert negatives == ta.negative_subtexts(caption, seed, 3)
        assert len(negatives) == len(set(negatives)) <= 3
        for negative in negatives:
            replaced = negative.split()
            assert len(replaced) == len(words)
            diff = [i for i, (a, b) in enumerate(zip(words, replaced)) if a != b]
            assert len(diff) == 1, (caption, negative)
            before, after = words[diff[0]], replaced[diff[0]]
            found_before, found_after = ta.lookup(before), ta.lookup(after)
            assert found_before is not None and found_after is not None
            assert found_before[0].kind == found_after[0].kind  # same kind of word
            assert found_before[0] is not found_after[0]  # never a synonym
            assert after not in ta.synonyms(before)


def test_negatives_prefer_the_same_category_and_fit_the_article():
    for seed in range(20):
        (negative,) = ta.negative_subtexts("a dog", seed, 1)
        group = ta.lookup(negative.split()[1])[0]
        assert group.category == "animal" and negative.split()[1][0] not in "aeiou"
    assert ta.negative_subtexts("a photo of a class0 number 3", 0, 2)  # "photo" is in the table
    assert ta.negative_subtexts("xyzzy plugh", 0, 2) == []


@pytest.mark.parametrize("caption", CAPTIONS)
def test_positives_are_shorter_subsequences_that_keep_the_subject(caption):
    words = ta.normalise(caption)
    first_chunk = [words[i] for i in ta.caption_chunks(words)[0]] if words else []
    for seed in range(10):
        positives = ta.positive_subtexts(caption, seed, 3)
        assert positives == ta.positive_subtexts(caption, seed, 3)
        assert len(positives) == len(set(positives)) <= 3
        for positive in positives:
            part = positive.split()
            assert part and len(part) < len(words)
            assert is_subsequence(part, words), (caption, positive)
            dropped_adjective_only = len(part) == len(words) - 1 or set(words) - set(part) <= {
                w for w in words if (f := ta.lookup(w)) is not None and f[0].kind == "adj"
            }
            assert part[: len(first_chunk)] == first_chunk or dropped_adjective_only


def test_positive_rules_on_examples():
    chunks = ta.caption_chunks(ta.normalise("a man riding a horse on a beach"))
    assert chunks == [[0, 1], [2, 3, 4], [5, 6, 7]]
    positives = set(ta.positive_subtexts("a man riding a horse on a beach", 0, 10))
    assert positives == {"a man", "a man riding a horse", "a man on a beach"}
    assert "a car" in ta.positive_subtexts("a red car", 0, 5)
    assert ta.caption_chunks(ta.normalise("a cat is sleeping on a couch")) == [[0, 1], [2, 3], [4, 5, 6]]
    assert ta.caption_chunks(ta.normalise("a wedding cake")) == [[0, 1, 2]]  # -ing after an article: no verb
    assert ta.positive_subtexts("a man not wearing a red shirt", 0, 5) == []  # negation: no positives
    assert ta.positive_subtexts("pizza", 0, 5) == []
