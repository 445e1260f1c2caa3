"""Bundled calibration / evaluation text, and how text becomes token ids.

The split
---------
Four public-domain Jane Austen novels are bundled gzip-compressed in ``lowbit/data/text/``
(byte-for-byte from Debian's ``r-cran-janeaustenr``; provenance and sha256 sums in
``text/README.md``):

============  =========================================  ==================
name          novels, in this order                      size (characters)
============  =========================================  ==================
calibration   Pride and Prejudice, then Mansfield Park   684,768 + 883,279
evaluation    Persuasion, then Emma                      466,854 + 883,028
============  =========================================  ==================

Calibration and evaluation text come from *different novels*, so nothing a method calibrates on
is ever scored.  ``tests/test_data.py`` checks that the two texts share no paragraph of 20 or
more characters (the only paragraphs they do share are chapter headings such as "CHAPTER IV",
the by-line "By Jane Austen" and the replies '"Yes."' and '"Not at all."').  The novels of a split are joined
in the order above, each stripped of leading/trailing blank lines, separated by three newlines,
with one final newline.

Caveat: these novels are almost certainly in every LLM's pre-training data.  That is fine for
before/after comparisons of the same model (what lowbit measures); do not read the absolute
perplexities as a claim about held-out text.

Tokenisation rules
------------------
* Text is tokenised **once, as a whole**, with ``add_special_tokens=False``: special tokens
  never appear inside the stream.
* :func:`default_bos_id` decides whether a tokenizer "adds BOS by default": it encodes a probe
  string with and without special tokens and returns ``bos_token_id`` only if the encoding
  with special tokens starts with it and the plain one does not.  (SmolLM2's tokenizer adds none; Llama/Gemma ones do.)
* :func:`calibration_samples` cuts ``n_samples`` windows at seeded random offsets: distinct
  offsets drawn uniformly without replacement (``torch.randperm``; with replacement only if
  more samples than offsets are asked for).  Windows may overlap, as in the GPTQ paper.  If
  the tokenizer adds BOS, every sample is ``[BOS] + (seq_len - 1)`` text tokens, otherwise
  ``seq_len`` text tokens.
* :func:`eval_tokens` returns the whole text's ids; the perplexity protocol in
  :mod:`lowbit.eval.quality` decides how they are windowed and where BOS goes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
from collections import OrderedDict
from pathlib import Path

import torch

from lowbit.errors import LowbitError

__all__ = [
    "SPLITS",
    "load_text",
    "default_bos_id",
    "tokenize",
    "eval_tokens",
    "calibration_samples",
]

#: name -> bundled novels (file stems in lowbit/data/text/), in the order they are joined.
SPLITS: dict[str, tuple[str, ...]] = {
    "calibration": ("prideprejudice", "mansfieldpark"),
    "evaluation": ("persuasion", "emma"),
}

_NOVEL_SEPARATOR = "\n\n\n"


def _read_bundled(stem: str) -> str:
    resource = importlib.resources.files("lowbit.data") / "text" / f"{stem}.txt.gz"
    try:
        raw = gzip.decompress(resource.read_bytes())
    except (FileNotFoundError, OSError) as e:  # a broken install, not user input
        raise LowbitError(f"bundled text {stem}.txt.gz is missing or corrupt in this install: {e}") from None
    return raw.decode("utf-8")


MAX_TEXT_BYTES = 32 << 20   # of a user's text file (decompressed): ~8M tokens, twice what any run takes
_TOKENIZE_PIECE = 4 << 20   # texts longer than this are tokenised a paragraph-aligned piece at a time


def _read_user_file(path_str: str) -> str:
    import sys
    import zlib

    path = Path(path_str).expanduser()
    hint = f"(names: {', '.join(SPLITS)}; otherwise a path to a UTF-8 text file)"
    if not path.exists():
        raise LowbitError(f"text file not found: {path} {hint}")
    if not path.is_file():
        raise LowbitError(f"not a regular file: {path} {hint}")
    gz = path.suffix == ".gz"
    try:  # read incrementally up to the cap: a 200 MB file or a decompression bomb stops there
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            raw = f.read(MAX_TEXT_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        if gz and not isinstance(e, FileNotFoundError):
            raise LowbitError(f"{path}: not a valid gzip file ({e})") from None
        raise LowbitError(f"cannot read text file {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(raw) > MAX_TEXT_BYTES:
        cut = raw.rfind(b"\n", 0, MAX_TEXT_BYTES)
        raw = raw[: cut + 1 if cut > 0 else MAX_TEXT_BYTES]
        if not raw.endswith(b"\n"):  # no line end in reach: drop a character the cut may have split
            i = len(raw) - 1
            while i > 0 and (raw[i] & 0xC0) == 0x80 and len(raw) - i < 4:
                i -= 1
            if raw[i] >= 0xC0:
                raw = raw[:i]
        print(f"lowbit: {path} is longer than {MAX_TEXT_BYTES >> 20} MiB of text; using its first "
              f"{len(raw) / 2**20:.1f} MiB", file=sys.stderr, flush=True)
    nul = raw.find(b"\x00", 0, 65536)
    if nul >= 0:
        raise LowbitError(f"{path}: binary data, not text (a NUL byte at offset {nul})")
    try:
        text = raw.decode("utf-8-sig")  # utf-8, tolerating a leading byte-order mark
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise LowbitError(f"{path}: text file is empty")
    return text


def load_text(name_or_path: str) -> str:
    """The text of a bundled split ("calibration", "evaluation") or of a user's file.

    A user's file must be UTF-8 (a byte-order mark is dropped; ``.gz`` files are decompressed);
    line ends are normalised to ``\\n``.  A missing, empty or undecodable file raises
    :class:`LowbitError` with a one-line message.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise LowbitError(f"load_text expects a split name or a file path, got {type(name_or_path).__name__}")
    key = str(name_or_path)
    if key in SPLITS:
        novels = (_read_bundled(stem).strip("\n") for stem in SPLITS[key])
        return _NOVEL_SEPARATOR.join(novels) + "\n"
    return _read_user_file(key)


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """ids of ``text`` from an HF-style tokenizer (``tokenizer(text, ...)["input_ids"]``)."""
    try:
        # verbose=False silences HF's "longer than model_max_length" warning: we window ourselves.
        enc = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)
    except TypeError:
        enc = tokenizer(text, add_special_tokens=add_special_tokens)
    ids = enc["input_ids"] if not isinstance(enc, (list, torch.Tensor)) else enc
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return list(ids)


