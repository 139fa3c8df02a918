"""Tokenization: the three modes against independent references.

  joint     prompt ids + completion ids are the tokenizer's own ids of prompt + completion, the
            prompt a prefix of the prompt's own ids, shared by every completion
  trl       exactly the ids TRL 1.16's DPOTrainer builds (its own preprocessing runs in the test)
  separate  tokenizer(prompt) and tokenizer(completion, add_special_tokens=False)
on the character tokenizer, a byte-level BPE trained here, the SentencePiece-style stories260K
tokenizer, and real HH / PandaLM rows.
"""
import gzip
import json
import os
import random

import pytest

from conftest import HH, PANDALM, STORIES, needs_shared
from prefrank.data import Columns, Example, read_examples
from prefrank.demo.default import build_tokenizer
from prefrank.errors import RowError
from prefrank.tokenization import TOKENIZATION_MODES, tokenize_example
from tiny_models import byte_level_bpe


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


@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe()


@pytest.fixture(scope="module")
def stories_tok():
    if not STORIES.exists():
        pytest.skip("../shared is absent: the stories260K tokenizer is needed")
    from prefrank.models import load_tokenizer
    return load_tokenizer(str(STORIES))


def pair(prompt="Q: 1+2=?\nA:", chosen=" 3", rejected=" 12"):
    return Example(0, "0", prompt, [chosen, rejected])


# ---------------------------------------------------------------- independent references

def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def trl_token_ids(rows, tokenizer):
    """TRL 1.16's own preprocessing (DPOTrainer's dataset preparation) of `rows`: per row its
    (prompt_ids, [chosen_ids, rejected_ids])."""
    import tempfile

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tiny_models import tiny_model
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, report_to=[], use_cpu=True, max_length=None, bf16=False)
        trainer = DPOTrainer(model=tiny_model("llama"), ref_model=tiny_model("llama"), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return [(r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]]) for r in trainer.train_dataset]


def random_text(rng, words, n):
    """Words, spaces, newlines, punctuation and emoji in random order."""
    pieces = words + [" ", "  ", "\n", "\n\n", "!", "?", "...", ",", ":", "'", '"', "😀", "🎉", "-", "1", "23"]
    return "".join(rng.choice(pieces) for _ in range(n))


def random_examples(seed, count, k=2):
    """Prompts and completions whose boundary falls inside words, punctuation runs, whitespace
    runs and emoji, and completions that start with spaces, newlines or punctuation."""
    rng = random.Random(seed)
    words = ["Hel", "lo", "world", "How", "are", "you", "cat", "sat", "I'm", "sorry", "can't", "Assistant", "No", "Yes"]
    starts = [" ", "\n", "!", "?", ".", "lo", "'t", "😀", "  ", "\n\n", ""]
    examples = []
    for i in range(count):
        prompt = random_text(rng, words, rng.randint(0, 8))
        completions = []
        while len(completions) < k:
            c = rng.choice(starts) + random_text(rng, words, rng.randint(0, 5))
            if c and c not in completions:
                completions.append(c)
        examples.append(Example(i, str(i), prompt, completions))
    return examples


def check_joint(example, item, tokenizer, eos_text=""):
    """joint's definition, from the tokenizer alone: every completion's full ids are the
    tokenizer's ids of the full text, the prompt is a prefix of the prompt's own ids, and the
    full ids decode back to the text."""
    own = tokenizer(example.prompt)["input_ids"]
    assert item.prompt_ids == own[:len(item.prompt_ids)]
    assert item.boundary_moved == (len(item.prompt_ids) < len(own))
    full_ids = [tokenizer(example.prompt + c + eos_text)["input_ids"] for c in example.completions]
    assert [item.prompt_ids + c for c in item.completion_ids] == full_ids
    assert len(item.prompt_ids) == min(common_prefix(own, f) for f in full_ids)
    for c, ids in zip(example.completions, full_ids):
        assert tokenizer.decode(ids, skip_special_tokens=True) == example.prompt + c


