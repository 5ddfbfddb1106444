"""Offline text in three domains, a deterministic train / held-out split, and a BPE tokenizer.

Everything here exists on a fresh machine without downloads:

* ``code``:  the Python standard library's ``*.py`` (the interpreter running this), without tests,
  ``site-packages``, ``encodings/`` (generated codec tables) and ``pydoc_data`` (that is prose).
* ``prose``: ``pydoc_data/topics.py`` (the Python reference docs, one document per topic),
  ``/usr/share/common-licenses/*`` and ``/usr/share/doc/*/copyright``. Licence and copyright texts
  repeat each other, so prose is de-duplicated by paragraph (whitespace-normalised, first
  occurrence in a fixed source order wins) before the split; otherwise a held-out copyright file
  would mostly be GPL paragraphs the model trained on. Man pages (``man -l FILE | col -b``) are
  opt-in (``man_pages=N``): they are slow to render and often missing on slim images, and a
  default that depends on what a machine happens to have installed is not reproducible.
* ``math``:  generated worksheets (arithmetic, multi-step expressions, linear equations,
  (x+a)(x+b) expansions, gcd by Euclid, fraction sums, squares), one ``random.Random`` per
  document seeded by (seed, document number).

Split: whole documents. Each domain's documents are ordered by sha256(seed, doc_id) and the first
ones go to held-out until it holds ``heldout_fraction`` of the domain's bytes (at least one
document; at least one stays in train). The same seed gives the same split on the same files.

Tokenizer: byte-level BPE (``tokenizers``) trained on the TRAINING documents only, with DeepSeek's
special tokens at ids 0..3 (``<｜begin▁of▁sentence｜>`` 0 = bos, ``<｜end▁of▁sentence｜>`` 1 = eos,
``<｜User｜>`` 2, ``<｜Assistant｜>`` 3) and a post-processor that prepends bos like DeepSeek's.
Documents are encoded as ``[bos] + text + [eos]``.

Demonstrations: ``{domain}_heldout.jsonl`` (from held-out documents) and ``{domain}_calib.jsonl``
(from training documents), one ``{"input_ids": [...], "domain": ..., "doc": ...}`` per line,
windows of at most ``length`` tokens, dealt round-robin over documents (window 0 of every document,
then window 1, ...), each document's first window starting with bos. These are what
``launch/score.py`` / ``launch/evaluate.py`` read as ``--demos FILE:DOMAIN``.

    python -m megatron_easyep.training.corpus OUT_DIR [--seed N]   # tokenizer + demos + manifest only
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import pathlib
import random
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field

import numpy as np

from megatron_easyep.checkpoint.deepseek import BOS_TOKEN, BOS_TOKEN_ID, EOS_TOKEN, EOS_TOKEN_ID, SPECIAL_TOKENS

DOMAINS = ("code", "prose", "math")
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_HELDOUT_FRACTION = 0.05
DEFAULT_MATH_DOCUMENTS = 4000
MIN_DOCUMENT_CHARS = 200

LICENSES_DIR = pathlib.Path("/usr/share/common-licenses")
DOC_DIR = pathlib.Path("/usr/share/doc")
MAN_DIR = pathlib.Path("/usr/share/man")
# stdlib paths (relative, posix) left out of the code domain
_CODE_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings",
                       "pydoc_data", "lib2to3/tests"}


class CorpusError(ValueError):
    """A corpus source is missing or a parameter makes the split impossible."""


@dataclass(frozen=True)
class Document:
    domain: str
    doc_id: str  # unique within the corpus, e.g. "code:json/decoder.py"
    text: str

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass
class Corpus:
    seed: int
    train: dict[str, list[Document]]
    heldout: dict[str, list[Document]]
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.train)

    def summary(self) -> dict:
        out = {}
        for domain in self.domains:
            tr, ho = self.train[domain], self.heldout[domain]
            out[domain] = {"train_documents": len(tr), "heldout_documents": len(ho),
                           "train_bytes": sum(d.nbytes for d in tr),
                           "heldout_bytes": sum(d.nbytes for d in ho)}
        return out

    def manifest(self) -> dict:
        """Which documents went where (ids and sha256 of the text), for provenance."""
        def entries(docs):
            return [[d.doc_id, hashlib.sha256(d.text.encode()).hexdigest()[:16]] for d in docs]

        return {"seed": self.seed, "sources": self.sources, "summary": self.summary(),
                "heldout": {d: entries(self.heldout[d]) for d in self.domains},
                "train": {d: entries(self.train[d]) for d in self.domains}}


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------

def stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _read_text(path: pathlib.Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def code_documents(root: pathlib.Path | None = None) -> list[Document]:
    """Python standard-library sources, one document per file (exact duplicates dropped)."""
    root = root or stdlib_dir()
    if not root.is_dir():
        raise CorpusError(f"Python standard library not found at {root}")
    docs, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if any(p in _CODE_EXCLUDED_DIRS for p in parts[:-1]) or "/".join(parts[:2]) in _CODE_EXCLUDED_DIRS:
            continue
        if parts[-1].startswith("test_") or parts[-1].startswith("_sysconfigdata"):
            continue
        text = _read_text(path)
        if text is None or len(text) < MIN_DOCUMENT_CHARS:
            continue
        digest = hashlib.sha256(text.encode()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        docs.append(Document("code", f"code:{rel}", text))
    if not docs:
        raise CorpusError(f"no Python sources found under {root}")
    return docs


def _pydoc_topics(root: pathlib.Path) -> dict[str, str]:
    path = root / "pydoc_data" / "topics.py"
    text = _read_text(path)
    if text is None:
        return {}
    for node in ast.parse(text).body:  # `topics = {...}`: read as data, never executed
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _render_man_pages(limit: int) -> list[tuple[str, str]]:
    if limit <= 0 or not shutil.which("man") or not shutil.which("col") or not MAN_DIR.is_dir():
        return []
    pages = sorted(p for section in sorted(MAN_DIR.glob("man[1-8]")) for p in section.iterdir()
                   if p.is_file() and not p.is_symlink())[:limit]
    out = []
    for page in pages:
        try:
            rendered = subprocess.run(f"man -l {shlex.quote(str(page))} 2>/dev/null | col -b",
                                      shell=True, capture_output=True, text=True, timeout=30,
                                      env=os.environ | {"MANWIDTH": "80"}).stdout
        except subprocess.TimeoutExpired:
            continue
        out.append((f"man:{page.relative_to(MAN_DIR).as_posix()}", rendered))
    return out


_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")


def prose_documents(*, root: pathlib.Path | None = None, licenses_dir: pathlib.Path = LICENSES_DIR,
                    doc_dir: pathlib.Path = DOC_DIR, man_pages: int = 0) -> list[Document]:
    """English prose, de-duplicated by paragraph across all prose sources (first occurrence in
    source order: pydoc topics, common licences, copyright files, man pages)."""
    root = root or stdlib_dir()
    raw: list[tuple[str, str]] = [(f"pydoc:{k}", v) for k, v in sorted(_pydoc_topics(root).items())]
    if licenses_dir.is_dir():
        for path in sorted(licenses_dir.iterdir()):
            if path.is_file() and not path.is_symlink():
                text = _read_text(path)
                if text:
                    raw.append((f"license:{path.name}", text))
    if doc_dir.is_dir():
        for path in sorted(doc_dir.glob("*/copyright")):
            if path.is_file() and not path.is_symlink():
                text = _read_text(path)
                if text:
                    raw.append((f"copyright:{path.parent.name}", text))
    raw += _render_man_pages(man_pages)

    docs, seen = [], set()
    for doc_id, text in raw:
        kept = []
        for paragraph in _PARAGRAPH_SPLIT.split(text):
            key = " ".join(paragraph.split())
            if not key or key in seen:
                continue
            seen.add(key)
            kept.append(paragraph.strip("\n"))
        merged = "\n\n".join(kept)
        if len(merged) >= MIN_DOCUMENT_CHARS:
            docs.append(Document("prose", f"prose:{doc_id}", merged + "\n"))
    if not docs:
        raise CorpusError("no prose found (pydoc_data/topics.py, /usr/share/common-licenses, "
                          "/usr/share/doc/*/copyright are all missing)")
    return docs


def _signed(v: int) -> str:
    return f"+ {v}" if v >= 0 else f"- {-v}"


def _math_problem(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        op = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"{a} {op} {b} = {value}"
    if kind == 1:
        a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 12)
        return f"({a} + {b}) * {c} = {a + b} * {c} = {(a + b) * c}"
    if kind == 2:
        x, a, b = rng.randint(-20, 20), rng.randint(2, 12), rng.randint(-50, 50)
        c = a * x + b
        return (f"Solve {a}x {_signed(b)} = {c}. Subtract {b}: {a}x = {c - b}. "
                f"Divide by {a}: x = {x}.")
    if kind == 3:
        a, b = rng.randint(-12, 12), rng.randint(-12, 12)
        s, p = a + b, a * b
        middle = "" if s == 0 else (f" {_signed(s)}x" if abs(s) != 1 else (" + x" if s > 0 else " - x"))
        const = "" if p == 0 else f" {_signed(p)}"
        return f"(x {_signed(a)})(x {_signed(b)}) = x^2{middle}{const}"
    if kind == 4:
        a, b = rng.randint(20, 999), rng.randint(2, 400)
        a, b = max(a, b), min(a, b)
        steps, x, y = [], a, b
        while y:
            steps.append(f"{x} = {x // y} * {y} + {x % y}")
            x, y = y, x % y
        return f"gcd({a}, {b}): " + "; ".join(steps) + f"; so gcd({a}, {b}) = {x}."
    if kind == 5:
        p, q, r, s = rng.randint(1, 9), rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 12)
        den = q * s // math.gcd(q, s)
        n1, n2 = p * (den // q), r * (den // s)
        total = n1 + n2
        g = math.gcd(total, den)
        result = f"{total // g}/{den // g}" if den // g != 1 else f"{total // g}"
        return f"{p}/{q} + {r}/{s} = {n1}/{den} + {n2}/{den} = {total}/{den} = {result}"
    if kind == 6:
        n = rng.randint(2, 99)
        return f"{n}^2 = {n * n}, and sqrt({n * n}) = {n}"
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"What is {a} * {b} + {a}? {a} * {b} = {a * b}, then {a * b} + {a} = {a * b + a}. The answer is {a * b + a}."


def math_documents(count: int = DEFAULT_MATH_DOCUMENTS, seed: int = 0) -> list[Document]:
    """Generated worksheets; document i depends only on (seed, i)."""
    docs = []
    for i in range(count):
        rng = random.Random(f"megatron-easyep-math/{seed}/{i}")
        lines = [f"Exercise set {i + 1}."]
        for j in range(rng.randint(8, 24)):
            lines.append(f"{j + 1}. {_math_problem(rng)}")
        docs.append(Document("math", f"math:{i:06d}", "\n".join(lines) + "\n"))
    return docs


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------

def _order_key(seed: int, doc_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()


def split_documents(docs: list[Document], seed: int, heldout_fraction: float,
                    max_bytes: int | None = None) -> tuple[list[Document], list[Document]]:
    """(train, heldout) by whole documents; see the module docstring. `max_bytes` first keeps a
    seed-ordered subset of at most that many bytes (for quick runs and tests)."""
    if not 0 < heldout_fraction < 1:
        raise CorpusError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    ordered = sorted(docs, key=lambda d: _order_key(seed, d.doc_id))
    if max_bytes is not None:
        kept, total = [], 0
        for d in ordered:
            if total + d.nbytes <= max_bytes:
                kept.append(d)
                total += d.nbytes
        ordered = kept
    if len(ordered) < 2:
        raise CorpusError(f"domain {docs[0].domain if docs else '?'}: {len(ordered)} document(s) "
                          "is too few to split (raise max_bytes_per_domain)")
    target = heldout_fraction * sum(d.nbytes for d in ordered)
    heldout, acc = [], 0
    for d in ordered[:-1]:
        if heldout and acc >= target:
            break
        heldout.append(d)
        acc += d.nbytes
    train = ordered[len(heldout):]
    return train, heldout


def build_corpus(seed: int = 0, *, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                 max_bytes_per_domain: int | None = None,
                 math_document_count: int = DEFAULT_MATH_DOCUMENTS, man_pages: int = 0) -> Corpus:
    sources = {
        "code": f"{stdlib_dir()}/**/*.py (Python {sys.version.split()[0]}; no tests, site-packages, "
                "encodings, pydoc_data)",
        "prose": f"{stdlib_dir()}/pydoc_data/topics.py, {LICENSES_DIR}/*, {DOC_DIR}/*/copyright"
                 + (f", up to {man_pages} man pages" if man_pages else "")
                 + " (paragraph-deduplicated)",
        "math": f"{math_document_count} generated worksheets (seed {seed})",
    }
    by_domain = {"code": code_documents(), "prose": prose_documents(man_pages=man_pages),
                 "math": math_documents(math_document_count, seed)}
    train, heldout = {}, {}
    for domain in DOMAINS:
        train[domain], heldout[domain] = split_documents(by_domain[domain], seed, heldout_fraction,
                                                         max_bytes_per_domain)
    return Corpus(seed=seed, train=train, heldout=heldout, sources=sources)


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

def train_tokenizer(corpus: Corpus, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    max_bytes_per_domain: int | None = None):
    """Byte-level BPE on the training documents of every domain (or, with max_bytes_per_domain,
    on the first documents of each domain's seed-ordered training list up to that many bytes:
    faster, and no domain dominates the merges by size); DeepSeek's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = []
    for domain in corpus.domains:
        budget = max_bytes_per_domain
        for d in corpus.train[domain]:
            if budget is not None and budget <= 0:
                break
            texts.append(d.text)
            if budget is not None:
                budget -= d.nbytes
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tokenizer.token_to_id(BOS_TOKEN) != BOS_TOKEN_ID or tokenizer.token_to_id(EOS_TOKEN) != EOS_TOKEN_ID:
        raise RuntimeError("tokenizer special token ids are not bos=0, eos=1")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)])
    return tokenizer


