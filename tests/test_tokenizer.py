"""Tokenizer vs transformers' AutoTokenizer on the real SmolLM2 directory and on synthetic
ones; IncrementalDecoder and StopMatcher on real token streams."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tpi_node.model.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "",
    "  leading spaces and trailing  ",
    "line one\nline two\n\n\ttabbed",
    "Ünïcödé façade — naïve café",
    "emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 done",
    "中文字符和日本語のテキスト、한국어",
    "<|im_start|>user\nspecial tokens inside<|im_end|>",
    "numbers 1234567890 and code: def f(x): return x**2",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? 🤔"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir), transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(smol, text):
    ours, hf = smol
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == hf.encode(text, add_special_tokens=special)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("gen_prompt", [True, False])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:2]])
def test_chat_template_matches_transformers(smol, messages, gen_prompt):
    ours, hf = smol
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen_prompt) == expected


def test_content_parts_are_joined(smol):
    ours, _ = smol
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert ours.apply_chat_template(parts) == ours.apply_chat_template([{"role": "user", "content": "a\nb"}])


def test_special_ids(smol):
    ours, hf = smol
    assert hf.convert_tokens_to_ids("<|im_end|>") in ours.eos_token_ids
    assert ours.vocab_size == len(hf)
    assert ours.id_to_token(hf.convert_tokens_to_ids("<|im_start|>")) == "<|im_start|>"


def _edited_copy(src, dst, **tok_config_changes):
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value in tok_config_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    return dst


def _with_bos_post_processor(path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    backend = Backend.from_file(str(path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    backend.save(str(path / "tokenizer.json"))


@pytest.mark.parametrize("bos_post_processor", [False, True])
@pytest.mark.parametrize("changes", [{}, {"add_bos_token": True}, {"add_eos_token": True}])
def test_bos_eos_rules_match_transformers(tiny_model_dir, tmp_path, changes, bos_post_processor):
    path = _edited_copy(tiny_model_dir("tiny-llama"), tmp_path / "m", **changes)
    if bos_post_processor:
        _with_bos_post_processor(path)
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in ("hi there", "", "x😀"):
        assert ours.encode(text) == hf.encode(text)
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert (ours.encode("hi")[0] == ours.bos_token_id) == bos_post_processor
    assert ours.apply_chat_template(CONVERSATION) == hf.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )


def test_missing_chat_template_is_a_clear_error(tiny_model_dir, tmp_path):
    path = _edited_copy(tiny_model_dir("tiny-llama"), tmp_path / "m", chat_template=None)
    tok = Tokenizer.from_dir(path)
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(CONVERSATION)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_template_helpers_like_transformers(tiny_model_dir, tmp_path):
    template = (
        "{% if messages|length > 2 %}{{ raise_exception('too many') }}{% endif %}"
        "{{ messages|tojson }}|{{ strftime_now('%Y') }}|{{ bos_token }}"
    )
    path = _edited_copy(tiny_model_dir("tiny-llama"), tmp_path / "m", chat_template=template)
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "user", "content": "<b>é</b>"}]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="too many"):
        ours.apply_chat_template(CONVERSATION)


def _stream(tok, ids, **kw):
    dec = IncrementalDecoder(tok, **kw)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces, dec


@pytest.mark.parametrize("text", [t for t in TEXTS if t] + ["🙂" * 40 + "漢字" * 30])
def test_incremental_decode_equals_full_decode(smol, tiny_model_dir, text):
    byte_level = Tokenizer.from_dir(tiny_model_dir("tiny-llama"))  # one token per byte
    for tok in (smol[0], byte_level):
        ids = tok.encode(text, add_special_tokens=False)
        pieces, dec = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)
        assert len(dec._ids) <= 8  # the decode window stays small


def test_incremental_holds_back_partial_characters(tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir("tiny-llama"))
    ids = tok.encode("a😀", add_special_tokens=False)  # 1 + 4 byte tokens
    assert len(ids) == 5
    pieces, _ = _stream(tok, ids)
    assert pieces == ["a", "", "", "", "😀", ""]
    truncated, _ = _stream(tok, ids[:3])  # ends mid-character
    assert truncated == ["a", "", "", ""]


def test_stop_string_split_across_tokens(smol):
    tok = smol[0]
    text = "The answer is 42.\nEND-OF-ANSWER and more text"
    ids = tok.encode(text, add_special_tokens=False)
    dec, stop = IncrementalDecoder(tok), StopMatcher(["END-OF-ANSWER"])
    out, stopped_at = [], None
    for n, i in enumerate(ids):
        emitted, stopped = stop.feed(dec.push(i))
        out.append(emitted)
        if stopped:
            stopped_at = n
            break
    assert "".join(out) == "The answer is 42.\n"
    assert stopped_at is not None and stopped_at < len(ids) - 1
    assert len(tok.encode("END-OF-ANSWER", add_special_tokens=False)) > 1


def test_stop_matcher_examples():
    m = StopMatcher(["</end>", "STOP"])
    assert m.feed("hello </") == ("hello ", False)
    assert m.feed("en") == ("", False)
    assert m.feed("x ST") == ("</enx ", False)  # not a stop after all: released
    assert m.feed("OP tail") == ("", True)
    assert m.matched == "STOP"
    assert m.feed("more") == ("", True)
    m = StopMatcher(["abc"])
    assert m.feed("xab") == ("x", False)
    assert m.flush() == "ab"  # stream ended: the tail is text


@example(text="<>", stops=[">", "<><"], cuts=[])  # ">" held back while "<><" could still begin at 0
@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc<>/ ", max_size=40),
    stops=st.lists(st.text(alphabet="abc<>/", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_matcher_equals_cutting_at_first_stop(text, stops, cuts):
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    expected = text[: min(hits)] if hits else text
    m, out, bounds = StopMatcher(stops), [], sorted(set([0, len(text)] + [c for c in cuts if c < len(text)]))
    stopped = False
    for a, b in zip(bounds, bounds[1:]):
        emitted, stopped = m.feed(text[a:b])
        out.append(emitted)
        assert not any(s in "".join(out) for s in stops)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
        stopped = m.stopped  # a stop string found in the held-back tail when the text ended
    assert "".join(out) == expected
    assert stopped == bool(hits)
