"""Word and sentence splitting shared by the quality filters.

The published filter implementations (datatrove's Gopher, C4 and FineWeb filters) count words
and sentences with spaCy's English tokenizer and sentencizer. Running spaCy is most of their
cost, so this module reproduces the tokenizer's decisions that the rules are sensitive to
(punctuation split off words, clitics such as ``n't``/``'s``, hyphens between letters, URLs,
e-mails, numbers, dotted abbreviations, ellipses) with one compiled regular expression.
``bench/clean.py`` measures how often each rule's decision agrees with datatrove's.
"""

from __future__ import annotations

import re

_ABBREVIATIONS = (
    "Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Inc|Ltd|Co|Corp|vs|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|"
    "Mt|Gov|Sen|Rep|Gen|Col|Lt|Sgt|Capt|Ph\\.D|e\\.g|i\\.e|a\\.m|p\\.m|Ala|Ariz|Ark|Calif|Colo|Conn|Del|"
    "Fla|Ga|Ill|Ind|Kan|Ky|La|Md|Mich|Minn|Miss|Mo|Mont|Neb|Nev|Okla|Ore|Pa|Tenn|Va|Wash|Wis"
)

WORD_RE = re.compile(
    r"""
    (?:https?://|www\.)[^\s]+?(?=[.,;:!?)\]'"]*(?:\s|$))     # URL, trailing punctuation split off
  | [\w.+-]+@[\w-]+(?:\.[\w-]+)+                              # e-mail
  | \w+(?=[nN]['’][tT]\b)                                     # do|n't
  | [nN]['’][tT]\b
  | (?<=\w)['’](?:[sSmMdD]|ll|LL|ve|VE|re|RE)\b                # it|'s
  | (?:""" + _ABBREVIATIONS + r""")\.(?!\w)                    # Mr. Jan. e.g.
  | \b[A-Z]\.(?!\w)                                           # initials: C.
  | (?:[A-Za-z]\.){2,}(?=\s|$)(?<![a-z]\.)                    # U.S.  (not a.b.c.)
  | (?:\w\.){1,}\w+                                           # a.b.c, U.S (inside)
  | \d+(?:[.,:/]\d+)+\w*                                       # 3.5 1,000 10:30pm
  | \w+(?:['’](?!(?:[sSmMdD]|ll|LL|ve|VE|re|RE)\b)\w+)*        # words (clitics split off)
  | \.{2,}|-{2,}|…                                            # ... -- runs
  | [^\w\s]                                                   # single punctuation
    """,
    re.VERBOSE,
)

SENTENCE_END = frozenset(".!?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？｡")


def split_words(text: str) -> list[str]:
    """Words and punctuation tokens of ``text``, as spaCy's English tokenizer would give them."""
    return WORD_RE.findall(text)


def is_punct_token(token: str) -> bool:
    return not any(ch.isalnum() for ch in token)


def count_sentences(tokens: list[str]) -> int:
    """Sentences of a tokenised line, by the rule of spaCy's sentencizer.

    A new sentence starts at the first non-punctuation token after a token that is a
    sentence-final character on its own (``.``, ``!``, ``?``, ...).
    """
    if not tokens:
        return 0
    sentences = 1
    seen_end = False
    for tok in tokens:
        if tok in SENTENCE_END:
            seen_end = True
        elif seen_end and not is_punct_token(tok):
            sentences += 1
            seen_end = False
    return sentences
