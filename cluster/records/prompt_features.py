"""Privacy-conscious features of a prompt: what drift detection compares, never the text.

The ingress computes them for served prompts (when the request log's `prompt_features` is on)
and the training job for its training prompts (registered beside the adapter as
`cluster.records.lineage.TRAINING_PROFILE_FILE`), with this one function: both sides measured alike.

- Scalars: sizes and character mix (the "token statistics" are word-level: the ingress holds no
  tokenizer, and the engine's token count includes the chat template, which training prompts
  lack).
- A sketch: signed feature hashing (CRC-32) of the lower-cased words and character trigrams of
  the first `SKETCH_MAX_WORDS` words into `SKETCH_DIM` buckets, L2-normalised. It summarises what
  a prompt is about (the small embedding models on PyPI fetch their weights from a model hub,
  which is out of reach here); 64 buckets of colliding hashes cannot be read back into text,
  though a very short prompt's words can be guessed by hashing candidates: keep the log as
  private as the traffic.

What they cost the ingress per answer: `python scripts/bench_request_log.py` (docs/GOVERNANCE.md
has the table).
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

SKETCH_DIM = 64
# The sketch reads a prompt's first this many words: the ingress computes it on its event loop,
# where the contract's largest prompt would otherwise cost tens of milliseconds.
SKETCH_MAX_WORDS = 512
FEATURES_VERSION = 1  # of how features are computed: logs and profiles of another are not compared
PROFILE_MAX_PROMPTS = 2000  # a training profile keeps at most this many (a seeded sample)
SCALAR_FEATURES = (
    "chars",
    "words",
    "mean_word_chars",
    "distinct_word_ratio",
    "digit_fraction",
    "upper_fraction",
    "punctuation_fraction",
    "non_ascii_fraction",
)
WORD = re.compile(r"\w+", re.UNICODE)
PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class PromptFeatures:
    scalars: dict[str, float]
    sketch: tuple[float, ...]

    def to_json(self) -> dict:
        return {
            "v": FEATURES_VERSION,
            "scalars": {k: round(v, 4) for k, v in self.scalars.items()},
            "sketch": [round(x, 4) for x in self.sketch],
        }

    @classmethod
    def from_json(cls, data: dict) -> PromptFeatures:
        """Raises ValueError (or KeyError, TypeError) for features of another version or shape."""
        if data.get("v") != FEATURES_VERSION or len(data["sketch"]) != SKETCH_DIM:
            raise ValueError(f"features of version {data.get('v')}, not {FEATURES_VERSION}")
        return cls(
            {k: float(data["scalars"][k]) for k in SCALAR_FEATURES},
            tuple(float(x) for x in data["sketch"]),
        )


def prompt_text(messages: Iterable[dict]) -> str:
    """What a chat prompt asks: its user messages' text, one per line (a content given as parts
    contributes its text parts). System prompts are left out: they are the application's, set
    per deployment, and would make a changed system prompt look like drifted traffic."""
    texts = []
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if isinstance(content, str):
            texts.append(content)
    return "\n".join(texts)


def _bucket(token: str) -> tuple[int, float]:
    value = zlib.crc32(token.encode())  # stable across processes, unlike hash()
    return value % SKETCH_DIM, 1.0 if value >> 31 else -1.0


def _sketch(words: list[str]) -> tuple[float, ...]:
    vector = [0.0] * SKETCH_DIM
    for word in words[:SKETCH_MAX_WORDS]:
        grams = [f"w:{word}"] + [f"c:{word[i : i + 3]}" for i in range(max(len(word) - 2, 0))]
        for gram in grams:
            index, sign = _bucket(gram)
            vector[index] += sign
    norm = math.sqrt(sum(x * x for x in vector))
    return tuple(x / norm for x in vector) if norm else tuple(vector)


def prompt_features(text: str) -> PromptFeatures:
    words = [w.lower() for w in WORD.findall(text)]
    counts = Counter(text)  # one pass in C; the tests below run per distinct character
    chars = len(text) or 1  # fractions of an empty prompt are 0, not NaN

    def fraction(test) -> float:
        return sum(n for c, n in counts.items() if test(c)) / chars

    scalars = {
        "chars": float(len(text)),
        "words": float(len(words)),
        "mean_word_chars": sum(map(len, words)) / len(words) if words else 0.0,
        "distinct_word_ratio": len(set(words)) / len(words) if words else 0.0,
        "digit_fraction": fraction(str.isdigit),
        "upper_fraction": fraction(str.isupper),
        "punctuation_fraction": fraction(PUNCTUATION.__contains__),
        "non_ascii_fraction": fraction(lambda c: ord(c) > 127),
    }
    return PromptFeatures(scalars, _sketch(words))


def training_profile(prompts: list[str], seed: int = 0) -> str:
    """The JSON registered as a version's training profile: features of (a seeded sample of at
    most PROFILE_MAX_PROMPTS of) its training prompts."""
    if len(prompts) > PROFILE_MAX_PROMPTS:
        prompts = random.Random(seed).sample(prompts, PROFILE_MAX_PROMPTS)
    features = [prompt_features(p).to_json() for p in prompts]
    return json.dumps({"v": FEATURES_VERSION, "prompts": len(features), "features": features})


def read_profile(text: str) -> list[PromptFeatures]:
    return [PromptFeatures.from_json(f) for f in json.loads(text)["features"]]
