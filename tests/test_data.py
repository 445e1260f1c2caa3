"""lowbit.data: the bundled split (disjoint novels), loading user text, tokenisation, samples."""

from __future__ import annotations

import gzip
import hashlib
import re

import pytest
import torch

from lowbit.data import SPLITS, calibration_samples, default_bos_id, eval_tokens, load_text, tokenize
from lowbit.data.texts import _read_bundled
from lowbit.errors import LowbitError

# sha256 of each bundled novel, uncompressed (the same table is in src/lowbit/data/text/README.md)
SHA256 = {
    "prideprejudice": "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d",
    "mansfieldpark": "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9",
    "persuasion": "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a",
    "emma": "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
}


def _train_tokenizer(add_bos: bool):
    """A real (tiny) byte-level BPE tokenizer, trained offline in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([load_text("calibration")[:60_000]], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer(add_bos=False)


@pytest.fixture(scope="module")
def tok_bos():
    return _train_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def texts():
    return {name: load_text(name) for name in SPLITS}


def paragraphs(text: str) -> set[str]:
    """Blank-line separated blocks, whitespace-normalised."""
    return {" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()}


# ---------------------------------------------------------------- the bundled split


def test_bundled_novels_are_intact():
    for stem, digest in SHA256.items():
        assert hashlib.sha256(_read_bundled(stem).encode("utf-8")).hexdigest() == digest, stem
    assert SPLITS == {"calibration": ("prideprejudice", "mansfieldpark"), "evaluation": ("persuasion", "emma")}


def test_splits_are_the_documented_novels_in_order(texts):
    cal, ev = texts["calibration"], texts["evaluation"]
    assert cal.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen")
    assert cal.index("It is a truth universally acknowledged") < cal.index("MANSFIELD PARK")
    assert ev.startswith("Persuasion\n\n\nby\n\nJane Austen")
    assert ev.index("Sir Walter Elliot, of Kellynch Hall") < ev.index("Emma Woodhouse, handsome, clever, and rich")
    # each novel stripped of blank lines at its edges, joined by three newlines, one final newline
    assert cal == _read_bundled("prideprejudice").strip("\n") + "\n\n\n" + _read_bundled("mansfieldpark").strip("\n") + "\n"
    assert ev == _read_bundled("persuasion").strip("\n") + "\n\n\n" + _read_bundled("emma").strip("\n") + "\n"
    assert cal.endswith("\n") and not cal.endswith("\n\n")


def test_calibration_and_evaluation_share_no_paragraph(texts):
    cal, ev = paragraphs(texts["calibration"]), paragraphs(texts["evaluation"])
    assert len(cal) > 3000 and len(ev) > 3000
    shared = cal & ev
    # Only headings, the by-line and two stock replies occur in both -- no prose.
    boilerplate = re.compile(r'(CHAPTER [IVXLC]+|Chapter \d+|By Jane Austen|"Yes\."|"Not at all\.")')
    assert all(boilerplate.fullmatch(p) for p in shared), sorted(p for p in shared if not boilerplate.fullmatch(p))
    assert not [p for p in shared if len(p) >= 20]
    # and no long sentence of one split appears anywhere in the other
    probe = [p for p in sorted(ev) if len(p) > 400][::50]
    assert probe and not any(p[:200] in " ".join(texts["calibration"].split()) for p in probe)


# ---------------------------------------------------------------- user text files


def test_load_text_from_a_file(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_bytes("\ufeffFirst line\r\nSecond — line\r\n".encode("utf-8"))
    assert load_text(str(plain)) == "First line\nSecond — line\n"
    packed = tmp_path / "b.txt.gz"
    packed.write_bytes(gzip.compress("zipped text\n".encode()))
    assert load_text(str(packed)) == "zipped text\n"


@pytest.mark.parametrize("content, message", [
    (None, "text file not found"),
    (b"", "text file is empty"),
    (b"  \n\t\n", "text file is empty"),
    (b"caf\xe9 latin-1", "not UTF-8 text (invalid byte 0xe9 at offset 3)"),
])
def test_load_text_bad_files_raise_one_line(tmp_path, content, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LowbitError, match=re.escape(message)) as info:
        load_text(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, data, message", [
    ("c.txt.gz", gzip.compress(b"good text " * 1000)[:-20] + b"x" * 20, "not a valid gzip file"),  # corrupt body
    ("d.txt.gz", b"\x1f\x8b\x08\x00garbage", "not a valid gzip file"),
    ("e.txt.gz", b"not gzip at all", "not a valid gzip file"),
    ("f.bin", b"\x7fELF\x02\x01\x01\x00\x00\x00", "binary data, not text (a NUL byte at offset 7)"),
    ("g.txt", "utf-16 text".encode("utf-16"), "binary data"),
])
def test_odd_text_files_are_one_line_errors(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(LowbitError, match=re.escape(message)) as info:
        load_text(str(path))
    assert "\n" not in str(info.value)


def test_large_texts_and_bombs_stop_at_the_cap(tmp_path, monkeypatch, capsys):
    import lowbit.data.texts as texts

    monkeypatch.setattr(texts, "MAX_TEXT_BYTES", 1 << 16)
    line = "a line of text, é and ü included\n"
    big = tmp_path / "big.txt"
    big.write_text(line * 10000)  # ~360 KB, over the 64 KB cap
    got = load_text(str(big))
    assert 0 < len(got.encode()) <= 1 << 16 and got.endswith("\n") and set(got.splitlines()) == {line[:-1]}
    assert "using its first" in capsys.readouterr().err
    bomb = tmp_path / "bomb.txt.gz"  # 200 MB of text in ~200 KB: only the cap is ever decompressed
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        chunk = b"x" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
    got = load_text(str(bomb))
    assert len(got) == 1 << 16 and set(got) == {"x"}
    one = tmp_path / "one-line.txt"  # no line end within the cap: cut between characters, never inside one
    one.write_bytes(("é" * 40000).encode())
    assert set(load_text(str(one))) == {"é"}


def test_long_texts_are_tokenised_in_paragraph_pieces(monkeypatch):
    import lowbit.data.texts as texts

    monkeypatch.setattr(texts, "_TOKENIZE_PIECE", 100)
    text = "".join(f"paragraph {i} " * (i % 7 + 1) + "\n\n\n" for i in range(200))
    pieces = list(texts._pieces(text))
    assert "".join(pieces) == text and len(pieces) > 20
    assert all(p.endswith("\n") for p in pieces[:-1])  # cut after blank lines only
    assert list(texts._pieces("short")) == ["short"]


def test_load_text_rejects_directories_and_typos(tmp_path):
    with pytest.raises(LowbitError, match="not a regular file"):
        load_text(str(tmp_path))
    with pytest.raises(LowbitError, match="names: calibration, evaluation"):
        load_text("calibraton")


# ---------------------------------------------------------------- tokenisation


def test_default_bos_id_is_decided_by_behaviour(tok, tok_bos):
    assert default_bos_id(tok) is None
    assert default_bos_id(tok_bos) == 0

    class NoBos:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    assert default_bos_id(NoBos()) is None


def test_eval_tokens_are_the_whole_text_without_special_tokens(tok, tok_bos, texts):
    text = texts["evaluation"][:20_000]
    for t in (tok, tok_bos):
        ids = eval_tokens(t, text)
        assert ids.dtype == torch.long and ids.dim() == 1
        assert ids.tolist() == t(text, add_special_tokens=False)["input_ids"]
        assert 0 not in ids.tolist() and 1 not in ids.tolist()  # no <s> / </s>
        assert t.decode(ids.tolist()) == text  # byte-level BPE is lossless: nothing dropped
    with pytest.raises(LowbitError, match="empty"):
        eval_tokens(tok, "   ")
    with pytest.raises(LowbitError, match="load_text"):
        tokenize(tok, b"bytes")


def _is_window_of(row: torch.Tensor, ids: torch.Tensor) -> bool:
    return bool((ids.unfold(0, row.numel(), 1) == row).all(dim=1).any())


def test_calibration_samples_are_seeded_windows_of_the_text(tok, texts):
    text = texts["calibration"][:30_000]
    ids = tokenize(tok, text)
    x = calibration_samples(tok, n_samples=8, seq_len=64, text=text, seed=0)
    assert x.shape == (8, 64) and x.dtype == torch.long
    assert all(_is_window_of(row, ids) for row in x)
    assert torch.equal(x, calibration_samples(tok, n_samples=8, seq_len=64, text=text, seed=0))
    assert not torch.equal(x, calibration_samples(tok, n_samples=8, seq_len=64, text=text, seed=1))
    assert len({tuple(r.tolist()) for r in x}) == 8  # distinct random offsets


def test_calibration_samples_start_with_bos_when_the_tokenizer_adds_it(tok_bos, texts):
    text = texts["calibration"][:30_000]
    ids = tokenize(tok_bos, text)
    x = calibration_samples(tok_bos, n_samples=4, seq_len=33, text=text, seed=3)
    assert x.shape == (4, 33)
    assert (x[:, 0] == 0).all() and not (x[:, 1:] == 0).any()
    assert all(_is_window_of(row[1:], ids) for row in x)


def test_calibration_samples_default_to_the_bundled_calibration_text(tok, texts):
    x = calibration_samples(tok, n_samples=4, seq_len=32)
    ids = tokenize(tok, texts["calibration"])
    assert ids.numel() > 500_000
    assert x.shape == (4, 32) and all(_is_window_of(row, ids) for row in x)


def test_calibration_samples_errors(tok):
    short = "Only a few words here."
    n = tokenize(tok, short).numel()
    assert calibration_samples(tok, n_samples=2, seq_len=n, text=short).shape == (2, n)  # exactly fits
    with pytest.raises(LowbitError, match=f"calibration text too short: {n} tokens"):
        calibration_samples(tok, n_samples=2, seq_len=n + 1, text=short)
    with pytest.raises(LowbitError, match="seq_len"):
        calibration_samples(tok, seq_len=1, text=short)
    with pytest.raises(LowbitError, match="n_samples"):
        calibration_samples(tok, n_samples=0, text=short)


def test_tokenize_keeps_recent_ids_of_fast_tokenizers():
    """A fast tokenizer's ids of a text are computed once (keyed by digests of its serialized
    pipeline and of the text); callers get copies, and another text or tokenizer is tokenised."""
    from lowbit.data import texts
    from lowbit.models.tiny import tiny_model

    tok = tiny_model("llama", seed=3).tokenizer
    calls = []
    real = texts._encode
    texts._TOKENIZED.clear()
    try:
        texts._encode = lambda *a, **k: calls.append(1) or real(*a, **k)
        a = texts.tokenize(tok, "The quick brown fox. " * 50)
        n = len(calls)
        a[:] = -1                                                       # the caller's copy only
        b = texts.tokenize(tiny_model("llama", seed=4).tokenizer, "The quick brown fox. " * 50)  # same pipeline
        assert len(calls) == n and torch.equal(b, texts.tokenize(tok, "The quick brown fox. " * 50))
        assert int(b.min()) >= 0
        texts.tokenize(tok, "Another text.")
        assert len(calls) > n
    finally:
        texts._encode = real
        texts._TOKENIZED.clear()
