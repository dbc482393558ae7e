"""PII redaction: e-mail and IPv4/IPv6 addresses are replaced by configurable strings."""

from __future__ import annotations

import ipaddress
import re

from data_pipeline.clean.config import PiiConfig

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def _ipv6(match: re.Match, replacement: str) -> str:
    try:
        ipaddress.IPv6Address(match.group(0))
    except ValueError:
        return match.group(0)  # e.g. a time like 10:30:00
    return replacement


def redact_pii(text: str, cfg: PiiConfig) -> tuple[str, int]:
    """(text with e-mail and IP addresses replaced, number of replacements)."""
    text, n_mail = EMAIL.subn(cfg.email_replacement, text)
    text, n_ip4 = IPV4.subn(cfg.ip_replacement, text)
    n_ip6 = 0
    if ":" in text:
        before = text
        text = IPV6.sub(lambda m: _ipv6(m, cfg.ip_replacement), text)
        n_ip6 = int(before != text)
    return text, n_mail + n_ip4 + n_ip6