def default_bos_id(tokenizer) -> int | None:
    """``tokenizer.bos_token_id`` if the tokenizer prepends BOS by default, else ``None``.

    Decided by behaviour, not by flags: "a" is encoded with and without special tokens, and
    BOS counts as added iff only the encoding with special tokens starts with ``bos_token_id``.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = _encode(tokenizer, "a", add_special_tokens=True)
    plain = _encode(tokenizer, "a", add_special_tokens=False)
    if with_special[:1] == [bos] and plain[:1] != [bos]:
        return int(bos)
    return None


def _pieces(text: str):
    """``text`` whole, or (above _TOKENIZE_PIECE characters) cut after paragraph breaks (line
    ends where there are none) into pieces of at most about that size: a tokenizer handed a
    whole 30 MB string can exhaust memory. A run of line ends is never split, so the ids differ
    from whole-text tokenisation at most in how the newlines before a cut are grouped (the
    bundled texts are far below the size and are tokenised whole, as always)."""
    start = 0
    while len(text) - start > _TOKENIZE_PIECE:
        end = text.rfind("\n\n", start + 1, start + _TOKENIZE_PIECE) + 2     # after the last blank line,
        if end < 2:
            end = text.rfind("\n", start + 1, start + _TOKENIZE_PIECE) + 1    # else the last line end,
        if end < 1:
            end = start + _TOKENIZE_PIECE                                     # else anywhere
        while end < len(text) and text[end] == "\n":
            end += 1
        yield text[start:end]
        start = end
    yield text[start:]


_TOKENIZED: OrderedDict = OrderedDict()  # (tokenizer fingerprint, text digest) -> ids, most recent last
_TOKENIZED_KEEP = 4


def _fingerprint(tokenizer) -> str | None:
    """A digest of what decides a fast (Rust-backed) HF tokenizer's ids without special tokens:
    its whole serialized pipeline (normalizer, pre-tokenizer, model, vocabulary). None for other
    tokenizers, whose output is never cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        return None
    try:
        return hashlib.sha256(to_str().encode()).hexdigest()
    except Exception:  # noqa: BLE001 - an unserializable pipeline is simply not cached
        return None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All of ``text`` as a 1-D LongTensor of ids, without any special tokens.

    The ids of the last few (tokenizer, text) pairs are kept, keyed by digests of the fast
    tokenizer's serialized pipeline and of the text: the bundled calibration text (1.5 M
    characters) takes seconds to tokenise, and a session that quantizes, evaluates and
    quantizes again would tokenise it each time. Callers get a copy."""
    if not isinstance(text, str):
        raise LowbitError(f"expected text as a str, got {type(text).__name__} (use load_text for names/paths)")
    if not text.strip():
        raise LowbitError("cannot tokenise an empty text")
    fp = _fingerprint(tokenizer)
    key = None if fp is None else (fp, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
    if key is not None and key in _TOKENIZED:
        _TOKENIZED.move_to_end(key)
        return _TOKENIZED[key].clone()
    ids = []
    for piece in _pieces(text):
        ids.extend(_encode(tokenizer, piece, add_special_tokens=False))
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() == 0:
        raise LowbitError("the tokenizer produced no tokens for this text")
    if key is not None:
        _TOKENIZED[key] = ids.clone()
        while len(_TOKENIZED) > _TOKENIZED_KEEP:
            _TOKENIZED.popitem(last=False)
    return ids


def eval_tokens(tokenizer, text: str) -> torch.Tensor:
    """The whole evaluation text as a 1-D LongTensor of ids without special tokens.

    Pass the result to :func:`lowbit.eval.quality.evaluate_quality` together with
    ``bos_id=default_bos_id(tokenizer)``.
    """
    return tokenize(tokenizer, text)


def calibration_samples(
    tokenizer,
    n_samples: int = 32,
    seq_len: int = 512,
    text: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """``n_samples`` random fixed-length token windows of calibration text, ``[n_samples, seq_len]``.

    ``text`` is the text itself (default: ``load_text("calibration")``).  It is tokenised once
    without special tokens; distinct window starts are drawn uniformly with a ``torch.Generator``
    seeded by ``seed`` (the same seed, text and tokenizer give the same samples).  If the tokenizer adds
    BOS by default (:func:`default_bos_id`), each row is ``[BOS] + seq_len-1`` text tokens.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise LowbitError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise LowbitError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if text is None:
        text = load_text("calibration")
    ids = tokenize(tokenizer, text)
    bos = default_bos_id(tokenizer)
    span = seq_len - (1 if bos is not None else 0)  # text tokens per sample
    n = ids.numel()
    if n < span:
        raise LowbitError(
            f"calibration text too short: {n} tokens, but one sample of seq_len={seq_len} needs {span} text tokens"
        )
    gen = torch.Generator().manual_seed(int(seed))
    n_starts = n - span + 1
    if n_samples <= n_starts:  # distinct offsets (windows may still overlap)
        starts = torch.randperm(n_starts, generator=gen)[:n_samples]
    else:  # more samples than offsets: repeats are unavoidable
        starts = torch.randint(0, n_starts, (n_samples,), generator=gen)
    windows = ids[starts[:, None] + torch.arange(span)[None, :]]  # [n_samples, span]
    if bos is not None:
        windows = torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows
