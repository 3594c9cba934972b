"""Offline long-context probes, generated from a seed: passkey retrieval (landmark-attention's prompt).

Every sample is a dict with `prompt` (text), `answer` (the string to find) and `length` (the target length in
tokens). Prompts are sized with the evaluated model's tokenizer, so "1k" means about 1,024 of *its* tokens.
"""

import itertools
import random
import uuid

from .scoring import passkey_score

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(key: int, n_filler: int, depth: float) -> str:
    """The passkey prompt with `n_filler` filler sentences-groups and the needle at relative `depth` in [0, 1]."""
    before = round(n_filler * depth)
    lines = [PASSKEY_INTRO, " ".join([PASSKEY_FILLER] * before), PASSKEY_NEEDLE.format(key=key)]
    lines += [" ".join([PASSKEY_FILLER] * (n_filler - before)), PASSKEY_QUESTION]
    return "\n".join(line for line in lines if line)


def filler_count_for_length(tokenizer, length: int) -> int:
    """How many filler groups make a passkey prompt of about `length` tokens for this tokenizer."""
    base = len(tokenizer(passkey_prompt(12345, 0, 0.0))["input_ids"])
    per_filler = len(tokenizer(" ".join([PASSKEY_FILLER] * 16))["input_ids"]) / 16
    return max(int((length - base) / per_filler), 1)


def passkey_samples(tokenizer, length: int, num_samples: int, seed: int = 0) -> list[dict]:
    """`num_samples` passkey prompts of about `length` tokens, needle depths spread evenly over the context."""
    if num_samples <= 0:
        raise ValueError(f"num_samples = {num_samples}: expected a positive count.")
    if length < 64:
        raise ValueError(f"length = {length}: a passkey prompt needs at least 64 tokens.")
    rng = random.Random(f"passkey-{length}-{seed}")
    n_filler = filler_count_for_length(tokenizer, length)
    samples = []
    for i in range(num_samples):
        key = rng.randint(1, 50000)
        depth = i / max(num_samples - 1, 1)
        samples.append({"prompt": passkey_prompt(key, n_filler, depth), "answer": str(key), "length": length, "depth": depth})
    return samples


def passkey_correct(generation: str, answer: str) -> bool:
    """The first number in the generation equals the key (landmark-attention's scoring)."""
    return passkey_score(generation, [answer]) == 100.0


# ---------------------------------------------------------------------------------------------------------------
# RULER-style tasks (NVIDIA RULER's templates and scoring; haystacks and word lists are our own, generated offline)
# ---------------------------------------------------------------------------------------------------------------