# ---------------------------------------------------------------- the modes on synthetic text

@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("tokenizer_name", ["bpe", "stories_tok"])
def test_joint_is_the_texts_own_ids(tokenizer_name, k, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    moved = 0
    for ex in random_examples(seed=k, count=150, k=k):
        try:
            item = tokenize_example(ex, tokenizer, mode="joint")
        except RowError as e:  # an empty prompt on a BOS tokenizer cannot happen; nothing else may fail
            raise AssertionError((ex, e))
        check_joint(ex, item, tokenizer)
        moved += item.boundary_moved
    print(f"{tokenizer_name} K={k}: {moved} of 150 rows had a moved boundary")
    if tokenizer_name == "bpe":
        assert moved > 0  # the cases this mode exists for did occur


@pytest.mark.parametrize("tokenizer_name", ["bpe", "stories_tok"])
def test_separate_tokenizes_apart(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    for ex in random_examples(seed=7, count=100, k=3):
        item = tokenize_example(ex, tokenizer, mode="separate")
        assert item.prompt_ids == tokenizer(ex.prompt)["input_ids"] and not item.boundary_moved
        assert item.completion_ids == [tokenizer(c, add_special_tokens=False)["input_ids"] for c in ex.completions]


@pytest.mark.parametrize("tokenizer_name", ["bpe", "stories_tok"])
def test_trl_mode_equals_trl_on_random_text(tokenizer_name, request):
    pytest.importorskip("trl")
    tokenizer = request.getfixturevalue(tokenizer_name)
    examples = [ex for ex in random_examples(seed=11, count=120) if ex.prompt]  # TRL needs a prompt to tokenize
    expected = trl_token_ids([{"prompt": ex.prompt, "chosen": ex.completions[0], "rejected": ex.completions[1]}
                              for ex in examples], tokenizer)
    for ex, (prompt_ids, completion_ids) in zip(examples, expected):
        item = tokenize_example(ex, tokenizer, mode="trl")
        assert (item.prompt_ids, item.completion_ids) == (prompt_ids, completion_ids), ex
        check_joint(ex, item, tokenizer, eos_text=tokenizer.eos_token)


def test_trl_mode_extracts_the_prompt_of_transcripts_as_trl_does(bpe):
    pytest.importorskip("trl")
    rows = [{"chosen": "Human: hi\n\nAssistant: I'm sorry.", "rejected": "Human: hi\n\nAssistant: I can't."},
            {"chosen": "Say it: Hello world!!", "rejected": "Say it: Hello you?"},
            {"chosen": "Q: 1+2=?\nA: 3.", "rejected": "Q: 1+2=?\nA: 3.5"}]  # one a prefix of the other
    examples = list(read_examples_from(rows))
    assert all(ex.implicit and ex.error is None for ex in examples)
    for ex, expected in zip(examples, trl_token_ids(rows, bpe)):
        item = tokenize_example(ex, bpe, mode="trl")
        assert (item.prompt_ids, item.completion_ids) == expected


def read_examples_from(rows):
    from prefrank.data import to_example
    return (to_example(i, row, Columns()) for i, row in enumerate(rows))


@pytest.mark.parametrize("mode", TOKENIZATION_MODES)
def test_k_completions_share_one_prompt(mode, bpe):
    ex = Example(0, "0", "Say: Hel", ["lo!", "lo?", "p me", " world"])  # "Hel" + "lo" merges in BPE
    item = tokenize_example(ex, bpe, mode=mode)
    assert len(item.completion_ids) == 4
    if mode == "separate":
        assert item.prompt_ids == bpe(ex.prompt)["input_ids"]
    else:
        check_joint(ex, item, bpe, eos_text=bpe.eos_token if mode == "trl" else "")


# ---------------------------------------------------------------- the modes on real data

def hh_rows():
    return [json.loads(line) for line in gzip.open(HH / "helpful-base" / "test.jsonl.gz", "rt")]


def pandalm_rows():
    """PandaLM as prompt/chosen/rejected, converted here independently of prefrank's columns."""
    return [{"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), "chosen": r["response1"],
             "rejected": r["response2"]} for r in json.load(open(PANDALM))]


def usable(row):
    """Text completions, not blank and different: the rows any convention can score (a
    transcript's completion is what follows the last shared "\n\nAssistant:")."""
    texts = [row["chosen"], row["rejected"]]
    if not all(isinstance(t, str) for t in texts) or texts[0] == texts[1]:
        return False
    if "prompt" not in row:  # HH transcripts
        cut = os.path.commonprefix(texts).rfind("\n\nAssistant:") + len("\n\nAssistant:")
        texts = [t[cut:] for t in texts]
    return all(t.strip() for t in texts)


@needs_shared
@pytest.mark.parametrize("source", ["hh", "pandalm"])
def test_trl_mode_equals_trl_on_real_rows(source, stories_tok):
    """Every row: TRL's own preprocessing (HH: its prompt extraction from the transcripts, too)."""
    pytest.importorskip("trl")
    if source == "hh":
        rows, examples = hh_rows(), list(read_examples(str(HH / "helpful-base" / "test.jsonl.gz"), Columns()))
    else:
        rows = pandalm_rows()
        examples = list(read_examples(str(PANDALM), Columns(prompt=["instruction", "input"], chosen="response1",
                                                            rejected="response2")))
    # PandaLM has a few JSON booleans for responses: prefrank makes them error rows; TRL cannot take them
    texts = [i for i, row in enumerate(rows) if all(isinstance(v, str) for v in row.values())]
    expected = dict(zip(texts, trl_token_ids([rows[i] for i in texts], stories_tok)))
    same = 0
    for i, (ex, row) in enumerate(zip(examples, rows, strict=True)):
        if i not in expected:
            assert "must be a string" in ex.error
        elif ex.error is not None:  # prefrank refuses empty and identical completions, which TRL would train on
            assert ((ex.error == "chosen and rejected are identical" and row["chosen"] == row["rejected"])
                    or (ex.error == "empty or whitespace-only completion" and not usable(row))), ex.error
        else:
            item = tokenize_example(ex, stories_tok, mode="trl")
            same += (item.prompt_ids, item.completion_ids) == expected[i]
    valid = sum(ex.error is None for ex in examples)
    print(f"{source}: trl mode equals TRL's ids on {same} of {valid} rows")
    assert same == valid == sum(usable(row) for row in rows)


@needs_shared
@pytest.mark.parametrize("source", ["hh", "pandalm"])
def test_joint_mode_scores_the_texts_own_ids_on_real_rows(source, stories_tok):
    if source == "hh":
        rows = hh_rows()
        examples = list(read_examples(str(HH / "helpful-base" / "test.jsonl.gz"), Columns()))
    else:
        rows = pandalm_rows()
        examples = list(read_examples(str(PANDALM), Columns(prompt=["instruction", "input"], chosen="response1",
                                                            rejected="response2")))
    checked = 0
    for ex, row in zip(examples, rows, strict=True):
        if ex.error is None:
            item = tokenize_example(ex, stories_tok, mode="joint")
            check_joint(ex, item, stories_tok)
            assert ex.prompt + ex.completions[0] == (row["chosen"] if source == "hh" else row["prompt"] + row["chosen"])
            checked += 1
    assert checked == sum(usable(row) for row in rows)


@needs_shared
def test_separate_mode_adds_the_dummy_prefix_that_joint_does_not(stories_tok):
    """The defect joint fixes, on the real SentencePiece-style tokenizer: " No" after "Assistant:"."""
    ex = pair(prompt="\n\nHuman: Is it raining?\n\nAssistant:", chosen=" No, it is sunny.", rejected=" Yes.")
    separate = tokenize_example(ex, stories_tok, mode="separate")
    joint = tokenize_example(ex, stories_tok, mode="joint")
    assert [stories_tok.convert_ids_to_tokens(c)[:2] for c in separate.completion_ids] == [["▁", "▁"]] * 2
    assert stories_tok.decode(separate.prompt_ids + separate.completion_ids[0], skip_special_tokens=True) \
        == ex.prompt + " " + ex.completions[0]  # two spaces: not the data's text
    check_joint(ex, joint, stories_tok)


# ---------------------------------------------------------------- conventions shared by the modes

@pytest.mark.parametrize("mode", TOKENIZATION_MODES)
def test_boundary_is_exact_and_bos_appears_once(tok, mode):
    t = tokenize_example(pair(), tok, mode=mode)
    assert t.prompt_ids[0] == tok.bos_token_id and tok.bos_token_id not in t.prompt_ids[1:]
    assert tok.decode(t.prompt_ids[1:]) == "Q: 1+2=?\nA:"
    eos = tok.eos_token if mode == "trl" else ""
    assert [tok.decode(c) for c in t.completion_ids] == [" 3" + eos, " 12" + eos]
    assert not t.truncated and not t.boundary_moved


@pytest.mark.parametrize("mode", ["joint", "separate"])
def test_append_eos(tok, mode):
    t = tokenize_example(pair(), tok, mode=mode, append_eos=True)
    assert all(c[-1] == tok.eos_token_id for c in t.completion_ids)
    assert [len(c) for c in t.completion_ids] == [3, 4]
    with pytest.raises(ValueError, match="trl"):
        tokenize_example(pair(), tok, mode="trl", append_eos=True)


def test_trl_mode_appends_eos_text_once(tok):
    t = tokenize_example(pair(chosen=" 3</s>"), tok, mode="trl")
    assert [c.count(tok.eos_token_id) for c in t.completion_ids] == [1, 1]
    assert all(c[-1] == tok.eos_token_id for c in t.completion_ids)


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


@pytest.mark.parametrize("mode", TOKENIZATION_MODES)
def test_empty_prompt_needs_bos(tok, tok_no_bos, mode):
    assert tokenize_example(pair(prompt=""), tok, mode=mode).prompt_ids == [tok.bos_token_id]
    with pytest.raises(RowError, match="empty prompt"):
        tokenize_example(pair(prompt=""), tok_no_bos, mode=mode)


@pytest.fixture(scope="module")
def chat(tok):
    from transformers import PreTrainedTokenizerFast
    chat = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    chat.chat_template = ("{{ bos_token }}{% for m in messages %}{{ 'Q' if m.role == 'user' else 'A' }}: "
                          "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    return chat


CHAT_EXAMPLE = Example(0, "0", [{"role": "user", "content": "1+2"}],
                       [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "4"}]])


@pytest.mark.parametrize("mode", TOKENIZATION_MODES)
def test_chat_template(tok, chat, mode):
    t = tokenize_example(CHAT_EXAMPLE, chat, mode=mode)
    # the template writes BOS itself; tokenizing its text must not add a second one
    assert t.prompt_ids.count(chat.bos_token_id) == 1
    assert chat.decode(t.prompt_ids) == "<s>Q: 1+2\nA:"
    # the completion is the rendered conversation minus the rendered prompt; no EOS text in any mode
    assert [chat.decode(c) for c in t.completion_ids] == [" 3\n", " 4\n"]
    with pytest.raises(RowError, match="no chat template"):
        tokenize_example(CHAT_EXAMPLE, tok, mode=mode)


def test_chat_trl_mode_equals_trl(chat):
    pytest.importorskip("trl")
    rows = [{"prompt": CHAT_EXAMPLE.prompt, "chosen": CHAT_EXAMPLE.completions[0],
             "rejected": CHAT_EXAMPLE.completions[1]}]
    item = tokenize_example(CHAT_EXAMPLE, chat, mode="trl")
    assert [(item.prompt_ids, item.completion_ids)] == trl_token_ids(rows, chat)
