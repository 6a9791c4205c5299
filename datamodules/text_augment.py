"""Caption augmentation without downloads: EDA for CleanCLIP, positive / negative subtexts for TA-Cleaner.

EDA (Wei & Zou 2019) has four operations: synonym replacement (SR), random insertion of a synonym (RI), random
swap (RS) and random deletion (RD). The original draws synonyms from WordNet; clbd may not download a corpus at
run time, so synonyms come from a small table written for image captions (below: nouns, adjectives, verbs in
the forms captions use). A caption with no word in the table still gets RS or RD.

All functions work on the normalised caption: lower case, words only (letters, digits, apostrophes), as EDA
does; open_clip's tokenizer lower-cases anyway. Every function is a pure function of (text, seed).

TA-Cleaner's subtexts (rules documented in docs/defenses.md):

- positive subtexts are faithful parts of the caption, always a sub-sequence of its words: the caption is cut
  into chunks at prepositions, conjunctions, relative words and verbs (``a man | riding a horse | on a beach``);
  a positive keeps the first chunk (the subject) and drops one or more of the others, or drops one or all
  table adjectives (``a red car`` -> ``a car``). Captions with a negation (no, not, never, ...) get none: dropping
  words around a negation can turn a true description into a false one.
- negative subtexts are the caption with exactly one table word replaced by a word of the same kind (noun /
  adjective / verb) from a different synonym group, of the same category when the table has one (dog -> cat,
  red -> blue, sitting -> standing), otherwise any other group of that kind; never a synonym. An ``a`` / ``an``
  in front of the word constrains the replacement so the article still fits.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

KINDS = ("noun", "adj", "verb")

# One synonym group per line (the words of a line are interchangeable in a caption); ``[category]`` lines group
# the lines for hard negatives. A line with one word has no synonym: it only serves negatives.
_NOUNS = """
[person]
man guy gentleman fellow
woman lady
boy lad
girl lass
child kid youngster
baby infant toddler
person individual
player athlete
skier
surfer
skateboarder skater
chef cook
doctor physician
policeman officer cop
soldier trooper
[animal]
dog puppy pup pooch hound canine
cat kitten kitty feline
horse pony stallion mare
cow cattle bull calf
sheep lamb ewe
bird songbird
duck duckling
goose
pigeon dove
elephant
giraffe
zebra
bear grizzly
lion
tiger
monkey ape chimp
fish
rabbit bunny
mouse rodent
[vehicle]
car automobile auto sedan
truck lorry pickup
bus coach
motorcycle motorbike
bicycle bike cycle
train locomotive
airplane plane aircraft jet airliner
boat ship vessel
van minivan
taxi cab
tractor
[food]
pizza
sandwich
burger hamburger cheeseburger
cake cupcake
donut doughnut
banana
apple
orange tangerine
broccoli
carrot
hotdog frankfurter
salad
soup broth
bread loaf
meal dish
coffee espresso
tea
drink beverage
vegetable veggie
fruit
[furniture]
table desk
chair seat stool
couch sofa
bed
bench
shelf bookshelf
cabinet cupboard
[room]
kitchen kitchenette
bathroom restroom washroom
bedroom
office workspace
room chamber
lounge
[place]
street road avenue
sidewalk pavement walkway
city town
building structure
house home residence
park playground
field meadow pasture
beach shore seashore
forest woods woodland
mountain hill peak
river stream creek
lake pond
ocean sea
sky
snow
grass lawn turf
airport airfield
station depot
market bazaar
restaurant diner cafe
store shop
[object]
phone cellphone smartphone telephone
laptop notebook computer
television tv
clock timepiece
umbrella parasol
kite
ball
frisbee
skateboard
surfboard
racket racquet
bat
book novel
cup mug
bottle flask
bowl basin
plate saucer
knife blade
fork
spoon
vase urn
toilet commode
sink washbasin
oven stove
refrigerator fridge
bag purse handbag
suitcase luggage
backpack rucksack knapsack
sign signboard
light lamp lantern
window pane
door doorway gate
fence railing
pole post
tree
flower blossom bloom
picture photo photograph image
toy plaything
teddy
[clothing]
shirt tee blouse
hat cap
jacket coat
dress gown
shoe sneaker boot
tie necktie
helmet
uniform outfit costume
"""

_ADJECTIVES = """
[colour]
red crimson scarlet
blue azure
green
yellow
white
black
brown
purple violet
pink
grey gray
[size]
big large huge giant enormous
small little tiny mini
tall high
short low
long lengthy
wide broad
narrow thin slim
[age]
old aged elderly ancient
young youthful
new brand-new
modern contemporary
[condition]
empty vacant
full filled packed
clean spotless tidy
dirty messy filthy
wet damp soaked
dry parched
open
closed shut
broken damaged
[mood]
happy cheerful glad
sad unhappy gloomy
angry mad furious
calm peaceful quiet
busy crowded
[look]
beautiful pretty lovely gorgeous
ugly unattractive
colorful colourful vibrant
bright shiny
dark dim shadowy
[texture]
wooden timber
metal metallic steel
plastic
stone rocky
soft fluffy
hard solid
[weather]
sunny sunlit
cloudy overcast
rainy
snowy snowcovered
foggy misty hazy
[speed]
fast quick speedy rapid
slow sluggish
"""

_VERBS = """
[posture]
sitting seated perched
standing
lying laying resting
leaning
kneeling
[motion]
walking strolling
running jogging sprinting racing
flying soaring
swimming
riding
driving
jumping leaping
climbing
skiing
surfing
skating skateboarding
crossing
[action]
holding gripping grasping clutching
eating munching
drinking sipping
looking gazing staring peering
watching viewing observing
playing
talking chatting speaking
using
carrying hauling
wearing
throwing tossing
catching
cutting slicing chopping
cooking preparing
reading
waiting
sleeping napping dozing
smiling grinning
laughing giggling
posing
pulling dragging towing
pushing shoving
"""


@dataclass(frozen=True)
class WordGroup:
    """A line of the table: interchangeable words of one kind and category."""

    kind: str
    category: str
    words: tuple[str, ...]


def _parse(text: str, kind: str) -> list[WordGroup]:
    groups: list[WordGroup] = []
    category = ""
    for line in text.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("["):
            category = line.strip("[]")
            continue
        groups.append(WordGroup(kind, category, tuple(line.split())))
    return groups


GROUPS: tuple[WordGroup, ...] = tuple(_parse(_NOUNS, "noun") + _parse(_ADJECTIVES, "adj") + _parse(_VERBS, "verb"))
WORD_GROUP: dict[str, WordGroup] = {word: group for group in GROUPS for word in group.words}

_IRREGULAR_PLURALS = {
    "child": "children",
    "person": "people",
    "mouse": "mice",
    "goose": "geese",
    "knife": "knives",
    "shelf": "shelves",
    "loaf": "loaves",
    "tomato": "tomatoes",
    "potato": "potatoes",
    "fish": "fish",
    "sheep": "sheep",
}
_IRREGULAR_SINGULARS = {plural: singular for singular, plural in _IRREGULAR_PLURALS.items()}

NEGATIONS = frozenset({"no", "not", "never", "nothing", "none", "nobody", "without", "neither", "nor"})
# Words that open a new chunk of a caption (after the subject): prepositions, conjunctions, relative words.
CHUNK_OPENERS = frozenset(
    """on in at with near by under over behind beside besides next inside outside above below across along
    through into onto from around between against toward towards for during while and or but that which who
    whose where when as is are has have""".split()
)
# A verb right after these stays in their chunk ("is sleeping"); after a determiner, an -ing word is a noun's
# modifier or a noun ("a wedding cake"), not a new chunk.
AUXILIARIES = frozenset({"is", "are", "was", "were", "has", "have", "being"})
DETERMINERS = frozenset(
    "a an the this that these those some any his her their its my our your one two three four five several many".split()
)
_NO_VERB_CHUNK_AFTER = AUXILIARIES | DETERMINERS | CHUNK_OPENERS
_WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")


def normalise(text: str) -> list[str]:
    """The caption's words, lower case, punctuation dropped (EDA's normalisation)."""
    return _WORD.findall(text.lower())


def _singular(word: str) -> str | None:
    """The table noun this (regular or irregular) plural stands for, or None."""
    if word in _IRREGULAR_SINGULARS:
        return _IRREGULAR_SINGULARS[word]
    candidates = [word[:-3] + "man"] if word.endswith("men") else []
    if word.endswith("ies") and len(word) > 4:
        candidates.append(word[:-3] + "y")
    if word.endswith("es"):
        candidates.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        candidates.append(word[:-1])
    for candidate in candidates:
        group = WORD_GROUP.get(candidate)
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


def lookup(word: str) -> tuple[WordGroup, str, bool] | None:
    """(group, table form, is plural) of a caption word, or None when the table does not list it."""
    group = WORD_GROUP.get(word)
    if group is not None:
        return group, word, False
    singular = _singular(word)
    if singular is not None:
        return WORD_GROUP[singular], singular, True
    return None


def _inflect(word: str, plural: bool) -> str:
    return _plural(word) if plural else word


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
def _is_verb_opener(word: str) -> bool:
    found = lookup(word)
    if found is not None:
        return found[0].kind == "verb"
    return word.endswith("ing") and len(word) > 5  # an -ing form the table lacks ("catching", "flipping")


def caption_chunks(words: list[str]) -> list[list[int]]:
    """Word positions cut into chunks: a new chunk opens at a preposition / conjunction / verb after the first."""
    chunks: list[list[int]] = [[]]
    for i, word in enumerate(words):
        previous = words[i - 1] if i > 0 else None
        opens = word in CHUNK_OPENERS or (previous not in _NO_VERB_CHUNK_AFTER and _is_verb_opener(word))
        if opens and chunks[-1] and i > 0:
            chunks.append([])
        chunks[-1].append(i)
    return chunks


def _positive_candidates(words: list[str]) -> list[tuple[int, ...]]:
    """Sub-sequences (as kept positions) of a caption that stay true of its image."""
    if any(w in NEGATIONS or w.endswith("n't") for w in words):
        return []
    everything = tuple(range(len(words)))
    candidates: set[tuple[int, ...]] = set()
    chunks = caption_chunks(words)
    subject, rest = chunks[0], chunks[1:8]  # 7 later chunks at most: 127 subsets
    for size in range(len(rest)):
        for kept in itertools.combinations(rest, size):
            candidates.add(tuple(sorted(subject + [i for chunk in kept for i in chunk])))
    adjectives = [i for i, w in enumerate(words) if (found := lookup(w)) is not None and found[0].kind == "adj"]
    for i in adjectives:
        candidates.add(tuple(j for j in everything if j != i))
    if len(adjectives) > 1:
        candidates.add(tuple(j for j in everything if j not in adjectives))
    candidates.discard(everything)
    return sorted(c for c in candidates if c)


def positive_subtexts(text: str, seed: int, n: int) -> list[str]:
    """Up to ``n`` distinct faithful sub-sequences of the caption (fewer when it has fewer; see the module doc)."""
    words = normalise(text)
    candidates = _positive_candidates(words)
    rng = random.Random(seed)
    chosen = rng.sample(candidates, min(n, len(candidates)))
    return [" ".join(words[i] for i in kept) for kept in chosen]


def _article_fits(previous: str | None, word: str) -> bool:
    if previous == "a":
        return word[0] not in "aeiou"
    if previous == "an":
        return word[0] in "aeiou"
    return True


def replacements(word: str, previous: str | None = None) -> list[str]:
    """Words of the same kind (same category first) from other synonym groups, in the word's number."""
    found = lookup(word)
    if found is None:
        return []
    group, _, plural = found
    others = [g for g in GROUPS if g.kind == group.kind and g is not group]
    same_category = [g for g in others if g.category == group.category]
    for pool in (same_category, others):
        options = [_inflect(w, plural) for g in pool for w in g.words]
        options = [w for w in options if w != word and _article_fits(previous, w)]
        if options:
            return options
    return []


def negative_subtexts(text: str, seed: int, n: int) -> list[str]:
    """Up to ``n`` distinct captions, each with exactly one table word replaced by a non-synonym of its kind."""
    words = normalise(text)
    rng = random.Random(seed)
    options = {
        i: replacements(w, words[i - 1] if i > 0 else None) for i, w in enumerate(words) if lookup(w) is not None
    }
    positions = [i for i, found in options.items() if found]
    rng.shuffle(positions)
    out: list[str] = []
    for attempt in range(8 * n if positions else 0):  # a few more tries than needed: draws may repeat
        i = positions[attempt % len(positions)]
        negative = " ".join(words[:i] + [rng.choice(options[i])] + words[i + 1 :])
        if negative not in out:
            out.append(negative)
            if len(out) == n:
                break
    return out