ADJECTIVES = (
    "able", "acid", "aged", "airy", "amber", "ample", "azure", "bald", "basic", "bold", "brave", "brief", "brisk",
    "broad", "calm", "cheap", "civil", "clean", "clever", "cold", "cosy", "crisp", "curly", "damp", "dark", "deep",
    "dense", "dizzy", "dry", "dull", "eager", "early", "empty", "equal", "faint", "fancy", "fast", "fierce", "firm",
    "flat", "fond", "free", "fresh", "gentle", "giant", "glad", "golden", "grand", "green", "grim", "happy", "hard",
    "hasty", "heavy", "hollow", "honest", "huge", "humble", "icy", "ideal", "idle", "jolly", "keen", "kind", "large",
    "late", "lazy", "lean", "light", "little", "lively", "loud", "lucky", "mellow", "mild", "misty", "modern", "moist",
    "narrow", "neat", "noble", "odd", "pale", "plain", "polite", "proud", "quick", "quiet", "rapid", "rare", "rich",
    "rough", "round", "royal", "rusty", "salty", "sharp", "shiny", "silent", "silly", "slow", "smooth", "soft",
    "solid", "sour", "spicy", "steady", "steep", "stiff", "strong", "sunny", "sweet", "swift", "tall", "tame", "tidy",
    "tiny", "tough", "vast", "vivid", "warm", "weary", "wide", "wild", "wise", "witty", "young", "zesty",
)
NOUNS = (
    "anchor", "apple", "arrow", "badge", "basket", "beacon", "bell", "blanket", "bottle", "bridge", "brush", "bucket",
    "button", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cellar", "chair", "cherry", "circle", "cloud",
    "coast", "comet", "copper", "cotton", "crater", "crown", "desert", "diamond", "dolphin", "donkey", "drum", "eagle",
    "engine", "falcon", "feather", "fence", "finger", "forest", "fossil", "fountain", "garden", "glacier", "glove",
    "harbor", "hammer", "helmet", "island", "jacket", "jungle", "kettle", "ladder", "lantern", "lemon", "library",
    "lizard", "magnet", "marble", "meadow", "mirror", "monkey", "needle", "oyster", "paddle", "palace", "parrot",
    "pencil", "pepper", "piano", "pillow", "planet", "pocket", "pony", "puzzle", "rabbit", "river", "rocket", "saddle",
    "salmon", "shadow", "silver", "spider", "spoon", "statue", "stone", "street", "sunset", "table", "teapot",
    "thunder", "ticket", "tiger", "tomato", "tower", "trumpet", "tunnel", "turtle", "valley", "velvet", "village",
    "violin", "wagon", "walnut", "window", "wizard", "wolf", "yacht", "zebra",
)
# RULER's noise haystack is the passkey filler, one group per line
NOISE_LINE = PASSKEY_FILLER

NIAH_NEEDLE = "One of the special magic {type_value} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {type_value} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_value} afterwards.\n{context}\n"
    "What are all the special magic {type_value} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_value} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

