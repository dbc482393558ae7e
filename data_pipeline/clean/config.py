"""Configuration of the cleaning stage (section ``data`` of ``configs/data/*.yaml``).

Its defaults are the published values (Gopher, C4, FineWeb, FineWeb's MinHash 5-gram 14 x 8).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from crucible.config import Section

InputFormat = Literal["auto", "jsonl", "text", "lines", "parquet", "csv", "tsv", "warc", "wet", "html"]


class SourceConfig(Section):
    """One named input source; every document keeps the source's ``name``."""

    name: str
    """Label kept on every document of this source (e.g. web, news)."""
    path: str
    """File, folder or glob; relative paths are taken relative to the top-level ``input``."""
    format: InputFormat = "auto"
    """auto recognises files by extension; set it for unusual extensions (e.g. lines for .cor)."""
    text_fields: list[str] = Field(default_factory=lambda: ["text", "raw_content", "content"])
    """jsonl/parquet/csv: the first of these fields (dotted for nesting) that is present holds the text."""
    id_fields: list[str] = Field(default_factory=lambda: ["id", "doc_id", "digest"])
    """jsonl/parquet/csv: field holding the document id (file:offset when none is present)."""
    url_fields: list[str] = Field(default_factory=lambda: ["url", "metadata.url", "metadata.warc_url", "source_url"])
    """jsonl/parquet/csv: field holding the document URL, if any."""
    metadata_fields: list[str] = Field(default_factory=list)
    """jsonl/parquet/csv: extra fields copied into the output metadata."""
    csv_header: bool = True
    """csv/tsv: the first row names the columns (otherwise text_fields are column numbers)."""


class ExtractConfig(Section):
    """HTML -> text extraction for WARC responses and .html files."""

    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    """resiliparse (fast C++, main-content heuristics) or trafilatura (pure Python, slower)."""
    main_content: bool = True
    """Keep only the main content (drop navigation, footers, boilerplate)."""
    max_html_bytes: int = Field(default=5_000_000, gt=0)
    """Larger HTML payloads are not parsed; counted as error extract_too_large."""
    timeout_s: float = Field(default=10.0, gt=0)
    """Per-document extraction time limit; an overrun is counted as error extract_timeout."""


class NormalizeConfig(Section):
    """Unicode and whitespace normalisation applied to every document."""

    fix_encoding: bool = True
    """Repair mojibake with ftfy (encoding fixes only; no other ftfy rewrites)."""
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFC"
    """Unicode normalisation form."""
    strip_control: bool = True
    """Remove control and format characters other than newline and tab."""
    clean_whitespace: bool = True
    """Collapse runs of spaces, strip line ends, keep at most one empty line between paragraphs."""


class LangIdConfig(Section):
    """Language identification with py3langid (model shipped inside the pip package)."""

    enabled: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"])
    """Allowed ISO 639-1 codes; empty allows every language (still detected and counted)."""
    min_score: float = Field(default=0.65, ge=0.0, le=1.0)
    """Minimum normalised probability of the detected language."""
    max_chars: int = Field(default=3_000, gt=0)
    """Only the first max_chars characters are classified (speed)."""


class UrlFilterConfig(Section):
    """URL/domain blocklist."""

    blocklist_file: str = ""
    """Text file, one domain or URL per line (# comments); a domain also blocks its subdomains. Empty: off."""


class GopherQualityConfig(Section):
    """Gopher quality rules (Rae et al. 2021, Table A1); a rule with value 0 is off."""

    enabled: bool = True
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: list[str] = Field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])


class GopherRepetitionConfig(Section):
    """Gopher repetition rules (Rae et al. 2021, Table A1); a fraction of 0 turns the rule off."""

    enabled: bool = True
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: dict[int, float] = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    """n -> max fraction of characters in the most frequent n-gram."""
    dup_n_grams: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    """n -> max fraction of characters in duplicated n-grams."""


class C4Config(Section):
    """C4 rules (Raffel et al. 2020): line-level removals and document-level drops."""

    enabled: bool = True
    remove_citations: bool = True
    """Remove Wikipedia-style citation marks ([1], [edit], [citation needed])."""
    filter_no_terminal_punct: bool = True
    """Remove lines that do not end in . ? ! " ' (or end in an ellipsis)."""
    min_words_per_line: int = 3
    """Remove lines with fewer words; 0 is off."""
    max_word_length: int = 1000
    """Remove lines holding a longer word; 0 is off."""
    min_num_sentences: int = 5
    """Drop documents with fewer sentences left after line removal; 0 is off."""
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    """Remove lines mentioning javascript."""
    filter_curly_bracket: bool = True
    """Drop documents containing a curly bracket."""
    filter_policy: bool = True
    """Remove lines about cookies, privacy policies, terms of use."""


class FineWebConfig(Section):
    """FineWeb's three custom filters (Penedo et al. 2024)."""

    enabled: bool = True
    line_punct_thr: float = 0.12
    """Drop when fewer than this fraction of lines end in terminal punctuation."""
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    """Drop when more than this fraction of lines is short."""
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    """Drop when duplicated lines hold more than this fraction of the characters."""
    new_line_ratio: float = 0.3
    """Drop when newlines per word exceed this (list-like pages)."""


class PiiConfig(Section):
    """PII redaction: e-mail and IP addresses."""

    enabled: bool = True
    email_replacement: str = "email@example.com"
    ip_replacement: str = "0.0.0.0"


class DedupConfig(Section):
    """Exact and MinHash-LSH near-duplicate removal across all inputs of a run."""

    exact: bool = True
    near: bool = True
    shingle_size: int = Field(default=5, ge=1)
    """Words per shingle."""
    bands: int = Field(default=14, ge=1)
    rows: int = Field(default=8, ge=1)
    """Hashes per band; bands x rows MinHash permutations in all."""
    seed: int = 1
    """Seed of the MinHash permutations."""


class OutputConfig(Section):
    """Clean shard output."""

    shard_bytes: int = Field(default=256 * 2**20, gt=0)
    """Target size of each docs-NNNNNN.tar; a shard is closed once it reaches this size."""
    write_rejected: bool = False
    """Also write dropped documents with their reason to rejected/rejected-NNNNNN.tar."""
    min_chars: int = Field(default=1, ge=0)
    """Documents with fewer characters after cleaning are dropped (empty.too_short)."""


class CleanConfig(Section):
    """Cleaning: readers, extraction, normalisation, filters, dedup, output (section ``data``)."""

    sources: list[SourceConfig] = Field(default_factory=list)
    """Named sources; when empty, the top-level input is one source named default_source."""
    default_source: str = "web"
    """Source label of the top-level input when no sources are listed."""
    default_format: InputFormat = "auto"
    """Format of the top-level input when no sources are listed (auto: by extension)."""
    max_doc_bytes: int = Field(default=10 * 2**20, gt=0)
    """Longer records (e.g. a 50 MB single line) are skipped as error document_too_large."""
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    urls: UrlFilterConfig = Field(default_factory=UrlFilterConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.sources: source names must be unique; repeated: {dupes}")
        return sources
