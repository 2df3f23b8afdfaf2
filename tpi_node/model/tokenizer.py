"""Text <-> token ids for a model directory, with the `tokenizers` library and jinja2 only.

Tokenizer: encode/decode exactly as transformers' AutoTokenizer does for the same directory,
and the model's own chat template rendered the way transformers renders it.
IncrementalDecoder: token-by-token text that never splits a UTF-8 character (vLLM's scheme).
StopMatcher: stop strings found across token boundaries, never emitted.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """Missing tokenizer files, no chat template, or a template that rejects the messages."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    # tokenizer_config.json spells special tokens as "text" or {"content": "text", ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def sampling_defaults(generation_config: dict) -> dict:
    """The model author's sampling defaults (generation_config.json), used by the API for the
    parameters a request leaves out, as vLLM does. Only when the config samples at all."""
    if not generation_config.get("do_sample"):
        return {}
    return {k: generation_config[k] for k in SAMPLING_KEYS if generation_config.get(k) is not None}


class _GenerationTag(jinja2.ext.Extension):
    # transformers' `{% generation %}...{% endgeneration %}` marks assistant text for training
    # masks; for rendering it is a no-op wrapper.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Like transformers: no HTML escaping (jinja's own tojson escapes <, >, &, ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _clean_up_spaces(text: str) -> str:
    # transformers' clean_up_tokenization (only when tokenizer_config asks for it).
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


class Tokenizer:
    def __init__(
        self, backend: HFTokenizer, tok_config: dict, chat_template: str | None, model_eos_ids: list[int]
    ) -> None:
        self._tk = backend
        self.sampling_defaults: dict = {}
        self._chat_source = chat_template
        self._chat_compiled: jinja2.Template | None = None
        self._clean_up = bool(tok_config.get("clean_up_tokenization_spaces", False))
        self.special_tokens = {
            k: _token_text(tok_config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        self.bos_token_id = self._id_of(self.special_tokens["bos_token"])
        self.eos_token_id = self._id_of(self.special_tokens["eos_token"])
        self.eos_token_ids: set[int] = set(model_eos_ids)
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)
        # encode() adds exactly the special tokens of tokenizer.json's post-processor, as
        # transformers 5 does (it drops tokenizer_config's add_bos/eos_token when a
        # tokenizer.json exists).

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {path}")
        backend = HFTokenizer.from_file(str(tok_file))
        tok_config = _read_json(path / "tokenizer_config.json")
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = path / "chat_template.jinja"
        if not template and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        eos: list[int] = []
        for name in ("config.json", "generation_config.json"):
            eos += _as_id_list(_read_json(path / name).get("eos_token_id"))
        tok = cls(backend, tok_config, template or None, eos)
        tok.sampling_defaults = sampling_defaults(_read_json(path / "generation_config.json"))
        return tok

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tk.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what the grammar matcher is built from)."""
        return self._tk.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up else text

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_source)

    @property
    def chat_template(self) -> str | None:
        return self._chat_source

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages with the model's own template. Content may be a string or a list
        of {"type": "text", "text": ...} parts (joined with newlines)."""
        if not self._chat_source:
            raise TokenizerError("this model has no chat template; use the completions API")
        if self._chat_compiled is None:
            try:
                self._chat_compiled = compile_chat_template(self._chat_source)
            except jinja2.TemplateSyntaxError as exc:
                raise TokenizerError(f"the model's chat template is invalid: {exc}") from None
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(kwargs)
        try:
            return self._chat_compiled.render(
                messages=[_plain_message(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template error: {exc}") from None


def _plain_message(message: dict) -> dict:
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"
        )
    elif content is None:
        content = ""
    return {**message, "content": content}


class IncrementalDecoder:
    """push(token_id) -> only the new, complete text. Decodes a small window of recent tokens
    (prefix..end) and emits what grew past the already-emitted part, so the cost per token
    does not grow with the sequence and tokenizer context (leading spaces) is respected."""

    CONTEXT = 5  # prompt tokens used as left context, as vLLM does

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: list[int] | None = None
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self.CONTEXT :]) if prompt_ids else []
        self._prefix = 0  # window start: context only, already emitted
        self._read = len(self._ids)  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _pending(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        return full[len(prefix_text) :] if len(full) > len(prefix_text) else ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        new = self._pending()
        if not new or new.endswith(REPLACEMENT_CHAR):
            return ""  # nothing yet, or a character still incomplete
        # Slide the window: what was new becomes the next context.
        self._ids = self._ids[self._read :]
        self._prefix, self._read = 0, len(self._ids)
        return new

    def flush(self) -> str:
        """End of sequence: whatever is held back, minus bytes that never became a character."""
        new = self._pending().rstrip(REPLACEMENT_CHAR)
        self._ids = self._ids[self._read :]
        self._prefix, self._read = 0, len(self._ids)
        return new


class StopMatcher:
    """feed(delta) -> (text to emit, stopped). Holds back any tail that could begin a stop
    string; on a match emits the text before it and nothing after."""

    def __init__(self, stop_strings) -> None:
        self.stops = tuple(s for s in stop_strings if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def _hold_len(self, text: str) -> int:
        # Longest suffix of text that is a proper prefix of some stop string.
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            at, matched = min(hits, key=lambda h: h[0])
            # a longer stop string may still begin before `at` (its end not generated yet): wait
            pending = self._partial_start(text, at)
            if pending is None:
                self.matched, self._held, self.stopped = matched, "", True
                return text[:at], True
            self._held = text[pending:]
            return text[:pending], False
        keep = self._hold_len(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def _partial_start(self, text: str, before: int) -> int | None:
        """The first j < before where text[j:] is a proper prefix of a stop string, if any."""
        for j in range(before):
            if any(len(s) > len(text) - j and s.startswith(text[j:]) for s in self.stops):
                return j
        return None

    def flush(self) -> str:
        """The sequence ended: release the held-back tail, up to a stop string it holds (then it
        stopped on that one: a shorter stop string was held back while a longer one that began
        earlier could still complete)."""
        text, self._held = ("" if self.stopped else self._held), ""
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if not hits:
            return text
        at, self.matched = min(hits)
        self.stopped = True
        return text[:at]
