"""Examples → token ids: the scored ids are the data's own text, with a prompt shared by all K completions.

Three modes (`--tokenization`), one mechanism: tokenize the prompt alone and each prompt + completion
as one text; the prompt ids are the longest prefix that the prompt alone and every prompt +
completion share, and each completion's ids are the rest of its joint ids.

  joint     (default) exactly that. prompt ids + completion ids == tokenizer(prompt + completion)
            for every completion: the scored ids decode to the data's text. Where the tokenizer merges
            the prompt's last characters with a completion's first ones, the ids from the first
            disagreement on belong to the completions (`Tokenized.boundary_moved`; the sidecar counts
            such rows): every completion is still scored from one shared prompt.
  trl       TRL 1.16's DPOTrainer ids (its `tokenize_fn`): joint, plus the EOS token's text appended
            to each text completion that does not end with it, and for implicit text rows (full
            transcripts without a prompt) the prompt TRL's `extract_prompt` takes: the transcripts up
            to their first differing character, less a space just before it.
  separate  the earlier convention, for reproducing older tables: prompt ids = tokenizer(prompt),
            completion ids = tokenizer(completion, add_special_tokens=False). With SentencePiece-style
            tokenizers (Llama 1/2, Mistral, Gemma, stories260K) every completion then starts with the
            dummy-prefix "▁" the tokenizer puts before any text: " No" after "Assistant:" is scored as
            "Assistant:  No", a sequence the model rarely saw.

A text row's join rule (Example.join, from Columns.join) is applied first: "chat" makes the prompt
the user's message and each completion the assistant's (a blank line between them when the tokenizer
has no chat template), other text goes between prompt and completion (it ends the prompt's text).

The prompt alone is tokenized with the tokenizer's own special tokens (BOS once). Chat messages go
through the tokenizer's chat template (the prompt with the generation prompt), whose text carries
its own special tokens. `append_eos` adds the EOS id to each completion (joint and separate).
The text rows of a chunk are encoded in one batch call (fast tokenizers encode a batch in parallel).
"""
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from prefrank.data import Example
from prefrank.errors import InputError, RowError
from prefrank.options import option, options, positive_int

TOKENIZATION_MODES = ("joint", "trl", "separate")
TRUNCATION_POLICIES = ("none", "keep-end")


@options
class TokenizeOptions:
    """How rows become token ids: the options `score`, `sft` and `train` share."""
    tokenization: str = option(
        "joint", "joint: the ids of each prompt + completion as one text, the prompt being the ids the prompt "
        "alone shares with every one of them (the scored ids are the data's own text); trl: TRL 1.16's "
        "DPOTrainer ids (joint, with the EOS text appended to text completions and TRL's prompt extraction for "
        "full transcripts); separate: prompt and completions tokenized apart (earlier prefrank tables; "
        "SentencePiece tokenizers then start every completion with a spurious '▁')", choices=TOKENIZATION_MODES,
        group="tokenization")
    append_eos: bool = option(False, "score an EOS token after each completion (joint, separate; trl appends the "
                              "EOS text itself)", group="tokenization")
    max_length: int | None = option(None, "longest prompt + completion in tokens, at least 2", type=positive_int,
                                    group="tokenization", default_text="the model's maximum positions")
    truncate: str = option("none", "over-length rows: 'none' makes them errors; 'keep-end' cuts the prompt from "
                           "the left (keeping BOS), then the completions from the right, and marks them truncated",
                           choices=TRUNCATION_POLICIES, group="tokenization")

    def __post_init__(self):
        if self.append_eos and self.tokenization == "trl":
            raise InputError("<append_eos> with <tokenization> trl: that mode appends the EOS text itself")
        if self.max_length is not None and self.max_length < 2:
            raise InputError(f"<max_length> {self.max_length}: a scored sequence needs at least a prompt token and "
                             f"a completion token (2)")

    @property
    def tokenize_kwargs(self) -> dict:
        """The keyword arguments of tokenize_examples (max_length: the one the caller resolves)."""
        return dict(mode=self.tokenization, truncate=self.truncate, append_eos=self.append_eos)


