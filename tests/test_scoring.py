"""The KV-reuse scorer and the naive oracle against an independent float64 computation: each
(prompt + completion) run alone, unpadded, through a float64 copy of the model."""
import copy
import gzip
import json

import pytest
import torch

from conftest import HH, PANDALM, STORIES, needs_shared
from prefrank.data import Columns, to_example
from prefrank.models import CausalLM
from prefrank.scoring import score
from prefrank.tokenization import Tokenized, tokenize_example
from tiny_models import ARCHS, VOCAB, tiny_model


def float64_reference(model, items):
    """Per completion (flattened): Σ log p and the per-token log-probs, in float64."""
    model64 = copy.deepcopy(model).double()
    sums, tokens = [], []
    with torch.no_grad():
        for it in items:
            for c in it.completion_ids:
                ids = torch.tensor([it.prompt_ids + c])
                logp = torch.log_softmax(model64(input_ids=ids).logits[0].double(), -1)
                p = len(it.prompt_ids)
                tok = logp[torch.arange(p - 1, p - 1 + len(c)), torch.tensor(c)]
                sums.append(tok.sum().item())
                tokens.append(tok)
    return torch.tensor(sums, dtype=torch.float64), tokens


def random_items(n, *, max_prompt=40, max_completion=30, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    items = []
    for _ in range(n):
        prompt = torch.randint(0, VOCAB, (rand(1, max_prompt),), generator=g).tolist()
        completions = [torch.randint(0, VOCAB, (rand(1, max_completion),), generator=g).tolist() for _ in range(k)]
        items.append(Tokenized(prompt, completions))
    items[0].completion_ids[0] = items[0].completion_ids[0][:1]  # a completion of length 1
    return items


def assert_close(name, got, ref, n_tokens):
    # fp32 per-token log-probs summed: error grows with the sum's magnitude and length
    tol = 2e-6 * (ref.abs() + n_tokens) + 1e-6
    err = (got - ref).abs()
    print(f"{name}: max abs error {err.max().item():.3g} (max ref {ref.abs().max().item():.3g})")
    assert (err <= tol).all(), f"{name}: errors {err[err > tol].tolist()} exceed {tol[err > tol].tolist()}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [1, 96, 100_000])  # batch size 1, several mixed batches, one batch
def test_kv_and_naive_equal_float64(arch, budget):
    model = tiny_model(arch)
    lm = CausalLM(model)
    items = random_items(9)
    ref_sums, ref_tokens = float64_reference(model, items)
    n = torch.tensor([len(c) for it in items for c in it.completion_ids], dtype=torch.float64)
    for method in ("kv", "packed", "naive"):
        s = score(lm, items, method=method, budget=budget, per_token=True)
        assert_close(f"{arch} {method} budget={budget}", s.logps, ref_sums, n)
        for got, ref in zip(s.token_logps, ref_tokens):
            assert len(got) == len(ref)
            assert torch.allclose(torch.tensor(got, dtype=torch.float64), ref, atol=1e-5, rtol=1e-5)


def test_kv_with_small_cache_budget_equals_float64():
    """Holding few prompt caches at once (many continuation flushes) changes nothing."""
    from prefrank import scoring
    model = tiny_model("llama")
    items = random_items(12, seed=1)
    ref_sums, _ = float64_reference(model, items)
    n = torch.tensor([len(c) for it in items for c in it.completion_ids], dtype=torch.float64)
    s = scoring.score_kv(CausalLM(model), items, budget=64, cache_bytes=1)
    assert_close("llama kv cache_bytes=1", s.logps, ref_sums, n)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_kv_and_packed_equal_float64_under_sdpa_and_eager_attention(implementation):
    """packed's additive 4-D block mask and kv's prompt caches of several widths (a continuation
    batch takes rows of several prompt batches) mean the same under both attentions (eager was
    never tested: the tiny models default to sdpa)."""
    model = tiny_model("llama")
    model.set_attn_implementation(implementation)
    lm = CausalLM(model)
    items = random_items(12, k=3, seed=7)
    ref_sums, _ = float64_reference(model, items)
    n = torch.tensor([len(c) for it in items for c in it.completion_ids], dtype=torch.float64)
    for method in ("kv", "packed"):
        assert_close(f"llama {implementation} {method}", score(lm, items, method=method, budget=64).logps, ref_sums, n)


def test_k_completions_per_prompt():
    model = tiny_model("qwen2")
    items = random_items(5, k=4, seed=2)
    ref_sums, _ = float64_reference(model, items)
    n = torch.tensor([len(c) for it in items for c in it.completion_ids], dtype=torch.float64)
    assert_close("qwen2 kv K=4", score(CausalLM(model), items, budget=128).logps, ref_sums, n)


def test_counts_padding():
    from prefrank.batching import length_batches
    items = random_items(6, seed=3)
    s = score(CausalLM(tiny_model("llama")), items, method="naive", budget=100_000)
    total = [len(it.prompt_ids) + len(c) for it in items for c in it.completion_ids]
    assert s.counts.real == sum(total)
    assert s.counts.padded == sum(len(b) * max(total[i] for i in b) for b in length_batches(total, 100_000))


# ---------------------------------------------------------------- real model, real data

def _real_items(rows, columns, tokenizer, n, mode):
    items = []
    for i, row in enumerate(rows):
        ex = to_example(i, row, columns)
        if ex.error is None:
            try:
                items.append(tokenize_example(ex, tokenizer, mode=mode, max_length=512))
            except ValueError:
                continue
        if len(items) == n:
            break
    return items


@needs_shared
@pytest.mark.parametrize("source, mode", [(s, "joint") for s in ("helpful-base", "helpful-online",
                                                                  "helpful-rejection-sampled", "pandalm")]
                         + [("helpful-base", "trl"), ("pandalm", "separate")])
def test_stories260k_on_real_pairs(source, mode):
    """Every method equals float64 on the ids of each tokenization mode."""
    from prefrank.models import load_model, load_tokenizer
    tokenizer = load_tokenizer(str(STORIES))
    model = load_model(str(STORIES), dtype=torch.float32, device=torch.device("cpu"))
    if source == "pandalm":
        rows = json.load(open(PANDALM))
        columns = Columns(prompt=["instruction", "input"], chosen="response1", rejected="response2")
    else:
        rows = [json.loads(line) for line in gzip.open(HH / source / "test.jsonl.gz", "rt")]
        columns = Columns()
    items = _real_items(rows, columns, tokenizer, 12, mode)
    assert len(items) == 12
    ref_sums, _ = float64_reference(model, items)
    n = torch.tensor([len(c) for it in items for c in it.completion_ids], dtype=torch.float64)
    lm = CausalLM(model)
    lm.check_head()
    for method in ("kv", "packed", "naive"):
        assert_close(f"stories260K {source} {mode} {method}", score(lm, items, method=method, budget=2048).logps, ref_sums, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    """A half-precision model: both methods stay within twice the naive path's own error against
    float64 on the same (rounded) weights, plus a small margin."""
    model = tiny_model("llama").to(dtype)
    items = random_items(6, seed=4)
    ref_sums, _ = float64_reference(model, items)
    lm = CausalLM(model)
    naive_err = (score(lm, items, method="naive", budget=128).logps - ref_sums).abs()
    for method in ("kv", "packed"):
        err = (score(lm, items, method=method, budget=128).logps - ref_sums).abs()
        print(f"{dtype}: naive max error {naive_err.max():.3g}, {method} max error {err.max():.3g}")
        assert (err <= 2 * naive_err.max() + 1e-3).all()


def test_cache_argument_name_follows_transformers():
    from prefrank.models import cache_argument

    def new(input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        pass

    def old(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        pass

    assert cache_argument(new) == "cache" and cache_argument(old) == "past_key_values"
    assert cache_argument(tiny_model("llama").model.forward) in ("cache", "past_key_values")


def test_auto_picks_an_exact_method_for_the_model():
    """auto: packed for full-attention sdpa/eager models and for sliding windows the sequences fit;
    naive where they do not; kv for other attention implementations. Explicit methods that would
    be inexact are refused. Each choice matches float64."""
    from transformers import MistralConfig, MistralForCausalLM

    from prefrank.errors import InputError
    from prefrank.scoring import resolve_method
    items = random_items(4, seed=5)
    n = torch.tensor([len(c) for it in items for c in it.completion_ids], dtype=torch.float64)
    assert resolve_method(CausalLM(tiny_model("llama")), "auto", items) == "packed"
    for window, expected in ((4, "naive"), (200, "packed")):
        torch.manual_seed(0)
        mistral = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   sliding_window=window, initializer_range=0.3)).eval()
        lm = CausalLM(mistral)
        assert resolve_method(lm, "auto", items) == expected
        with pytest.raises(InputError, match="sliding"):
            resolve_method(lm, "kv", items)
        ref, _ = float64_reference(mistral, items)
        assert_close(f"mistral window {window}, auto", score(lm, items).logps, ref, n)
    with pytest.raises(InputError, match="exceeds its sliding window of 4"):
        resolve_method(CausalLM(MistralForCausalLM(MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=4))), "packed", items)
    flash = tiny_model("llama")
    flash.config._attn_implementation = "flash_attention_2"
    assert resolve_method(CausalLM(flash), "auto", items) == "kv"


def test_alibi_models_refuse_packed_and_auto_takes_kv():
    """Falcon with ALiBi: transformers builds its biases from a 2-D mask, so packed's 4D block mask
    died inside the model ("too many values to unpack"); it is refused, and auto's kv equals float64."""
    from transformers import FalconConfig, FalconForCausalLM

    from prefrank.errors import InputError
    from prefrank.scoring import resolve_method
    torch.manual_seed(0)
    falcon = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, alibi=True, initializer_range=0.3)).eval()
    lm, items = CausalLM(falcon), random_items(5, seed=6)
    with pytest.raises(InputError, match="ALiBi"):
        resolve_method(lm, "packed", items)
    assert resolve_method(lm, "auto", items) == "kv"
    ref, _ = float64_reference(falcon, items)
    n = torch.tensor([len(c) for it in items for c in it.completion_ids], dtype=torch.float64)
    for method in ("auto", "naive"):
        assert_close(f"falcon alibi {method}", score(lm, items, method=method, budget=64).logps, ref, n)


