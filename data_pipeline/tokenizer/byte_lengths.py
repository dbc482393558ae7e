"""How many UTF-8 bytes of text each token id stands for: the denominator of bits per byte.

Bits per byte (``val/bits_per_byte``) divides a model's summed next-token cross-entropy by the
number of bytes its target tokens decode to, so it does not depend on the tokenizer: a
vocabulary that packs more text into a token has a higher loss per token but the same loss per
byte of text. The byte count comes from a per-id table built once from the sentencepiece model
(:func:`token_byte_lengths`), so counting a batch's bytes is one gather, with no decoding.
"""

from __future__ import annotations

import numpy as np
import sentencepiece as spm

# sentencepiece's word-boundary marker: a space in the decoded text
SPACE_MARKER = "\u2581"


def token_byte_lengths(sp: spm.SentencePieceProcessor, size: int | None = None) -> np.ndarray:
    """The UTF-8 length of the text each token id decodes to (int64, one entry per id).

    - ordinary and user-defined pieces: ``len(piece.replace("▁", " ").encode("utf-8"))``: the
      piece's text with the word-boundary marker as the space it decodes to;
    - byte-fallback pieces (``<0xNN>``): 1, the one byte they stand for (a character outside the
      vocabulary decodes from its 1-4 byte pieces, so its bytes are counted exactly);
    - control pieces (``<s>``, ``</s>``, ``<pad>``) and the unknown piece: 0; they decode to no
      text (an unknown piece replaces text the tokenizer could not encode, whose length is lost:
      with ``byte_fallback`` on, which the tokenizer config defaults to, there is none).

    The sum over a sequence's tokens equals the UTF-8 length of its decoded text, with one
    exception: a tokenizer trained with ``add_dummy_prefix`` prepends "▁" to every text it
    encodes and ``decode`` strips that space again, so each document counts one byte more than
    its text (the space separating it from the document before, in a packed sequence).

    ``size``: the table's length (the model's vocabulary, when padded beyond the tokenizer's);
    ids the tokenizer does not have count 0 bytes.
    """
    n = sp.get_piece_size()
    table = np.zeros(max(n, size or 0), dtype=np.int64)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        if sp.is_byte(i):
            table[i] = 1
        else:
            table[i] = len(sp.id_to_piece(i).replace(SPACE_MARKER, " ").encode("utf-8"))
    return table