@dataclass
class Tokenized:
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # one list per completion, each non-empty
    truncated: bool = False
    boundary_moved: bool = False  # the prompt's own last ids were joined to the completions (joint, trl)
    no_bos: bool = False  # rendered by a chat template that puts no BOS first, where text would get one


# ---------------------------------------------------------------- texts to encode

def trl_extract_prompt(transcripts: list[str]) -> tuple[str, list[str]]:
    """The prompt TRL's `extract_prompt` takes from full transcripts: everything before the first
    character at which they differ, less a space just before it (which goes to the completions).
    When no character differs within the shortest, TRL's loop ends one character before its end."""
    shortest = min(map(len, transcripts))
    cut = next((i for i in range(shortest) if len({t[i] for t in transcripts}) > 1), None)
    if cut is None:
        cut = max(shortest - 1, 0)
    elif cut > 0 and transcripts[0][cut - 1] == " ":
        cut -= 1
    return transcripts[0][:cut], [t[cut:] for t in transcripts]


CHAT_FALLBACK = "\n\n"  # join "chat" for a tokenizer without a chat template


def effective_join(join: str | None, tokenizer) -> str | None:
    """What a text row's join rule does with this tokenizer: "chat" (rendered by its chat template),
    the text put between prompt and completion, or None (concatenated as given)."""
    if join == "chat" and not getattr(tokenizer, "chat_template", None):
        return CHAT_FALLBACK
    return join


def _joined(example: Example, tokenizer) -> tuple:
    """(prompt, completions) with the row's join rule applied: messages for "chat", else texts."""
    join = effective_join(example.join, tokenizer)
    if join is None:
        return example.prompt, example.completions
    if join == "chat":
        return ([{"role": "user", "content": example.prompt}],
                [[{"role": "assistant", "content": c}] for c in example.completions])
    return example.prompt + join, example.completions


def render_chat(prompt_messages: list, completions: list, tokenizer) -> tuple[str, list[str]]:
    """Chat messages → (prompt text, completion texts) through the tokenizer's chat template
    (the separate mode: each completion is the rendered conversation less the rendered prompt)."""
    _check_chat_template(tokenizer)
    prompt = _apply_chat_template(tokenizer, prompt_messages, add_generation_prompt=True)
    rendered = []
    for messages in completions:
        full = _apply_chat_template(tokenizer, prompt_messages + messages)
        if not full.startswith(prompt):
            raise RowError("the rendered prompt is not a prefix of the rendered conversation (chat template)")
        rendered.append(full[len(prompt):])
    return prompt, rendered


