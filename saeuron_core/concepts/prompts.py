"""Prompt sets for a concept given as one word or phrase, built from templates the way SAeUron builds its
UnlearnCanvas prompts: the concept across many subjects (a style) or many styles (an object) with it, and the same
prompts with the concept swapped for the vocabulary's other styles or subjects, plus the plain prompts, without it."""

from __future__ import annotations

from dataclasses import dataclass
from string import Formatter
from typing import Iterable

from ..errors import ConfigError

KINDS = ("style", "object", "other")


@dataclass(frozen=True)
class Vocabulary:
    """Subjects and styles to build prompts from; ``template`` names both (``{subject}``, ``{style}``), ``plain``
    is the prompt of a subject without a style."""

    subjects: tuple[str, ...]
    styles: tuple[str, ...]
    template: str = "a {subject} in {style} style"
    plain: str = "a {subject}"

    def __post_init__(self) -> None:
        for field in ("subjects", "styles"):
            words = tuple(getattr(self, field))
            if not words or any(not isinstance(w, str) or not w.strip() for w in words):
                raise ConfigError(f"a vocabulary needs a non-empty list of {field}, none of them blank")
            object.__setattr__(self, field, words)
        if _fields(self.template) != {"subject", "style"}:
            raise ConfigError(f"a vocabulary's template must name {{subject}} and {{style}} (and nothing else), "
                              f"got {self.template!r}")
        if _fields(self.plain) != {"subject"}:
            raise ConfigError(f"a vocabulary's plain prompt must name {{subject}} only, got {self.plain!r}")

    def prompt(self, subject: str, style: str) -> str:
        """The template filled with ``subject`` and ``style``."""
        return self.template.format(subject=subject, style=style)


def _fields(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    except ValueError:
        return set()


GENERIC = Vocabulary(
    subjects=("dog", "cat", "horse", "bird", "fish", "lion", "tiger", "bear", "rabbit", "fox", "man", "woman",
              "child", "girl", "boy", "house", "castle", "bridge", "tree", "flower", "mountain", "lake", "river",
              "city street", "car", "bicycle", "boat", "ship", "train", "cup of coffee", "bowl of fruit", "chair"),
    styles=("Van Gogh", "Picasso", "Monet", "Rembrandt", "Salvador Dali", "Andy Warhol", "Hokusai", "Klimt",
            "Edvard Munch", "Frida Kahlo", "watercolor", "oil painting", "pencil sketch", "charcoal drawing",
            "ink wash", "pixel art", "cartoon", "anime", "comic book", "pop art", "cubist", "impressionist",
            "art nouveau", "baroque", "ukiyo-e", "low poly", "mosaic", "stained glass"),
)


def prompts_from_word(word: str, kind: str, vocabulary: Vocabulary = GENERIC) -> tuple[list[str], list[str]]:
    """``(positive, negative)`` prompts for the concept ``word`` of ``kind`` (``style``, ``object`` or ``other``).

    A style goes across every subject, an object across every style; the negatives are the same prompts with the
    word swapped for the vocabulary's other styles (or subjects) in turn, then plain prompts (``a {subject}``).
    ``other``: the word both as a subject across the styles and as a style across the subjects, and the same
    prompts with the vocabulary's own words. Deterministic; the word itself never serves as an alternative.
    """
    if not isinstance(word, str) or not word.strip():
        raise ConfigError("a concept word needs a non-empty word or phrase")
    if kind not in KINDS:
        raise ConfigError(f"unknown concept kind {kind!r}; the kinds are {', '.join(KINDS)}")
    word, v = " ".join(word.split()), vocabulary
    subjects, styles = _others(v.subjects, word), _others(v.styles, word)
    if not subjects or not styles:
        raise ConfigError(f"the vocabulary has no alternatives to {word!r}")
    positive: list[str] = []
    negative: list[str] = []
    if kind in ("style", "other"):
        positive += [v.prompt(s, word) for s in subjects]
        negative += [v.prompt(s, styles[i % len(styles)]) for i, s in enumerate(subjects)]
    if kind in ("object", "other"):
        positive += [v.prompt(word, s) for s in styles]
        negative += [v.prompt(subjects[i % len(subjects)], s) for i, s in enumerate(styles)]
    if kind == "style":
        negative += [v.plain.format(subject=s) for s in subjects]
    elif kind == "object":
        negative += [v.plain.format(subject=subjects[i % len(subjects)]) for i in range(len(styles))]
    return _unique(positive), _unique(n for n in negative if n not in positive)


def _others(words: tuple[str, ...], word: str) -> list[str]:
    return [w for w in words if w.casefold() != word.casefold()]


def _unique(prompts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(prompts))
