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
    # "photo" in "a photo of" frames the caption: not swapped; "class0" is only a word with the data's class names
    assert ta.negative_subtexts("a photo of a class0 number 3", 0, 2) == []
    assert ta.negative_subtexts("a photo of a class0 number 3", 0, 2, ["class0", "class1"]) == [
        "a photo of a class1 number 3"
    ]
    assert ta.negative_subtexts("xyzzy plugh", 0, 2) == []


SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "crescent", "heart", "arrow"]
SHAPE_CAPTIONS = [
    "a photo of a small red circle.",
    "a large blue triangle on a striped background.",
    "an image of a arrow in green.",
    "a picture of a small heart, colored yellow.",
    "two stars and a ring",
]


@pytest.mark.parametrize("caption", SHAPE_CAPTIONS)
def test_negatives_swap_the_class_word_first(caption):
    """With the data's class names, the first negative names another class where the class word stood."""
    words = ta.normalise(caption)
    vocab = ta.vocabulary(tuple(SHAPES))
    classes = [i for i, w in enumerate(words) if vocab.is_class_word(w)]
    assert classes, caption
    seen_classes = set()
    for seed in range(10):
        negatives = ta.negative_subtexts(caption, seed, 3, SHAPES)
        assert len(negatives) == 3 and len(set(negatives)) == 3
        first = negatives[0].split()
        assert len(first) == len(words)
        swapped = [i for i in classes if first[i] != words[i]]
        assert len(swapped) == 1, (caption, negatives[0])
        new = first[swapped[0]]
        assert vocab.is_class_word(new) and vocab.lookup(new)[0] is not vocab.lookup(words[swapped[0]])[0]
        assert vocab.lookup(new)[2] == vocab.lookup(words[swapped[0]])[2]  # same number ("stars" -> "hearts")
        seen_classes.add(vocab.lookup(new)[1])
        if swapped[0] > 0 and first[swapped[0] - 1] in ("a", "an"):  # the article fits the new class name
            assert (first[swapped[0] - 1] == "an") == (new[0] in "aeiou")
        for negative in negatives:  # never the frame ("a photo of"), never more than the article beside one word
            diff = [i for i, (a, b) in enumerate(zip(words, negative.split())) if a != b]
            one_word = len(diff) == 1
            word_and_article = len(diff) == 2 and diff[1] == diff[0] + 1 and words[diff[0]] in ("a", "an")
            assert (one_word or word_and_article) and words[diff[-1]] not in ta.FRAMES, negative
    assert len(seen_classes) >= 4  # the replacement class varies with the seed


def test_class_names_of_several_words_are_one_unit():
    names = ["teddy bear", "hot dog", "circle"]
    assert ta.vocabulary(tuple(names)).units(["two", "teddy", "bears", "on", "a", "bed"]) == [
        "two",
        "teddy bears",
        "on",
        "a",
        "bed",
    ]
    negatives = ta.negative_subtexts("two teddy bears on a bed", 0, 4, names)
    assert negatives[0] in {"two hot dogs on a bed", "two circles on a bed"}
    assert all("teddy bears" in p for p in ta.positive_subtexts("two teddy bears on a bed", 0, 4, names))


def test_positives_drop_modifiers_and_keep_the_class_word():
    caption = "a photo of a small red circle on a striped background"
    positives = set(ta.positive_subtexts(caption, 0, 20, SHAPES))
    assert positives == {
        "a photo of a small circle on a striped background",
        "a photo of a red circle on a striped background",
        "a photo of a circle on a striped background",
        "a photo of a small red circle",
    }
    # a predicate adjective is not dropped alone ("colored" would dangle); its chunk is
    assert set(ta.positive_subtexts("a picture of a small heart, colored yellow.", 0, 20, SHAPES)) == {
        "a picture of a heart colored yellow",
        "a picture of a small heart",
    }
    # the class word is kept even when it is not in the subject chunk
    assert set(ta.positive_subtexts("a man riding a horse on a beach", 0, 20, ["horse", "cat"])) == {
        "a man riding a horse"
    }


def test_word_lists_are_package_data():
    from importlib import resources

    folder = resources.files("datamodules").joinpath(ta.WORD_LISTS)
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".txt"))
    assert names == ["adjectives.txt", "function_words.txt", "nouns.txt", "verbs.txt"]
    assert "red" in ta.read_word_list("adjectives.txt").split() and "#" not in ta.read_word_list("nouns.txt")
    assert {"no", "not", "without"} <= ta.NEGATIONS and "photo" in ta.FRAMES


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


@pytest.mark.parametrize("caption", SHAPE_CAPTIONS)
def test_negatives_without_class_words_keep_the_class(caption):
    """swap_class_words=False (TA-Cleaner's variant): every negative still names the caption's own classes, in place,
    and names no other class; one other listed word differs."""
    words = ta.normalise(caption)
    vocab = ta.vocabulary(tuple(SHAPES))
    for seed in range(10):
        negatives = ta.negative_subtexts(caption, seed, 3, SHAPES, swap_class_words=False)
        others = [w for w in words if vocab.lookup(w) is not None and not vocab.is_class_word(w)]
        assert bool(negatives) == bool(others), caption  # "two stars and a ring": only class words, no negative
        for negative in negatives:
            new = negative.split()
            assert len(new) == len(words)
            diff = [i for i, (a, b) in enumerate(zip(words, new)) if a != b]
            assert len(diff) == 1 and not vocab.is_class_word(words[diff[0]]) and not vocab.is_class_word(new[diff[0]])
