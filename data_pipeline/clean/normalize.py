"""Text normalisation: mojibake repair, Unicode form, control characters, whitespace.

Paragraph structure is kept: lines stay lines, and paragraphs stay separated by one empty line.
"""

from __future__ import annotations

import re
import unicodedata

import ftfy
from ftfy.badness import is_bad

from data_pipeline.clean.config import NormalizeConfig

# Control (Cc) and format (Cf) characters except \t and \n; \r is handled as a line break.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufff9-\ufffb]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")

_FTFY_ENCODING_ONLY = ftfy.TextFixerConfig(
    unescape_html=False, remove_terminal_escapes=False, fix_encoding=True, restore_byte_a0=True,
    replace_lossy_sequences=True, decode_inconsistent_utf8=True, fix_c1_controls=True,
    fix_latin_ligatures=False, fix_character_width=False, uncurl_quotes=False,
    fix_line_breaks=False, fix_surrogates=True, remove_control_chars=False, normalization=None,
    explain=False,
)


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    """Normalised ``text`` according to ``cfg`` (see the module docstring)."""
    if cfg.fix_encoding and (is_bad(text) or _SURROGATE.search(text)):
        # ftfy only changes text its badness heuristic flags; checking first skips most documents
        text = ftfy.fix_text(text, _FTFY_ENCODING_ONLY)
    text = _SURROGATE.sub("\ufffd", text)  # lone surrogates (e.g. from JSON escapes) cannot be written
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    if cfg.strip_control:
        text = _CONTROL.sub("", text)
    if cfg.clean_whitespace:
        text = _SPACES.sub(" ", text)
        text = "\n".join(line.strip() for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", text).strip()
    return text
