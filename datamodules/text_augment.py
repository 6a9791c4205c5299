"""Caption augmentation without downloads: EDA for CleanCLIP, positive / negative subtexts for TA-Cleaner.

EDA (Wei & Zou 2019) has four operations: synonym replacement (SR), random insertion of a synonym (RI), random
swap (RS) and random deletion (RD). The original draws synonyms from WordNet; clbd may not download a corpus at
run time, so synonyms come from a small table written for image captions: the package data files
``datamodules/word_lists/{nouns,adjectives,verbs}.txt`` (one synonym group per line, ``[category]`` headers) and
``function_words.txt`` (negations, chunk openers, auxiliaries, determiners, irregular plurals). A caption with no
word in the table still gets RS or RD.

All functions work on the normalised caption: lower case, words only (letters, digits, apostrophes), as EDA
does; open_clip's tokenizer lower-cases anyway. Every function is a pure function of its arguments.

TA-Cleaner's subtexts (rules documented in docs/defenses.md) also take the data's class names
(``class_names``), the words that carry a caption's meaning on a classification data set:

- positive subtexts are faithful parts of the caption, always a sub-sequence of its words, made by dropping
  modifiers: the caption is cut into chunks at prepositions, conjunctions, relative words and verbs
  (``a man | riding a horse | on a beach``); a positive keeps the first chunk (the subject) and drops one or more
  of the others, or drops one or all table adjectives (``a red car`` -> ``a car``); it never drops a class word.
  Captions with a negation (no, not, never, ...) get none: dropping words around a negation can turn a true
  description into a false one.
- negative subtexts are the caption with exactly one word replaced: class words first, by another class name
  (``a red circle`` -> ``a red square``, the article made to fit), then table words, by a word of the same kind
  (noun / adjective / verb) from a different synonym group, of the same category when the table has one (dog ->
  cat, red -> blue, sitting -> standing), otherwise any other group of that kind; never a synonym. An ``a`` /
  ``an`` in front of a table word constrains its replacement so the article still fits.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

KINDS = ("noun", "adj", "verb")
CLASS_CATEGORY = "class"  # the category of the data's own class names (see ``Vocabulary``)
# The word lists are data files of the package (``datamodules/word_lists/*.txt``), so they can be read and extended
# without touching code; ``# ...`` lines are comments.
WORD_LISTS = "word_lists"
_LIST_FILES = {"noun": "nouns.txt", "adj": "adjectives.txt", "verb": "verbs.txt"}


def read_word_list(name: str) -> str:
    """The text of ``datamodules/word_lists/<name>`` (package data), comments and blank lines removed."""
    text = resources.files("datamodules").joinpath(WORD_LISTS, name).read_text(encoding="utf-8")
    return "\n".join(line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


@dataclass(frozen=True)
class WordGroup:
    """A line of the table: interchangeable words of one kind and category."""

    kind: str
    category: str
    words: tuple[str, ...]


def _parse(text: str, kind: str) -> list[WordGroup]:
    """One synonym group per line; ``[category]`` lines set the category of the lines below."""
    groups: list[WordGroup] = []
    category = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            category = line.strip("[]")
            continue
        groups.append(WordGroup(kind, category, tuple(line.split())))
    return groups


def _sections(text: str) -> dict[str, list[str]]:
    """``[name]`` sections of whitespace-separated words (``function_words.txt``)."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        current.extend(line.split())
    return sections


GROUPS: tuple[WordGroup, ...] = tuple(
    group for kind in KINDS for group in _parse(read_word_list(_LIST_FILES[kind]), kind)
)
WORD_GROUP: dict[str, WordGroup] = {word: group for group in GROUPS for word in group.words}

_FUNCTION_WORDS = _sections(read_word_list("function_words.txt"))
_pairs = _FUNCTION_WORDS["irregular_plurals"]
_IRREGULAR_PLURALS = dict(zip(_pairs[0::2], _pairs[1::2]))
_IRREGULAR_SINGULARS = {plural: singular for singular, plural in _IRREGULAR_PLURALS.items()}

NEGATIONS = frozenset(_FUNCTION_WORDS["negations"])
# Words that open a new chunk of a caption (after the subject): prepositions, conjunctions, relative words.
CHUNK_OPENERS = frozenset(_FUNCTION_WORDS["chunk_openers"])
# A verb right after these stays in their chunk ("is sleeping"); after a determiner, an -ing word is a noun's
# modifier or a noun ("a wedding cake"), not a new chunk.
AUXILIARIES = frozenset(_FUNCTION_WORDS["auxiliaries"])
DETERMINERS = frozenset(_FUNCTION_WORDS["determiners"])
# "a photo of ...": a frame, not content (negatives leave it).
FRAMES = frozenset(_FUNCTION_WORDS["frames"])
_NO_VERB_CHUNK_AFTER = AUXILIARIES | DETERMINERS | CHUNK_OPENERS
_WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")


