"""Filter-stage benchmark: our Gopher/C4/FineWeb filters against datatrove's, side by side.

Both sides run in this one process, on the same in-memory documents (read, HTML-extracted and
normalised by our pipeline first, untimed), each filter in its default configuration. Prints
documents per second per core (CPU time of this single process), the speed ratio, and per rule
how often the two implementations make the same keep/drop decision (and the same reason).

    python bench/clean.py --data ../shared/data            # web + news sets
    python bench/clean.py --data ../shared/data --limit 500 --extract
    python bench/clean.py --data ../shared/data --executors   # local vs Ray, whole stage, 2 CPUs

Needs the ``bench`` extra (datatrove + spaCy): ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

from data_pipeline.clean.config import (
    C4Config,
    CleanConfig,
    ExtractConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    NormalizeConfig,
    SourceConfig,
)
from data_pipeline.clean.documents import Document, ReadError
from data_pipeline.clean.extract import extract_html
from data_pipeline.clean.filters.c4 import c4_filter
from data_pipeline.clean.filters.fineweb import fineweb_filter
from data_pipeline.clean.filters.gopher import gopher_quality, gopher_repetition
from data_pipeline.clean.filters.text import split_words
from data_pipeline.clean.normalize import normalize_text
from data_pipeline.clean.readers.inputs import expand_inputs, source_config
from data_pipeline.clean.readers.registry import read_input

SETS = {
    "web": [SourceConfig(name="web", path="web/dolma_cc")],
    "news": [SourceConfig(name="news", path="news/bbc/bbc/*/*.txt"),
             SourceConfig(name="news_lee", path="news/lee_abc/*.cor", format="lines"),
             SourceConfig(name="news_ag", path="news/ag_news/test.csv", csv_header=False,
                          text_fields=["2"])],
}

# datatrove reason -> ours (without the filter prefix)
REASONS = {
    "gopher_short_doc": "short_doc", "gopher_long_doc": "long_doc",
    "gopher_below_avg_threshold": "short_words", "gopher_above_avg_threshold": "long_words",
    "gopher_too_many_hashes": "too_many_hashes", "gopher_too_many_ellipsis": "too_many_ellipsis",
    "gopher_too_many_bullets": "too_many_bullet_lines",
    "gopher_too_many_end_ellipsis": "too_many_ellipsis_lines",
    "gopher_below_alpha_threshold": "few_alpha_words", "gopher_enough_stop_words": "few_stop_words",
    **{f"duplicated_{n}_n_grams": f"dup_{n}_gram" for n in range(5, 11)},
}
FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")


def load_documents(data: Path, name: str, limit: int) -> list[str]:
    cfg = CleanConfig(sources=SETS[name])
    files, _ = expand_inputs(cfg, str(data))
    texts: list[str] = []
    for f in files:
        for rec in read_input(f, source_config(cfg, f.source), cfg.max_doc_bytes):
            if isinstance(rec, ReadError):
                continue
            text = extract_html(rec.html, ExtractConfig()) if rec.html is not None else rec.text
            text = normalize_text(text, NormalizeConfig())
            if text:
                texts.append(text)
            if limit and len(texts) >= limit:
                return texts
    return texts


def run_ours(texts: list[str]) -> tuple[dict[str, list[str | None]], float]:
    gq, gr, c4, fw = GopherQualityConfig(), GopherRepetitionConfig(), C4Config(), FineWebConfig()
    out: dict[str, list[str | None]] = {f: [] for f in FILTERS}
    start = time.process_time()
    for text in texts:
        words = split_words(text)
        out["gopher_repetition"].append(gopher_repetition(text, words, gr))
        out["gopher_quality"].append(gopher_quality(text, words, gq))
        out["c4"].append(c4_filter(text, c4)[1])
        out["fineweb"].append(fineweb_filter(text, words, fw))
    return out, time.process_time() - start


def run_datatrove(texts: list[str]) -> tuple[dict[str, list[str | None]], float]:
    from datatrove.data import Document as DTDocument
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    filters = {"gopher_repetition": GopherRepetitionFilter(), "gopher_quality": GopherQualityFilter(),
               "c4": C4QualityFilter(), "fineweb": FineWebQualityFilter()}
    filters["c4"].filter(DTDocument(text="Warm up spaCy. It loads lazily.", id="w"))
    out: dict[str, list[str | None]] = {f: [] for f in FILTERS}
    start = time.process_time()
    for i, text in enumerate(texts):
        for name, flt in filters.items():
            verdict = flt.filter(DTDocument(text=text, id=str(i)))
            out[name].append(None if verdict is True else _dt_reason(name, verdict))
    return out, time.process_time() - start


def _dt_reason(name: str, verdict) -> str:
    reason = verdict[1] if isinstance(verdict, tuple) else "dropped"
    return f"{name}.{REASONS.get(reason, reason)}"


def agreement(ours: list[str | None], theirs: list[str | None]) -> tuple[float, float, int, int]:
    n = len(ours)
    same_decision = sum((a is None) == (b is None) for a, b in zip(ours, theirs))
    same_reason = sum(a == b for a, b in zip(ours, theirs))
    return (same_decision / n, same_reason / n, sum(a is not None for a in ours),
            sum(b is not None for b in theirs))


def report(name: str, texts: list[str], show_diff: int, repeat: int) -> None:
    """Runs the two sides alternately ``repeat`` times and reports the median CPU time of each."""
    times_ours, times_dt = [], []
    for _ in range(repeat):
        ours, t = run_ours(texts)
        times_ours.append(t)
        theirs, t = run_datatrove(texts)
        times_dt.append(t)
    t_ours, t_dt = statistics.median(times_ours), statistics.median(times_dt)
    n = len(texts)
    print(f"\n== {name}: {n} documents, {sum(map(len, texts)) / 1e6:.1f} M characters "
          f"(median of {repeat} alternating runs, CPU time of this one process)")
    print(f"ours      {n / t_ours:10.1f} docs/s/core  ({t_ours:.2f} s; runs {', '.join(f'{t:.2f}' for t in times_ours)})")
    print(f"datatrove {n / t_dt:10.1f} docs/s/core  ({t_dt:.2f} s; runs {', '.join(f'{t:.2f}' for t in times_dt)})")
    print(f"speed ratio (ours / datatrove): {t_dt / t_ours:.1f}x")
    print(f"{'rule':<20}{'decision agree':>16}{'reason agree':>14}{'ours drop':>11}{'dt drop':>9}")
    for f in FILTERS:
        dec, rea, a, b = agreement(ours[f], theirs[f])
        print(f"{f:<20}{100 * dec:>15.2f}%{100 * rea:>13.2f}%{a:>11}{b:>9}")
        if show_diff:
            diffs = Counter((o, t) for o, t in zip(ours[f], theirs[f]) if o != t)
            for (o, t), c in diffs.most_common(show_diff):
                print(f"    {c:5d}  ours={o}  datatrove={t}")


def bench_extract(data: Path, limit: int) -> None:
    """resiliparse vs trafilatura on the real crawl pages (WARC HTML)."""
    cfg = CleanConfig(sources=[SourceConfig(name="web", path="web/dolma_cc/*.warc.gz"),
                               SourceConfig(name="cc", path="web/commoncrawl_whirlwind/whirlwind.warc.gz")])
    files, _ = expand_inputs(cfg, str(data))
    pages = [r.html for f in files for r in read_input(f, source_config(cfg, f.source), cfg.max_doc_bytes)
             if isinstance(r, Document) and r.html][: limit or None]
    print(f"\n== HTML extraction on {len(pages)} real crawl pages")
    outputs = {}
    for extractor in ("resiliparse", "trafilatura"):
        ecfg = ExtractConfig(extractor=extractor)
        start = time.process_time()
        outputs[extractor] = [extract_html(p, ecfg) for p in pages]
        t = time.process_time() - start
        chars = sum(map(len, outputs[extractor]))
        empty = sum(not o.strip() for o in outputs[extractor])
        print(f"{extractor:<12} {len(pages) / t:8.1f} pages/s/core  {chars:>9} chars out  {empty} empty pages")
    overlap = []
    for a, b in zip(outputs["resiliparse"], outputs["trafilatura"]):
        wa, wb = set(a.lower().split()), set(b.lower().split())
        if wa | wb:
            overlap.append(len(wa & wb) / len(wa | wb))
    print(f"word-set Jaccard between the two extractors: mean {sum(overlap) / max(len(overlap), 1):.2f}")


def bench_executors(data: Path, sets: list[str], repeat: int) -> None:
    """The whole cleaning stage with executor=local (2 worker processes) and executor=ray (a
    2-CPU Ray instance started once, untimed), alternately; wall time and identical output."""
    import shutil
    import tempfile

    import ray

    from data_pipeline.clean.stage import run_clean
    from data_pipeline.config import DataPrepConfig

    sources = [src for name in sets for src in SETS[name]]
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    times: dict[str, list[float]] = {"local": [], "ray": []}
    outputs: dict[str, dict[str, bytes]] = {}
    stats: dict = {}
    try:
        for _ in range(repeat):
            for executor in ("local", "ray"):
                out = Path(tempfile.mkdtemp(prefix=f"bench-clean-{executor}-"))
                cfg = DataPrepConfig(input=str(data), output=str(out / "clean"), executor=executor, workers=2,
                                     data=CleanConfig(sources=sources))
                start = time.perf_counter()
                stats = run_clean(cfg)
                times[executor].append(time.perf_counter() - start)
                outputs[executor] = {p.name: p.read_bytes() for p in sorted((out / "clean").glob("docs-*.tar"))}
                outputs[executor]["stats.json"] = (out / "clean" / "stats.json").read_bytes()
                shutil.rmtree(out)
    finally:
        ray.shutdown()
    n = stats["documents_read"]
    print(f"\n== cleaning stage on 2 CPUs: {stats['inputs']['files']} input files, {n} documents "
          f"(median of {repeat} alternating runs, wall time; Ray start-up not counted)")
    for executor, ts in times.items():
        t = statistics.median(ts)
        print(f"{executor:<6} {n / t:10.1f} docs/s  ({t:.2f} s; runs {', '.join(f'{x:.2f}' for x in ts)})")
    print(f"speed ratio (ray / local): {statistics.median(times['local']) / statistics.median(times['ray']):.2f}x")
    print(f"identical shards and stats.json: {outputs['local'] == outputs['ray']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data",
                        help="folder holding web/ and news/ (the shared development data)")
    parser.add_argument("--sets", nargs="+", default=["web", "news"], choices=sorted(SETS))
    parser.add_argument("--limit", type=int, default=0, help="at most this many documents per set (0: all)")
    parser.add_argument("--show-diff", type=int, default=0, help="print the N most common disagreements")
    parser.add_argument("--repeat", type=int, default=3, help="alternating timed runs per side (median reported)")
    parser.add_argument("--extract", action="store_true", help="also compare resiliparse and trafilatura")
    parser.add_argument("--executors", action="store_true",
                        help="only compare the whole stage on executor=local and executor=ray (2 CPUs each)")
    args = parser.parse_args()
    if args.executors:
        bench_executors(args.data, args.sets, args.repeat)
        return
    for name in args.sets:
        report(name, load_documents(args.data, name, args.limit), args.show_diff, args.repeat)
    if args.extract:
        bench_extract(args.data, args.limit)


if __name__ == "__main__":
    main()