def test_auto_prefers_kv_where_packed_wastes_attention():
    """The crossover measured in bench/RESULTS.md: on HH-sized pairs packed's block mask costs half
    the matmul work again at hidden size 64 (kv was 1.2x faster) and 8% at 384 (packed was faster)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefrank.scoring import PACKED_ATTENTION_LIMIT, packed_attention_overhead, resolve_method
    items = [Tokenized(list(range(148)), [list(range(99)), list(range(99))])]
    overheads = {}
    for hidden, ff, heads, expected in ((64, 172, 8, "kv"), (384, 1024, 6, "packed")):
        lm = CausalLM(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ff,
                                                   num_hidden_layers=2, num_attention_heads=heads)).eval())
        overheads[hidden] = packed_attention_overhead(lm, items)
        assert resolve_method(lm, "auto", items) == expected
    print(f"overheads {overheads}, limit {PACKED_ATTENTION_LIMIT}")
    assert overheads[64] > 0.4 and overheads[384] < 0.1


def test_compiled_blocks_equal_float64():
    """--compile: torch.compile'd transformer blocks (one graph for all layers, dynamic shapes) give
    float64's answers with packed and naive over batches of changing shape; kv is refused and auto
    avoids it; compile_blocks(False) restores the eager blocks."""
    from prefrank.errors import InputError
    from prefrank.scoring import resolve_method
    model = tiny_model("llama").double()
    lm = CausalLM(model)
    items = random_items(7, seed=3)
    ref, _ = float64_reference(model, items)
    n = torch.tensor([len(c) for it in items for c in it.completion_ids], dtype=torch.float64)
    blocks = list(model.model.layers)
    lm.compile_blocks()
    try:
        assert all("forward" in vars(b) for b in blocks)
        for method, budget in (("packed", 96), ("naive", 96), ("packed", 100_000)):
            assert_close(f"compiled {method} budget={budget}", score(lm, items, method=method, budget=budget).logps,
                         ref, n)
        with pytest.raises(InputError, match="compiled"):
            resolve_method(lm, "kv", items)
        assert resolve_method(lm, "auto", items) == "packed"
    finally:
        lm.compile_blocks(False)
    assert not any("forward" in vars(b) for b in blocks) and resolve_method(lm, "kv", items) == "kv"


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_blocks_finds_the_transformer_layers(arch):
    """The compiled blocks are exactly the decoder's layers (GPT-2 keeps them in `h`, the others in
    `layers`), and compile_blocks(False) leaves no compiled forward behind."""
    model = tiny_model(arch)
    layers = model.base_model.h if arch == "gpt2" else model.base_model.layers
    lm = CausalLM(model).compile_blocks()
    assert [m for m in model.modules() if "forward" in vars(m)] == list(layers)
    assert len(layers) == model.config.num_hidden_layers
    lm.compile_blocks(False)
    assert not any("forward" in vars(m) for m in model.modules())


def test_head_check_compares_like_with_like():
    """check_head compares the model's logits with the head on its hidden states in one precision:
    under a bf16 autocast both are bf16 (the trainer's mixed precision; the model's forward was
    compared against an fp32 head and refused: 0.0354 in TRL's defaults), and with dropout on both
    run without it. A head that is not the model's (logits scaled by 1.5) is refused in bf16 too,
    where the logits' rounding allows a larger difference."""
    from prefrank.models import HeadError
    model = tiny_model("llama")
    lm = CausalLM(model)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)  # as accelerate wraps it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lm.check_head()
    dropout = tiny_model("llama")
    dropout.config.attention_dropout = 0.9
    for layer in dropout.model.layers:
        layer.self_attn.attention_dropout = 0.9
    CausalLM(dropout.train()).check_head()
    assert dropout.training  # left as it was
    for dtype in (torch.float32, torch.bfloat16):
        wrong = tiny_model("llama")
        wrong.config.logit_scale = 1.5  # prefrank reads the head as logits / 1.5 …
        lm = CausalLM(wrong)  # … while the model's own forward does not scale them
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), pytest.raises(HeadError) as e:
            lm.check_head()
        print(e.value)
