"""The built-in chat data set: small task families whose answers can be checked.

Deterministic for a seed, so the default run is reproducible without any download.
"""

import random

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a precise assistant. Answer with the result only.",
]
WORDS = (
    "apple banana cherry dragon eagle forest garden harbor island jungle kettle lemon "
    "mountain needle orange pencil quartz river sunset tiger umbrella violet window yellow "
    "zebra anchor bridge candle desert engine falcon glacier hammer insect jacket kitten "
    "ladder marble nickel ocean pepper rocket silver tunnel velvet walnut"
).split()


def _addition(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", str(a + b)


def _reverse(rng):
    word = rng.choice(WORDS)
    return f"Reverse the word '{word}'.", word[::-1]


def _sort(rng):
    numbers = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
    listed = ", ".join(map(str, numbers))
    return f"Sort in ascending order: {listed}", ", ".join(map(str, sorted(numbers)))


def _uppercase(rng):
    phrase = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
    return f"Convert to uppercase: {phrase}", phrase.upper()


def _count(rng):
    word = rng.choice(WORDS)
    return f"How many letters are in the word '{word}'?", str(len(word))


TASKS = {
    "addition": _addition,
    "reverse": _reverse,
    "sort": _sort,
    "uppercase": _uppercase,
    "count": _count,
}


def _conversation(rng, task):
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = 1 if rng.random() < 0.7 else rng.randint(2, 3)
    for _ in range(turns):
        question, answer = TASKS[task](rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def build_conversations(n, seed):
    """Return `n` rows {"messages": [...], "task": name}, cycling through the task families."""
    rng = random.Random(seed)
    names = sorted(TASKS)
    return [
        {"messages": _conversation(rng, names[i % len(names)]), "task": names[i % len(names)]}
        for i in range(n)
    ]