def _check_chat_template(tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        raise RowError("conversational row, but the tokenizer has no chat template (--chat-template FILE, or "
                       "chat_template= in the Python API, supplies one)")


# A chat template renders a row in milliseconds, into its messages' text plus headers (and at most a
# default system prompt or tool schemas): one that loops for seconds or writes megabytes more than
# the row holds is hostile (it can arrive in a downloaded tokenizer_config), and the row an error.
RENDER_SECONDS = 10.0
RENDER_EXTRA_CHARS = 1 << 20


class _RenderTimeout(BaseException):
    """Raised into a render that ran past RENDER_SECONDS (a BaseException: no template or library
    code catching Exception swallows it)."""


@contextmanager
def _deadline(seconds: float):
    """Raise _RenderTimeout in the block once `seconds` have passed: a SIGALRM timer, so only in the
    main thread (signals reach no other; there the block runs unbounded). The caller's SIGALRM
    handler and timer are restored, the timer less the time spent here."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-6), interval)


def _apply_chat_template(tokenizer, messages: list, add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`, rendered within RENDER_SECONDS and RENDER_EXTRA_CHARS
    more than twice the messages' text; a RowError says why not."""
    try:
        with _deadline(RENDER_SECONDS):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except _RenderTimeout:
        raise RowError(f"the chat template took over {RENDER_SECONDS:g} s to render this row") from None
    except Exception as e:  # the template refuses the row (raise_exception, the sandbox's SecurityError, ...)
        message = " ".join(str(e).split())
        raise RowError(f"the chat template failed on this row: {type(e).__name__}: {message}") from None
    limit = 2 * sum(len(m["content"]) for m in messages) + RENDER_EXTRA_CHARS
    if len(text) > limit:
        raise RowError(f"the chat template rendered this row into {len(text):,} characters, over the limit of "
                       f"{limit:,} (twice the messages' text and {RENDER_EXTRA_CHARS:,} more)")
    return text


def _chat_ids(tokenizer, messages: list, generation_prompt: bool = False) -> list[int]:
    """Token ids of chat messages through the tokenizer's chat template, as TRL tokenizes them (the
    rendered text encoded without added special tokens: transformers' apply_chat_template with
    tokenize=True, the render bounded first)."""
    _check_chat_template(tokenizer)
    text = _apply_chat_template(tokenizer, messages, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _requests(example: Example, prompt, completions, tokenizer, mode: str) -> list[tuple[str, bool]]:
    """The texts whose ids make the example's ids (its prompt and completions joined), with whether
    the tokenizer adds its special tokens: the prompt first, then one per completion (joint, trl:
    prompt + completion)."""
    if isinstance(prompt, list):  # separate-mode chat rows: rendered text, special tokens included
        prompt, completions = render_chat(prompt, completions, tokenizer)
        return [(prompt, False)] + [(c, False) for c in completions]
    if mode == "separate":
        return [(prompt, True)] + [(c, False) for c in completions]
    if mode == "trl":
        if example.implicit:
            prompt, completions = trl_extract_prompt([prompt + c for c in completions])
        eos = tokenizer.eos_token
        if eos is None:
            raise RowError("the trl tokenization appends the EOS token's text, but the tokenizer has no EOS token")
        completions = [c if c.endswith(eos) else c + eos for c in completions]
    return [(prompt, True)] + [(prompt + c, True) for c in completions]


def _encode_all(tokenizer, requests: list[list[tuple[str, bool]]]) -> list[list[list[int]]]:
    """The ids of every request, in one batch call per special-tokens setting."""
    ids = {}
    for special in (True, False):
        texts = list(dict.fromkeys(t for reqs in requests for t, s in reqs if s == special))
        if texts:
            ids.update(zip(((t, special) for t in texts),
                           tokenizer(texts, add_special_tokens=special)["input_ids"]))
    return [[ids[r] for r in reqs] for reqs in requests]


# ---------------------------------------------------------------- ids to Tokenized

def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split(ids: list[list[int]], mode: str) -> tuple[list[int], list[list[int]], bool]:
    """(prompt ids, completion ids, boundary moved) from the prompt's ids and one list per
    completion (joint, trl: its prompt + completion ids)."""
    prompt_ids, rest = ids[0], ids[1:]
    if mode == "separate":
        return prompt_ids, rest, False
    n = min(_common_prefix(prompt_ids, r) for r in rest)
    return prompt_ids[:n], [r[n:] for r in rest], n < len(prompt_ids)


def _truncate_keep_end(prompt_ids, completion_ids, max_length, kept_head):
    """Cut the prompt from the left (keeping its first `kept_head` tokens, e.g. BOS, and its last
    token while the limit leaves room for it), then, if a completion still does not fit, the
    completions from the right. Every sequence fits `max_length` (at least 2: TokenizeOptions) and
    keeps a completion token."""
    longest = max(len(c) for c in completion_ids)
    room = min(max(max_length - longest, kept_head + 1), max_length - 1)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[:kept_head] + prompt_ids[len(prompt_ids) - (room - kept_head):]
    completion_room = max_length - len(prompt_ids)
    return prompt_ids, [c[:completion_room] for c in completion_ids]


def _bos_before_text(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before plain text, or None if it puts none."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def _finish(ids: list[list[int]], tokenizer, mode, max_length, truncate, append_eos) -> Tokenized:
    prompt_ids, completion_ids, moved = _split(ids, mode)
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise RowError("an EOS token is to be appended, but the tokenizer has none")
        completion_ids = [c + [tokenizer.eos_token_id] for c in completion_ids]
    if not prompt_ids:
        raise RowError("empty prompt and the tokenizer adds no BOS token: the first completion token "
                       "would have no context")
    if any(not c for c in completion_ids):
        raise RowError("a completion tokenizes to zero tokens")
    truncated = False
    longest = len(prompt_ids) + max(len(c) for c in completion_ids)
    if max_length is not None and longest > max_length:
        if truncate == "none":
            raise RowError(f"{longest} tokens exceed the maximum length {max_length} (truncate keep-end, or a larger "
                           f"max length)")
        kept_head = 1 if prompt_ids[0] == tokenizer.bos_token_id else 0
        prompt_ids, completion_ids = _truncate_keep_end(prompt_ids, completion_ids, max_length, kept_head)
        truncated = True
    return Tokenized(prompt_ids, completion_ids, truncated, moved)


# ---------------------------------------------------------------- the API

def _tokenize(examples, tokenizer, mode, max_length, truncate, append_eos):
    """({index: Tokenized}, {index: why not}) for the examples without an error."""
    TokenizeOptions(tokenization=mode, max_length=max_length, truncate=truncate, append_eos=append_eos)  # checks
    ids, errors, text_rows, requests, rendered = {}, {}, [], [], set()
    for ex in examples:
        if ex.error is not None:
            continue
        try:
            prompt, completions = _joined(ex, tokenizer)
            if isinstance(prompt, list) and mode != "separate":
                ids[ex.index] = [_chat_ids(tokenizer, prompt, generation_prompt=True)] + [
                    _chat_ids(tokenizer, prompt + messages) for messages in completions]
                rendered.add(ex.index)
            else:
                requests.append(_requests(ex, prompt, completions, tokenizer, mode))
                text_rows.append(ex.index)
        except RowError as e:
            errors[ex.index] = str(e)
    ids.update(zip(text_rows, _encode_all(tokenizer, requests)))
    bos = _bos_before_text(tokenizer) if rendered else None
    tokenized = {}
    for ex in examples:
        if ex.index in ids:
            try:
                tokenized[ex.index] = _finish(ids[ex.index], tokenizer, mode, max_length, truncate, append_eos)
                # a template without {{ bos_token }}: scored as rendered (as TRL would), counted for a warning
                tokenized[ex.index].no_bos = bos is not None and ex.index in rendered and ids[ex.index][0][:1] != [bos]
            except RowError as e:
                errors[ex.index] = str(e)
    return tokenized, errors


def tokenize_examples(examples, tokenizer, *, mode: str = "joint", max_length: int | None = None,
                      truncate: str = "none", append_eos: bool = False) -> tuple[dict[int, Tokenized], dict[int, str]]:
    """Token ids of every example without an error, by `mode` (TOKENIZATION_MODES): ({input index:
    Tokenized}, {input index: why that row cannot be tokenized}); examples with an error are in
    neither."""
    return _tokenize(examples, tokenizer, mode, max_length, truncate, append_eos)


def tokenize_example(example: Example, tokenizer, *, mode: str = "joint", max_length: int | None = None,
                     truncate: str = "none", append_eos: bool = False) -> Tokenized:
    """Token ids for one valid Example (options as for tokenize_examples); a RowError says why it
    cannot be tokenized."""
    tokenized, errors = _tokenize([example], tokenizer, mode, max_length, truncate, append_eos)
    if errors:
        raise RowError(errors[example.index])
    return tokenized[example.index]
