"""The tokenization convention: BOS once, exact prompt/completion boundary, explicit truncation."""
import pytest

from prefrank.data import Example, RowError
from prefrank.demo.default import build_tokenizer
from prefrank.tokenization import tokenize_example
from conftest import STORIES, needs_shared


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()  # character level: one token per character, BOS prepended


@pytest.fixture(scope="module")
def tok_no_bos():
    from transformers import PreTrainedTokenizerFast
    t = build_tokenizer()
    raw = t.backend_tokenizer
    raw.post_processor = None
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def pair(prompt="Q: 1+2=?\nA:", chosen=" 3", rejected=" 12"):
    return Example(0, "0", prompt, [chosen, rejected])


def test_boundary_is_exact_and_bos_appears_once(tok):
    t = tokenize_example(pair(), tok)
    assert t.prompt_ids[0] == tok.bos_token_id and tok.bos_token_id not in t.prompt_ids[1:]
    assert tok.decode(t.prompt_ids[1:]) == "Q: 1+2=?\nA:"
    assert [tok.decode(c) for c in t.completion_ids] == [" 3", " 12"]
    assert not t.truncated


def test_append_eos(tok):
    t = tokenize_example(pair(), tok, append_eos=True)
    assert all(c[-1] == tok.eos_token_id for c in t.completion_ids)
    assert [len(c) for c in t.completion_ids] == [3, 4]


def test_over_length_is_an_error_unless_truncation_is_asked_for(tok):
    ex = pair(prompt="Q: 11+22+33+44=?\nA:", rejected=" 1234567")
    with pytest.raises(RowError, match="exceed the maximum length 12"):
        tokenize_example(ex, tok, max_length=12)
    t = tokenize_example(ex, tok, max_length=12, truncate="keep-end")
    assert t.truncated
    assert t.prompt_ids[0] == tok.bos_token_id  # BOS kept, the prompt's start dropped
    assert tok.decode(t.prompt_ids[1:]) == "\nA:"  # the prompt's end kept
    assert [tok.decode(c) for c in t.completion_ids] == [" 3", " 1234567"]
    assert all(len(t.prompt_ids) + len(c) <= 12 for c in t.completion_ids)
    # a completion longer than the budget itself: prompt keeps BOS + its last token, completion cut at the right
    t = tokenize_example(pair(rejected=" 123456789"), tok, max_length=6, truncate="keep-end")
    assert tok.decode(t.prompt_ids[1:]) == ":" and tok.decode(t.completion_ids[1]) == " 123"


def test_empty_prompt_needs_bos(tok, tok_no_bos):
    assert tokenize_example(pair(prompt=""), tok).prompt_ids == [tok.bos_token_id]
    with pytest.raises(RowError, match="empty prompt"):
        tokenize_example(pair(prompt=""), tok_no_bos)


def test_chat_template(tok):
    from transformers import PreTrainedTokenizerFast
    chat = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    chat.chat_template = ("{{ bos_token }}{% for m in messages %}{{ 'Q' if m.role == 'user' else 'A' }}: "
                          "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    ex = Example(0, "0", [{"role": "user", "content": "1+2"}],
                 [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "4"}]])
    t = tokenize_example(ex, chat)
    # the template writes BOS itself; tokenizing its text must not add a second one
    assert t.prompt_ids.count(chat.bos_token_id) == 1
    assert chat.decode(t.prompt_ids) == "<s>Q: 1+2\nA:"
    # the completion is the rendered conversation minus the rendered prompt
    assert [chat.decode(c) for c in t.completion_ids] == [" 3\n", " 4\n"]
    with pytest.raises(RowError, match="no chat template"):
        tokenize_example(ex, tok)


@needs_shared
def test_stories260k_tokenizer_bos_once():
    from prefrank.models import load_tokenizer
    tok = load_tokenizer(str(STORIES))
    t = tokenize_example(pair(prompt="Once upon a time", chosen=" there was a cat.", rejected=" it rained."), tok)
    assert t.prompt_ids[0] == tok.bos_token_id and t.prompt_ids.count(tok.bos_token_id) == 1
    assert all(tok.bos_token_id not in c for c in t.completion_ids)
