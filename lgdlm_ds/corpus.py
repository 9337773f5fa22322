"""Text corpora and sentence splitting for data preparation.

A corpus is a UTF-8 text file with one document or paragraph per line; it is read line by line,
so its size is not bounded by memory. ``lee_background`` names the default corpus: the Lee
background corpus, 300 Australian Broadcasting Corporation news stories (2,680 sentences) that
ship inside the ``gensim`` wheel and are read from the installed package, never downloaded.

Why news prose and not the other English text already installed (``pydoc_data.topics``, Python's
own reference documentation): the news stories are complete, grammatical sentences of the kind a
sentence encoder is trained on (median 28 WordPiece tokens; 99% fit in 64), while the reference
pages interleave grammar productions, code, tables and headings that a sentence splitter cuts into
fragments such as "Note:" or "key in d".
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Iterator

LEE_BACKGROUND = "lee_background"

# A sentence ends at . ! or ? (plus closing quotes or brackets), followed by whitespace and a
# capital letter or digit, possibly behind an opening quote or bracket.
_BOUNDARY = re.compile(r"""[.!?]+["')\]]*\s+(?=["'(\[]?[A-Z0-9])""")
# Words whose trailing period does not end a sentence ("Mr. Howard", "the U.S. Senate").
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr gen col lt sgt capt rev gov sen rep inc ltd co corp vs etc e.g i.e "
    "no jan feb mar apr jun jul aug sep sept oct nov dec u.s u.n u.k mt ft approx dept est fig vol"
    .split())


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file and the fix."""


def corpus_path(corpus: str) -> Path:
    """The file behind a corpus name: ``lee_background`` or a path to a text file."""
    if corpus == LEE_BACKGROUND:
        spec = importlib.util.find_spec("gensim")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise CorpusError("the lee_background corpus ships with the gensim package, which is not "
                              "installed: pip install -r requirements.txt.")
        path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"
    else:
        path = Path(corpus).expanduser()
    if not path.is_file():
        raise CorpusError(f"corpus file {path} does not exist (corpus '{corpus}': give "
                          f"{LEE_BACKGROUND} or a UTF-8 text file, one document per line).")
    return path


def split_sentences(text: str) -> list[str]:
    """Split one paragraph into sentences, with whitespace runs collapsed to one space."""
    text = " ".join(text.split())
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        word = text[start:m.start()].rsplit(" ", 1)[-1].lstrip("\"'([").lower()
        # A period after an abbreviation or an initial ("J. Smith") is no boundary.
        if text[m.start()] == "." and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
            continue
        sentences.append(text[start:m.end()].strip())
        start = m.end()
    if text[start:].strip():
        sentences.append(text[start:].strip())
    return sentences


def read_sentences(path: Path) -> Iterator[str]:
    """Every sentence of a corpus file, in order, one line in memory at a time."""
    with open(path, encoding="utf-8") as f:
        try:
            for line in f:
                yield from split_sentences(line)
        except UnicodeDecodeError as e:
            raise CorpusError(f"corpus file {path} is not UTF-8 text: {e}.") from e