# tokens reserved for the answer, per task (RULER's tokens_to_generate)
TOKENS_TO_GENERATE = {"passkey": 10, "niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "mqar": 8}


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _number_value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _pseudo_words(rng: random.Random, count: int, syllables: int = 3) -> list[str]:
    """`count` distinct pronounceable made-up words (consonant-vowel syllables), for the word-frequency tasks."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit(tokenizer, build, budget: int, start: int) -> tuple[str, int]:
    """The largest haystack size n (>= 1) with `build(n)` within `budget` tokens; `build` is deterministic in n.

    Grows or shrinks from the estimate `start` geometrically, then bisects, so a 32k-token prompt costs about
    a dozen tokenizations.
    """
    def fits(n):
        return _n_tokens(tokenizer, build(n)) <= budget

    lo, hi = 0, max(start, 1)
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if lo == 0:
        raise ValueError(f"This task's question and needles do not fit in {budget} tokens (the length minus the answer "
                         "budget): the length is too short for this task, pass a longer one.")
    return build(lo), lo


def _insert(lines: list[str], items: list[str], rng: random.Random) -> list[str]:
    """`items` placed at random positions among `lines` (relative order of `items` kept)."""
    positions = sorted(rng.randint(0, len(lines)) for _ in items)
    out, previous = [], 0
    for position, item in zip(positions, items):
        out += lines[previous:position] + [item]
        previous = position
    return out + lines[previous:]


def niah_sample(
    tokenizer, length: int, rng: random.Random, *, haystack: str = "noise", key_kind: str = "words",
    value_kind: str = "numbers", num_keys: int = 1, num_values: int = 1, num_queries: int = 1,
) -> dict:
    """One RULER needle-in-a-haystack sample of at most `length` tokens including the answer budget.

    haystack: "noise" (the passkey filler, one group per line) or "needle" (distractor needles with other keys).
    num_keys: needles written (distinct keys); num_values: values per queried key; num_queries: keys asked for.
    """
    if num_queries > num_keys:
        raise ValueError(f"num_queries = {num_queries} cannot exceed num_keys = {num_keys}.")
    make_key = _uuid if key_kind == "uuids" else _word_key
    make_value = {"numbers": _number_value, "uuids": _uuid}[value_kind]
    keys: list[str] = []
    while len(keys) < num_keys:
        key = make_key(rng)
        if key not in keys:
            keys.append(key)
    values = [[make_value(rng) for _ in range(num_values)] for _ in keys]
    queried = rng.sample(range(num_keys), num_queries)
    type_value = "numbers" if value_kind == "numbers" else "uuids"
    singular = num_queries * num_values == 1
    if singular:
        type_value = type_value[:-1]
    needles = [NIAH_NEEDLE.format(type_value=type_value, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    query = ", ".join(keys[i] for i in queried[:-1]) + (" and " if num_queries > 1 else "") + keys[queried[-1]]
    template, answer_prefix = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX
    if singular:
        template = template.replace("Some special magic", "A special magic").replace("are all", "is")
        template = template.replace("are hidden", "is hidden")
        answer_prefix = answer_prefix.replace(" are", " is")
    layout_seed = rng.random()
    if haystack == "noise":
        def build(n):
            lines = _insert([NOISE_LINE] * n, needles, random.Random(layout_seed))
            return template.format(type_value=type_value, context="\n".join(lines), query=query)
    elif haystack == "needle":
        distractor_rng = random.Random(layout_seed)
        distractors = []

        def build(n):
            while len(distractors) < n:
                key = make_key(distractor_rng)
                if key not in keys:
                    distractors.append(NIAH_NEEDLE.format(type_value=type_value, key=key, value=make_value(distractor_rng)))
            lines = _insert(distractors[:n], needles, random.Random(layout_seed))
            return template.format(type_value=type_value, context="\n".join(lines), query=query)
    else:
        raise ValueError(f"haystack = {haystack!r}: expected 'noise' or 'needle'.")
    budget = length - TOKENS_TO_GENERATE["niah"] - _n_tokens(tokenizer, answer_prefix.format(type_value=type_value, query=query))
    prompt, _ = _fit(tokenizer, build, budget, start=max(budget // 24, 1))
    answers = [v for i in queried for v in values[i]]
    return {"prompt": prompt + answer_prefix.format(type_value=type_value, query=query), "answers": answers,
            "length": length}


def variable_tracking_sample(tokenizer, length: int, rng: random.Random, num_chains: int = 1, num_hops: int = 4) -> dict:
    """RULER's variable tracking: `VAR A = 12345`, then `VAR B = VAR A` ... hidden in noise; name every variable."""
    names: set[str] = set()
    while len(names) < num_chains * (num_hops + 1):
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    names_list = sorted(names)
    rng.shuffle(names_list)
    chains, statements = [], []
    for c in range(num_chains):
        chain = names_list[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        value = str(rng.randint(10000, 99999))
        chains.append((chain, value))
        statements.append([f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain)])
    chain, value = chains[0]
    # the chains interleave, each keeping its own order
    ordered = [s for group in zip(*statements) for s in group]
    layout_seed = rng.random()

    def build(n):
        lines = _insert([NOISE_LINE] * n, ordered, random.Random(layout_seed))
        return VT_TEMPLATE.format(context="\n".join(lines), query=value)

    answer_prefix = VT_ANSWER_PREFIX.format(num_v=num_hops + 1, query=value)
    budget = length - TOKENS_TO_GENERATE["vt"] - _n_tokens(tokenizer, answer_prefix)
    prompt, _ = _fit(tokenizer, build, budget, start=max(budget // 24, 1))
    return {"prompt": prompt + answer_prefix, "answers": chain, "length": length}


def common_words_sample(tokenizer, length: int, rng: random.Random, num_common: int = 10,
                        common_repeats: tuple[int, ...] = (30, 20, 10, 6), other_repeats: int = 3) -> dict:
    """RULER's common word extraction: a numbered word list; 10 words appear 30 times, the others 3 times.

    Where 10 x 30 entries do not fit in the length, the common words appear 20, 10 or 6 times instead (always more
    often than the others); the sample records the count used.
    """
    vocabulary = _pseudo_words(random.Random(rng.random()), 4096 + num_common)
    rng.shuffle(vocabulary)
    common, others = vocabulary[:num_common], vocabulary[num_common:]
    layout_seed = rng.random()
    budget = length - TOKENS_TO_GENERATE["cwe"] - _n_tokens(tokenizer, CWE_ANSWER_PREFIX)
    for repeats in common_repeats:
        def build(n, repeats=repeats):
            if n > len(others):
                raise ValueError(f"length = {length}: longer than the common-words vocabulary allows.")
            words = common * repeats + others[:n] * other_repeats
            random.Random(layout_seed).shuffle(words)
            return CWE_TEMPLATE.format(context=" ".join(f"{i + 1}. {w}" for i, w in enumerate(words)))

        if _n_tokens(tokenizer, build(1)) <= budget:
            prompt, _ = _fit(tokenizer, build, budget, start=max(budget // 30, 1))
            return {"prompt": prompt + CWE_ANSWER_PREFIX, "answers": common, "length": length, "common_repeats": repeats}
    raise ValueError(f"length = {length}: too short for the common-words task, pass a longer one.")


def frequent_words_sample(tokenizer, length: int, rng: random.Random, alpha: float = 2.0, vocab_size: int = 1000,
                          num_answers: int = 3) -> dict:
    """RULER's frequent word extraction: coded words drawn with Zipf frequencies (alpha = 2); name the top three."""
    vocabulary = _pseudo_words(random.Random(rng.random()), vocab_size, syllables=3)
    rng.shuffle(vocabulary)  # Zipf ranks in random order, not alphabetical
    weights = [1.0 / (rank + 1) ** alpha for rank in range(vocab_size)]
    draw_seed = rng.random()

    def words(n):
        draw = random.Random(draw_seed)
        return draw.choices(vocabulary, weights=weights, k=n)

    def build(n):
        return FWE_TEMPLATE.format(context=" ".join(words(n)))

    budget = length - TOKENS_TO_GENERATE["fwe"] - _n_tokens(tokenizer, FWE_ANSWER_PREFIX)
    prompt, n = _fit(tokenizer, build, budget, start=max(budget // 3, 1))
    counts: dict[str, int] = {}
    for w in words(n):
        counts[w] = counts.get(w, 0) + 1
    # ties broken by rank in the Zipf order, which is also what the draw favours
    answers = sorted(counts, key=lambda w: (-counts[w], vocabulary.index(w)))[:num_answers]
    return {"prompt": prompt + FWE_ANSWER_PREFIX, "answers": answers, "length": length}


def mqar_samples(tokenizer, length: int, rng: random.Random, num_queries: int = 4) -> list[dict]:
    """Multi-query associative recall in words: `key: value` pairs fill the context, then each key is asked once.

    Zoology's MQAR on token ids, written as text so that any tokenizer works: one context, `num_queries` queries
    (one document each, sharing the context); the answer is scored as a greedy continuation (`acc`).
    """
    pair_rng = random.Random(rng.random())
    pairs: dict[str, str] = {}

    def build(n):
        while len(pairs) < n:
            key = _word_key(pair_rng)
            if key not in pairs:
                pairs[key] = str(pair_rng.randint(100, 999))
        items = list(pairs.items())[:n]
        return "Remember the number paired with each key.\n" + "\n".join(f"{k}: {v}" for k, v in items)

    budget = length - TOKENS_TO_GENERATE["mqar"] - 16
    context, n = _fit(tokenizer, build, budget, start=max(budget // 8, 1))
    items = list(pairs.items())[:n]
    asked = rng.sample(items, min(num_queries, n))
    return [{"prompt": f"{context}\nQuestion: which number goes with {k}?\n{k}:", "answers": [f" {v}"],
             "length": length} for k, v in asked]