def encode_documents(tokenizer, docs: list[Document]) -> list[list[int]]:
    """[bos] + tokens + [eos] per document."""
    encodings = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    return [[BOS_TOKEN_ID] + e.ids + [EOS_TOKEN_ID] for e in encodings]


def token_stream(encoded: list[list[int]]) -> np.ndarray:
    """Documents concatenated into one int32 stream (each already carries bos/eos)."""
    if not encoded:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate([np.asarray(ids, dtype=np.int32) for ids in encoded])


def demo_windows(encoded: list[list[int]], doc_ids: list[str], length: int, count: int,
                 min_length: int = 16) -> list[tuple[str, list[int]]]:
    """Up to `count` windows of at most `length` tokens, round-robin over documents (window 0 of
    each document first). Windows shorter than `min_length` are skipped."""
    chunks = [[ids[i:i + length] for i in range(0, len(ids), length)] for ids in encoded]
    out = []
    rank = 0
    while len(out) < count and any(rank < len(c) for c in chunks):
        for doc_id, doc_chunks in zip(doc_ids, chunks):
            if rank < len(doc_chunks) and len(doc_chunks[rank]) >= min_length:
                out.append((doc_id, doc_chunks[rank]))
                if len(out) == count:
                    break
        rank += 1
    return out