def normalise(text: str) -> list[str]:
    """The caption's words, lower case, punctuation dropped (EDA's normalisation)."""
    return _WORD.findall(text.lower())


def _singular(word: str, word_group: dict[str, WordGroup]) -> str | None:
    """The listed noun this (regular or irregular) plural stands for, or None."""
    candidates = [_IRREGULAR_SINGULARS[word]] if word in _IRREGULAR_SINGULARS else []
    if word.endswith("men"):
        candidates.append(word[:-3] + "man")
    if word.endswith("ies") and len(word) > 4:
        candidates.append(word[:-3] + "y")
    if word.endswith("es"):
        candidates.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        candidates.append(word[:-1])
    for candidate in candidates:
        group = word_group.get(candidate)
        if group is not None and group.kind == "noun":
            return candidate
    return None


def _plural(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith("man"):
        return word[:-3] + "men"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    return word + "s"


def _inflect(word: str, plural: bool) -> str:
    if " " in word:  # a class name of several words: the last one carries the number
        head, last = word.rsplit(" ", 1)
        return f"{head} {_inflect(last, plural)}"
    return _plural(word) if plural else word


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """The word table, plus the data's own class names for TA-Cleaner's subtexts.

    Each class name is a noun group of its own in category ``class`` and takes precedence over the table (with
    CIFAR-10's classes, "dog" is a class word whose replacements are the other class names, not "puppy"'s
    synonyms). A class name of several words ("teddy bear") is one unit of a caption (``units``).
    """

    class_names: tuple[str, ...] = ()
    groups: tuple[WordGroup, ...] = field(init=False)
    word_group: dict[str, WordGroup] = field(init=False)
    multi_word_names: dict[str, list[list[str]]] = field(init=False)  # first word -> names, longest first

    def __post_init__(self) -> None:
        names = tuple(dict.fromkeys(" ".join(normalise(n)) for n in self.class_names if normalise(n)))
        classes = tuple(WordGroup("noun", CLASS_CATEGORY, (name,)) for name in names)
        word_group = dict(WORD_GROUP)
        word_group.update({group.words[0]: group for group in classes})
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "groups", GROUPS + classes)
        object.__setattr__(self, "word_group", word_group)
        multi: dict[str, list[list[str]]] = {}
        for name in sorted((n.split() for n in names if " " in n), key=len, reverse=True):
            multi.setdefault(name[0], []).append(name)
        object.__setattr__(self, "multi_word_names", multi)

    def lookup(self, word: str) -> tuple[WordGroup, str, bool] | None:
        """(group, listed form, is plural) of a caption word (or class unit), or None when it is not listed."""
        group = self.word_group.get(word)
        if group is not None:
            return group, word, False
        singular = _singular(word, self.word_group)
        if singular is not None:
            return self.word_group[singular], singular, True
        return None

    def is_class_word(self, word: str) -> bool:
        found = self.lookup(word)
        return found is not None and found[0].category == CLASS_CATEGORY

    def units(self, words: list[str]) -> list[str]:
        """The caption's words with each class name of several words (singular or plural) joined into one unit."""
        out: list[str] = []
        i = 0
        while i < len(words):
            for name in self.multi_word_names.get(words[i], ()):
                k = len(name)
                span = words[i : i + k]
                if span[:-1] == name[:-1] and len(span) == k and span[-1] in (name[-1], _plural(name[-1])):
                    out.append(" ".join(span))
                    i += k
                    break
            else:
                out.append(words[i])
                i += 1
        return out


DEFAULT_VOCABULARY = Vocabulary()


@lru_cache(maxsize=16)
def vocabulary(class_names: tuple[str, ...] = ()) -> Vocabulary:
    """The table plus these class names (cached: a data module asks once per sample)."""
    return Vocabulary(tuple(class_names)) if class_names else DEFAULT_VOCABULARY


def lookup(word: str) -> tuple[WordGroup, str, bool] | None:
    """(group, table form, is plural) of a caption word, or None when the table does not list it."""
    return DEFAULT_VOCABULARY.lookup(word)


