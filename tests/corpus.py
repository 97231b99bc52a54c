"""Where the shared real-world corpus lives and which of its files are messages.

The corpus is read in place (never copied into the project). Its SOURCES.md
says only `*.eml` files are messages; the rest are expectations and payloads.
"""

from __future__ import annotations

import os
from pathlib import Path

CORPUS = Path(
    os.environ.get("MAILGATE_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus")
)


def corpus_files() -> list[Path]:
    """Every message in the corpus, in a stable order; empty when it is absent."""
    if not CORPUS.is_dir():
        return []
    return sorted(CORPUS.rglob("*.eml"))
