"""Rebuild the built-in calibration and evaluation texts in ``qpipe/data`` from their sources.

    python tools/make_texts.py --devil /path/to/devil.dict.dz [--licenses /usr/share/common-licenses]

Run with CPython 3.11 (the texts were cut from 3.11.7's standard library); the Devil's
Dictionary comes from Debian's ``dict-devil`` package (``apt-get download dict-devil``, then
``dpkg-deb -x``: ``usr/share/dictd/devil.dict.dz``). What each text is and the terms it is
shipped under are in ``qpipe/data/README.md``. The texts are committed; this script records how
they were made, so that they can be checked and remade.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import inspect
import sys
import sysconfig
import tokenize
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "qpipe" / "data"
CALIB = DATA / "calib"
TARGET_CHARS = 30_000  # per calibration domain: ~7k SmolLM2 tokens, so the windows spread evenly

# Library modules whose docstrings are the technical-documentation domain. None of them is
# described in pydoc_data.topics (the language reference), which the off-domain eval text uses.
DOC_MODULES = (
    "json",
    "argparse",
    "csv",
    "shutil",
    "tempfile",
    "textwrap",
    "difflib",
    "zipfile",
    "tarfile",
    "sqlite3",
    "queue",
    "sched",
    "fnmatch",
    "glob",
    "configparser",
    "logging",
)
# Well-commented library sources whose ``#`` comments are the code-comments domain.
COMMENT_SOURCES = (
    "heapq.py",
    "functools.py",
    "dataclasses.py",
    "threading.py",
    "subprocess.py",
    "asyncio/base_events.py",
    "collections/__init__.py",
    "pickle.py",
    "inspect.py",
    "enum.py",
    "typing.py",
    "_pydecimal.py",
)
# Language-reference topics (pydoc_data.topics) for the off-domain evaluation text.
EVAL_TOPICS = ("execmodel", "import", "try", "raise", "with")
LEGAL = ("Apache-2.0", "CC0-1.0", "Artistic")


def _cut(parts: list[str], limit: int = TARGET_CHARS) -> str:
    out, size = [], 0
    for part in parts:
        if size >= limit:
            break
        out.append(part)
        size += len(part) + 2
    return "\n\n".join(out).strip() + "\n"


def tech_docs() -> str:
    parts = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            parts.append(f"{name}\n\n{inspect.cleandoc(module.__doc__)}")
        for attr in sorted(getattr(module, "__all__", [])):
            obj = getattr(module, attr, None)
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and len(doc.split()) >= 12 and getattr(obj, "__module__", name) == name:
                parts.append(f"{name}.{attr}\n\n{doc}")
    # Interleave modules (not one module's whole API first) so any window count samples many.
    return _cut(_round_robin(parts, key=lambda p: p.split("\n", 1)[0].split(".")[0]))


def _round_robin(parts: list[str], key) -> list[str]:
    groups: dict[str, list[str]] = {}
    for p in parts:
        groups.setdefault(key(p), []).append(p)
    out = []
    while any(groups.values()):
        for g in groups.values():
            if g:
                out.append(g.pop(0))
    return out


def _comment_paragraphs(path: Path) -> list[str]:
    paragraphs, current, last_line = [], [], -2
    with path.open("rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#").strip()
            line = tok.start[0]
            if line != last_line + 1 and current:
                paragraphs.append(" ".join(current))
                current = []
            last_line = line
            noise = text.startswith(("!", "-*-", "type:", "noqa", "pragma", "XXX", "fmt:"))
            if text and not noise and any(c.isalpha() for c in text):
                current.append(text)
    if current:
        paragraphs.append(" ".join(current))
    return [p for p in paragraphs if len(p.split()) >= 6 and "Copyright" not in p]


def code_comments() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    groups = {src: _comment_paragraphs(lib / src) for src in COMMENT_SOURCES}
    ordered = []
    while any(groups.values()):
        for paras in groups.values():
            if paras:
                ordered.append(paras.pop(0))
    return _cut(ordered)


def prose(devil: Path) -> str:
    text = gzip.decompress(devil.read_bytes()).decode("utf-8", "replace")
    start = text.index("                              PREFACE")
    body = text[start:].replace("\r", "")
    return _cut([p.rstrip() for p in body.split("\n\n") if p.strip()])


def legal(licenses: Path) -> str:
    return "\n\n".join((licenses / name).read_text().strip() for name in LEGAL) + "\n"


def eval_pydocs() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in EVAL_TOPICS) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devil", type=Path, required=True, help="devil.dict.dz (dict-devil)")
    parser.add_argument("--licenses", type=Path, default=Path("/usr/share/common-licenses"))
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print(f"warning: texts were cut from CPython 3.11, this is {sys.version.split()[0]}")
    CALIB.mkdir(exist_ok=True)
    outputs = {
        CALIB / "tech_docs.txt": tech_docs(),
        CALIB / "code_comments.txt": code_comments(),
        CALIB / "prose.txt": prose(args.devil),
        CALIB / "legal.txt": legal(args.licenses),
        DATA / "eval_pydocs.txt": eval_pydocs(),
    }
    for path, text in outputs.items():
        path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(DATA.parent.parent)}: {len(text)} chars")


if __name__ == "__main__":
    main()
