"""URL/domain blocklist read from a file: one domain or URL per line, ``#`` starts a comment."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from crucible.errors import ConfigError


class UrlBlocklist:
    """A domain entry blocks the domain and its subdomains; a URL entry blocks that exact URL."""

    def __init__(self, domains: set[str], urls: set[str]) -> None:
        self.domains = domains
        self.urls = urls

    @classmethod
    def from_file(cls, path: str) -> UrlBlocklist:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"data.urls.blocklist_file: {path} does not exist")
        domains, urls = set(), set()
        for raw in p.read_text(encoding="utf-8", errors="replace").splitlines():
            entry = raw.split("#", 1)[0].strip().lower()
            if not entry:
                continue
            if "/" in entry:
                urls.add(entry.rstrip("/"))
            else:
                domains.add(entry.lstrip("."))
        return cls(domains, urls)

    def blocked(self, url: str | None) -> bool:
        if not url:
            return False
        url_l = url.strip().lower()
        if url_l.rstrip("/") in self.urls or url_l.split("://", 1)[-1].rstrip("/") in self.urls:
            return True
        host = (urlsplit(url_l if "://" in url_l else "http://" + url_l).hostname or "")
        parts = host.split(".")
        return any(".".join(parts[i:]) in self.domains for i in range(len(parts)))
