"""Tokenizers: each kind encodes as promised, saves, reloads, and exports to Hugging Face."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HF

from physlm_graph import RuntimeDataError
from physlm_graph.runtime import tokenizers as T
from physlm_graph.runtime.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    make_tokenizer,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs the shared test corpora")
GPT2 = DATA / "tokenizers" / "gpt2"
SHAKESPEARE = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8") if DATA.is_dir() else ""
KOREAN = (DATA / "korean" / "chatbot_data" / "ChatbotData.csv").read_text(encoding="utf-8") if DATA.is_dir() else ""
SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:  Speak, speak.\n"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def kinds(bpe_dir) -> dict[str, Tokenizer]:
    small = SHAKESPEARE[:100_000]
    return {
        "bytes": make_tokenizer("bytes", cache_dir=bpe_dir),
        "chars": make_tokenizer("chars", train_text=SHAKESPEARE, cache_dir=bpe_dir),
        "bpe": make_tokenizer("bpe:300", train_text=small, cache_dir=bpe_dir),
        "gpt2": make_tokenizer(str(GPT2), cache_dir=bpe_dir),
    }


def test_bytes_round_trips_korean():
    tok = ByteTokenizer()
    ids = tok.encode(KOREAN)
    assert ids == list(KOREAN.encode("utf-8"))
    assert tok.decode(ids) == KOREAN
    assert (tok.vocab_size, tok.eos_id, tok.name) == (256, None, "bytes")
    assert isinstance(tok, Tokenizer)


def test_bytes_decode_of_a_cut_character_does_not_raise():
    assert ByteTokenizer().decode(list("한".encode())[:2]) == "\ufffd"


def test_chars_has_65_symbols_on_tiny_shakespeare():
    tok = make_tokenizer("chars", train_text=SHAKESPEARE, cache_dir=Path("unused"))
    assert tok.vocab_size == 65
    assert tok.decode(tok.encode(SHAKESPEARE)) == SHAKESPEARE
    assert tok.encode("\n !") == [0, 1, 2]  # sorted order, as nanoGPT's meta.pkl


def test_chars_refuses_an_unknown_character():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(RuntimeDataError) as err:
        tok.encode("abz")
    assert str(err.value) == (
        "data error: character 'z' (U+007A) at position 2 is not in the 'chars' vocabulary of 3 characters\n"
        "  fix: encode text that uses the training text's characters, or use the 'bytes' tokenizer, "
        "which encodes any text"
    )


def test_gpt2_folder_gives_gpt2_ids(kinds):
    tok = kinds["gpt2"]
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert tok.decode(tok.encode(KOREAN[:5000])) == KOREAN[:5000]


def test_bpe_trains_to_its_size_and_round_trips(kinds):
    tok = kinds["bpe"]
    assert tok.vocab_size == 300
    assert tok.eos_id == 0
    assert tok.decode(tok.encode(SAMPLE + "한국어")) == SAMPLE + "한국어"
    assert len(tok.encode(SAMPLE)) < len(SAMPLE.encode())  # merges did something


def test_bpe_is_cached_per_text_and_size(bpe_dir, kinds, monkeypatch):
    small = SHAKESPEARE[:100_000]
    folder = next((bpe_dir / "tokenizers").glob("bpe300-*"))
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(T, "_train_bpe", no_training)
    again = make_tokenizer("bpe:300", train_text=small, cache_dir=bpe_dir)
    assert again.fingerprint() == kinds["bpe"].fingerprint()
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="retrained"):  # another text is another entry
        make_tokenizer("bpe:300", train_text=small + "x", cache_dir=bpe_dir)


@pytest.mark.parametrize("kind", ["bytes", "chars", "bpe", "gpt2"])
def test_save_and_load_round_trip(kinds, kind, tmp_path):
    tok = kinds[kind]
    tok.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert type(back) is type(tok)
    assert (back.fingerprint(), back.vocab_size, back.eos_id, back.name) == (
        tok.fingerprint(), tok.vocab_size, tok.eos_id, tok.name)
    assert back.encode(SAMPLE) == tok.encode(SAMPLE)
    assert back.fingerprint().startswith({"gpt2": "bpe"}.get(kind, kind) + ":")


@pytest.mark.parametrize("kind", ["bytes", "chars", "bpe", "gpt2"])
def test_to_hf_tokenizer_json_encodes_identically(kinds, kind, tmp_path):
    tok = kinds[kind]
    text = SHAKESPEARE[:20_000] + ("" if kind == "chars" else KOREAN[:2000])
    hf = HF.from_file(str(tok.to_hf(tmp_path)))
    ids = hf.encode(text, add_special_tokens=False).ids
    assert ids == tok.encode(text)
    assert hf.decode(ids, skip_special_tokens=False) == text
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_transformers_loads_the_export(kinds, tmp_path):
    from transformers import PreTrainedTokenizerFast

    kinds["bytes"].to_hf(tmp_path)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast.encode("안녕 hi", add_special_tokens=False) == list("안녕 hi".encode())


def test_fingerprints_differ_between_vocabularies():
    prints = {CharTokenizer.from_text("abc").fingerprint(), CharTokenizer.from_text("abd").fingerprint(),
              ByteTokenizer().fingerprint()}
    assert len(prints) == 3
    assert CharTokenizer.from_text("cab").fingerprint() == CharTokenizer.from_text("abc").fingerprint()


def test_a_tampered_saved_tokenizer_is_refused(tmp_path):
    CharTokenizer.from_text("abc").save(tmp_path)
    desc = json.loads((tmp_path / "physlm_tokenizer.json").read_text())
    desc["chars"] = ["a", "b", "x"]
    (tmp_path / "physlm_tokenizer.json").write_text(json.dumps(desc))
    with pytest.raises(RuntimeDataError, match="the tokenizer files do not match their description"):
        load_tokenizer(tmp_path)


def test_not_a_tokenizer_folder(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(RuntimeDataError) as err:
        load_tokenizer(tmp_path)
    assert str(err.value) == (
        f"data error: {tmp_path}: not a tokenizer folder: expected physlm_tokenizer.json, tokenizer.json, "
        "or vocab.json + merges.txt; it holds ['vocab.json']\n"
        "  fix: point at a folder written by Tokenizer.save, a Hugging Face tokenizer folder, "
        "or GPT-2 style vocab.json + merges.txt"
    )


def test_a_broken_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(RuntimeDataError, match="not a readable Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)


def test_unknown_spec_names_the_kinds(tmp_path):
    with pytest.raises(RuntimeDataError) as err:
        make_tokenizer("gpt2-hub-name", cache_dir=tmp_path)
    assert str(err.value) == (
        "data error: tokenizer 'gpt2-hub-name' is not a tokenizer kind and no such folder exists\n"
        "  fix: use bytes, chars, bpe:N (e.g. bpe:8192), or a folder with tokenizer.json or "
        "vocab.json + merges.txt; a Hugging Face hub tokenizer must first be downloaded "
        "(save_pretrained) on a machine with network access"
    )


@pytest.mark.parametrize("spec", ["bpe:100", "bpe:x"])
def test_bpe_size_is_checked(spec, tmp_path):
    with pytest.raises(RuntimeDataError, match=r"expected bpe:N with N >= 257"):
        make_tokenizer(spec, train_text="abc", cache_dir=tmp_path)


@pytest.mark.parametrize("spec", ["chars", "bpe:300"])
def test_learned_kinds_need_text(spec, tmp_path):
    with pytest.raises(RuntimeDataError, match="training text, and none was given"):
        make_tokenizer(spec, cache_dir=tmp_path)


def test_hf_tokenizer_wraps_any_tokenizer_json(kinds, tmp_path):
    kinds["gpt2"].to_hf(tmp_path)
    tok = make_tokenizer(str(tmp_path), cache_dir=tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.name == tmp_path.name
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.fingerprint().startswith("hf:")
