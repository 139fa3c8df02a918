"""The one tokenization convention: Examples → token ids, with an exact prompt/completion boundary.

  prompt ids      = tokenizer(prompt) with the tokenizer's own special tokens (BOS once)
  completion ids  = tokenizer(completion, add_special_tokens=False) [+ EOS with append_eos]
  scored sequence = prompt ids + completion ids; exactly the completion ids are scored.

Chat messages are rendered with the tokenizer's chat template (the prompt with the generation
prompt; each completion as the rest of the rendered prompt + completion); rendered text already
carries the template's special tokens, so it is tokenized with add_special_tokens=False.
Tokenizing the two parts separately is what makes the boundary exact; with SentencePiece-style
tokenizers a completion that starts with a space may then begin with a lone "▁" token.
"""
from dataclasses import dataclass

from prefrank.data import Example, RowError

TRUNCATION_POLICIES = ("none", "keep-end")


@dataclass
class Tokenized:
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # one list per completion, each non-empty
    truncated: bool = False


def render_chat(example: Example, tokenizer) -> tuple[str, list[str]]:
    """Chat messages → (prompt text, completion texts) through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise RowError("conversational row, but the tokenizer has no chat template")
    prompt = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    completions = []
    for messages in example.completions:
        full = tokenizer.apply_chat_template(example.prompt + messages, tokenize=False)
        if not full.startswith(prompt):
            raise RowError("the rendered prompt is not a prefix of the rendered conversation (chat template)")
        completions.append(full[len(prompt):])
    return prompt, completions


def _truncate_keep_end(prompt_ids, completion_ids, max_length, kept_head):
    """Cut the prompt from the left (keeping its first `kept_head` tokens, e.g. BOS), then, if a
    completion still does not fit, the completions from the right."""
    longest = max(len(c) for c in completion_ids)
    room = max(max_length - longest, kept_head + 1)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[:kept_head] + prompt_ids[len(prompt_ids) - (room - kept_head):]
    completion_room = max_length - len(prompt_ids)
    return prompt_ids, [c[:completion_room] for c in completion_ids]


def tokenize_example(example: Example, tokenizer, *, max_length: int | None = None, truncate: str = "none",
                     append_eos: bool = False) -> Tokenized:
    """Token ids for one valid Example; a RowError says why a row cannot be tokenized."""
    if isinstance(example.prompt, list):
        prompt, completions = render_chat(example, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        prompt, completions = example.prompt, example.completions
        prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise RowError("--append-eos, but the tokenizer has no EOS token")
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
            raise RowError(f"{longest} tokens exceed the maximum length {max_length} "
                           f"(pass --truncate keep-end or a larger --max-length)")
        kept_head = 1 if prompt_ids[0] == tokenizer.bos_token_id else 0
        prompt_ids, completion_ids = _truncate_keep_end(prompt_ids, completion_ids, max_length, kept_head)
        truncated = True
    return Tokenized(prompt_ids, completion_ids, truncated)


def tokenize_examples(examples, tokenizer, **options) -> dict[int, Tokenized]:
    """Token ids of every valid example, keyed by its input index; a row that cannot be tokenized
    gets its reason in `error` (options as for tokenize_example)."""
    tokenized = {}
    for ex in examples:
        if ex.error is None:
            try:
                tokenized[ex.index] = tokenize_example(ex, tokenizer, **options)
            except RowError as e:
                ex.error = str(e)
    return tokenized