def write_demo_files(out_dir, tokenizer, corpus: Corpus, *, length: int = 128,
                     heldout_per_domain: int = 256, calib_per_domain: int = 64) -> dict[str, pathlib.Path]:
    """Writes {domain}_heldout.jsonl and {domain}_calib.jsonl; returns {name: path}."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for domain in corpus.domains:
        for split, docs, count in (("heldout", corpus.heldout[domain], heldout_per_domain),
                                   ("calib", corpus.train[domain], calib_per_domain)):
            if split == "calib":  # a seed-ordered sample of the training documents suffices
                docs = docs[:max(count, 1)]
            windows = demo_windows(encode_documents(tokenizer, docs), [d.doc_id for d in docs],
                                   length, count)
            path = out_dir / f"{domain}_{split}.jsonl"
            path.write_text("".join(json.dumps({"input_ids": ids, "domain": domain, "doc": doc_id})
                                    + "\n" for doc_id, ids in windows))
            paths[f"{domain}_{split}"] = path
    return paths


def read_demo_file(path) -> list[list[int]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["input_ids"] for line in f if line.strip()]


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the offline corpus, its tokenizer and "
                                                 "demonstration files (no model).")
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--max-bytes-per-domain", type=int)
    parser.add_argument("--man-pages", type=int, default=0)
    args = parser.parse_args(argv)
    corpus = build_corpus(args.seed, max_bytes_per_domain=args.max_bytes_per_domain,
                          man_pages=args.man_pages)
    tokenizer = train_tokenizer(corpus, args.vocab_size)
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "corpus_manifest.json").write_text(json.dumps(corpus.manifest(), indent=1) + "\n")
    for name, path in write_demo_files(out / "demos", tokenizer, corpus).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