def synonyms(word: str) -> list[str]:
    """The other words of the word's synonym group, in the word's number; [] when it has none."""
    found = lookup(word)
    if found is None:
        return []
    group, base, plural = found
    return [_inflect(w, plural) for w in group.words if w != base]


# ---- EDA ------------------------------------------------------------------------------------------------------
def synonym_replacement(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Replace up to ``n`` distinct words that have synonyms with a random synonym each."""
    out = list(words)
    positions = [i for i, w in enumerate(words) if synonyms(w)]
    rng.shuffle(positions)
    for i in positions[:n]:
        out[i] = rng.choice(synonyms(words[i]))
    return out


def random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Insert, ``n`` times, a synonym of a random word (that has one) at a random position."""
    out = list(words)
    for _ in range(n):
        candidates = [w for w in out if synonyms(w)]
        if not candidates:
            break
        out.insert(rng.randrange(len(out) + 1), rng.choice(synonyms(rng.choice(candidates))))
    return out


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Swap two random positions, ``n`` times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability ``p``; at least one word goes and at least one stays (from 2 words)."""
    if len(words) < 2:
        return list(words)
    keep = [rng.random() >= p for _ in words]
    if all(keep):
        keep[rng.randrange(len(words))] = False
    if not any(keep):
        keep[rng.randrange(len(words))] = True
    return [w for w, k in zip(words, keep) if k]


def augment_caption(text: str, seed: int, alpha: float = 0.1) -> str:
    """One EDA-augmented caption: one of SR / RI / RS / RD, drawn uniformly among those that apply.

    ``alpha`` is EDA's strength: SR, RI and RS change ``max(1, alpha * words)`` words, RD drops each with
    probability ``alpha``. SR and RI need a word listed in the synonym table; without one, RS or RD. A caption
    with no word at all comes back unchanged.
    """
    words = normalise(text)
    if not words:
        return text
    rng = random.Random(seed)
    n = max(1, int(alpha * len(words)))
    operations = []
    if any(synonyms(w) for w in words):
        operations += [lambda: synonym_replacement(words, n, rng), lambda: random_insertion(words, n, rng)]
    if len(words) >= 2:
        operations += [lambda: random_swap(words, n, rng), lambda: random_deletion(words, alpha, rng)]
    if not operations:
        return " ".join(words)
    return " ".join(rng.choice(operations)())


# ---- TA-Cleaner's subtexts -------------------------------------------------------------------------------------
def _is_verb_opener(word: str, vocab: Vocabulary) -> bool:
    found = vocab.lookup(word)
    if found is not None:
        return found[0].kind == "verb"
    return word.endswith("ing") and len(word) > 5  # an -ing form the table lacks ("catching", "flipping")


def caption_chunks(words: list[str], vocab: Vocabulary = DEFAULT_VOCABULARY) -> list[list[int]]:
    """Word positions cut into chunks: a new chunk opens at a preposition / conjunction / verb after the first."""
    chunks: list[list[int]] = [[]]
    for i, word in enumerate(words):
        previous = words[i - 1] if i > 0 else None
        opens = word in CHUNK_OPENERS or (previous not in _NO_VERB_CHUNK_AFTER and _is_verb_opener(word, vocab))
        if opens and chunks[-1] and i > 0:
            chunks.append([])
        chunks[-1].append(i)
    return chunks


def _positive_candidates(words: list[str], vocab: Vocabulary) -> list[tuple[int, ...]]:
    """Sub-sequences (as kept positions) of a caption that stay true of its image: modifiers dropped, the subject
    and every class word kept."""
    if any(w in NEGATIONS or w.endswith("n't") for w in words):
        return []
    everything = tuple(range(len(words)))
    candidates: set[tuple[int, ...]] = set()
    chunks = caption_chunks(words, vocab)
    subject, rest = chunks[0], chunks[1:8]  # 7 later chunks at most: 127 subsets
    for size in range(len(rest)):
        for kept in itertools.combinations(rest, size):
            candidates.add(tuple(sorted(subject + [i for chunk in kept for i in chunk])))
    # Attributive adjectives only ("a red circle"): a predicate one ("colored red") would leave its verb dangling.
    adjectives = [
        i
        for i, w in enumerate(words)
        if (found := vocab.lookup(w)) is not None
        and found[0].kind == "adj"
        and i + 1 < len(words)
        and words[i + 1] not in CHUNK_OPENERS
    ]
    for i in adjectives:
        candidates.add(tuple(j for j in everything if j != i))
    if len(adjectives) > 1:
        candidates.add(tuple(j for j in everything if j not in adjectives))
    candidates.discard(everything)
    # What the image shows stays: a subtext that drops a class word would no longer describe it.
    class_positions = {i for i, w in enumerate(words) if vocab.is_class_word(w)}
    return sorted(c for c in candidates if c and class_positions <= set(c))


def positive_subtexts(text: str, seed: int, n: int, class_names: Sequence[str] = ()) -> list[str]:
    """Up to ``n`` distinct faithful sub-sequences of the caption (fewer when it has fewer; see the module doc).

    ``class_names``: the data's classes; a positive keeps every class word of the caption.
    """
    vocab = vocabulary(tuple(class_names))
    words = vocab.units(normalise(text))
    candidates = _positive_candidates(words, vocab)
    rng = random.Random(seed)
    chosen = rng.sample(candidates, min(n, len(candidates)))
    return [" ".join(words[i] for i in kept) for kept in chosen]


def _article_fits(previous: str | None, word: str) -> bool:
    if previous == "a":
        return word[0] not in "aeiou"
    if previous == "an":
        return word[0] in "aeiou"
    return True


def _replacements(word: str, previous: str | None, vocab: Vocabulary) -> list[str]:
    found = vocab.lookup(word)
    if found is None:
        return []
    group, _, plural = found
    others = [g for g in vocab.groups if g.kind == group.kind and g is not group]
    same_category = [g for g in others if g.category == group.category]
    if group.category == CLASS_CATEGORY:  # another class, whatever its first letter (the article is fixed after)
        return [w for w in (_inflect(g.words[0], plural) for g in same_category) if w != word]
    for pool in (same_category, [g for g in others if g.category != CLASS_CATEGORY]):
        options = [_inflect(w, plural) for g in pool for w in g.words]
        options = [w for w in options if w != word and _article_fits(previous, w)]
        if options:
            return options
    return []


def replacements(word: str, previous: str | None = None, class_names: Sequence[str] = ()) -> list[str]:
    """Words of the same kind (same category first) from other synonym groups, in the word's number; for a class
    word, the other class names."""
    return _replacements(word, previous, vocabulary(tuple(class_names)))


def _fit_article(words: list[str], i: int) -> list[str]:
    """``a`` / ``an`` in front of position ``i`` made to fit its (new) word."""
    if i > 0 and words[i - 1] in ("a", "an"):
        words[i - 1] = "an" if words[i][0] in "aeiou" else "a"
    return words


def _is_frame(words: list[str], i: int) -> bool:
    """``photo`` in ``a photo of ...``: how the caption is framed, not what the image shows."""
    return words[i] in FRAMES and i + 1 < len(words) and words[i + 1] == "of"


def negative_subtexts(
    text: str, seed: int, n: int, class_names: Sequence[str] = (), swap_class_words: bool = True
) -> list[str]:
    """Up to ``n`` distinct captions, each with exactly one listed word replaced by a non-synonym of its kind.

    With ``class_names`` (the data's classes), the caption's class words are swapped first — for another class name,
    the article in front made to fit — so the first negative of a caption that names its class says another class;
    further negatives swap the other listed words, then more class names. ``swap_class_words=False``: class words
    are never swapped (they stay class words, so no other word is swapped for a class name either); only the
    caption's other listed words (colour, size, background, ...) are.
    """
    vocab = vocabulary(tuple(class_names))
    words = vocab.units(normalise(text))
    rng = random.Random(seed)
    options = {
        i: _replacements(w, words[i - 1] if i > 0 else None, vocab)
        for i, w in enumerate(words)
        if vocab.lookup(w) is not None and not _is_frame(words, i)
    }
    class_positions = [i for i, found in options.items() if found and vocab.is_class_word(words[i])]
    if not swap_class_words:
        options = {i: found for i, found in options.items() if i not in class_positions}
        class_positions = []
    other_positions = [i for i, found in options.items() if found and i not in class_positions]
    rng.shuffle(class_positions)
    rng.shuffle(other_positions)
    positions = class_positions + other_positions
    out: list[str] = []
    for attempt in range(8 * n if positions else 0):  # a few more tries than needed: draws may repeat
        i = positions[attempt % len(positions)]
        swapped = words[:i] + [rng.choice(options[i])] + words[i + 1 :]
        if i in class_positions:
            swapped = _fit_article(swapped, i)
        negative = " ".join(swapped)
        if negative not in out:
            out.append(negative)
            if len(out) == n:
                break
    return out
