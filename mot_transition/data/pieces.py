"""Long documents cut into pieces for the tokenizer, so that the memory of tokenising a document does
not grow with its length, and the tokens are the same as if it had been tokenised whole.

The tokenizer's memory is its encodings (per token: the id, its string, offsets, masks: about a
hundred times the text's bytes), not the ids we keep. So `prepare` gives it a document longer than
its batch (1 M characters) in pieces of about 1/16 of that (`pieces_of_long`) and writes their ids
one after another.

Where a cut goes: just before a space (U+0020) that follows a character which is not whitespace.
A byte-level BPE tokenises each piece of its pre-tokenizer's regex on its own; the regexes of
GPT-2 (the BPE that `prepare` trains) and Llama 3 (tested), and GPT-4o's (read the same way, not
tested), never let such a piece run on from a non-whitespace character into a following space
(letter, number and punctuation runs stop at whitespace; a run of whitespace starts at the space),
the regex has no look-behind, and its only look-ahead (`\\s+(?!\\S)`) ends a run of whitespace,
which lies wholly before the cut or wholly after it. So the pieces of the regex, and the tokens,
on each side of the cut are the same as in the whole text (tested with Hypothesis on varied text:
tests/test_pieces.py).

Limits: a stretch of more than `MAX_PIECES * size` characters with no such space (a very long
run of text without spaces, e.g. Chinese or a minified file) is cut there anyway, where a token
may differ from the whole document's; and a tokenizer that is not byte-level with such a regex
(e.g. SentencePiece's Metaspace, which marks the start of a text) may tokenise the word after a cut
differently. A document of at most `size` characters (`limit` for `pieces_of_long`: `prepare`'s
batch) is never cut: its tokens are exactly those of any tokenizer.
"""

import re
from typing import Iterable, Iterator

from mot_transition.data.streamed import StreamedText

PIECE_CHARS = 1_000_000  # default `size` of `pieces`
MAX_PIECES = 8  # look this many sizes ahead for a cut before cutting anywhere
_CUT = re.compile(r"[^\s](?= )")  # a non-whitespace character followed by a space: cut after it


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most about `size` characters ("".join gives it back), each
    cut just before a space that follows a non-whitespace character (above); one piece if it fits."""
    if size < 2:
        raise ValueError(f"a piece must hold at least 2 characters, got {size}")
    start = 0
    while len(text) - start > size:
        cut = _next_cut(text, start, size)
        yield text[start:cut]
        start = cut
    yield text[start:]


def pieces_of_stream(chunks: Iterable[str], size: int = PIECE_CHARS) -> Iterator[str]:
    """The pieces of "".join(chunks), the same as `pieces` gives, holding at most about
    `MAX_PIECES * size` characters and one chunk: a cut depends on the next `MAX_PIECES * size`
    characters only (the search for it stops there, look-ahead included)."""
    if size < 2:
        raise ValueError(f"a piece must hold at least 2 characters, got {size}")
    chunks, text, start, ended = iter(chunks), "", 0, False
    while True:
        while not ended and len(text) - start <= MAX_PIECES * size:
            chunk = next(chunks, None)
            if chunk is None:
                ended = True
            else:
                text, start = text[start:] + chunk, 0
        if len(text) - start <= size:  # only at the end: before it, more than MAX_PIECES * size are held
            yield text[start:]
            return
        cut = _next_cut(text, start, size)
        yield text[start:cut]
        start = cut


def _next_cut(text: str, start: int, size: int) -> int:
    """Where the piece that starts at `start` ends: the first cut in the second half of the next
    `size` characters, else the next one at all within `MAX_PIECES * size`, else `size` on."""
    match = _CUT.search(text, start + size // 2, start + size) or _CUT.search(text, start + size, start + MAX_PIECES * size)
    return match.end() if match is not None else start + size


def pieces_of_long(text: "str | StreamedText", limit: int) -> Iterator[str]:
    """`text` whole if it has at most `limit` characters; else in pieces of about `limit / 16`, so
    that a batch of about `limit` holds several, which the tokenizer encodes on several threads.
    A `StreamedText` (a long text file or JSONL line, streamed.py) is read from its file as the
    pieces are taken."""
    if len(text) <= limit:
        return iter((text if isinstance(text, str) else text.read(),))
    size = max(2, limit // 16)
    return pieces(text, size) if isinstance(text, str) else pieces_of_stream(text.chunks(), size)


__all__ = ["pieces", "pieces_of_stream", "pieces_of_long", "PIECE_CHARS"]
