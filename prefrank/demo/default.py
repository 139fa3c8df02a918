"""The embedded default: the built-in addition task and a tiny causal LM trained on it here, on
first use, on the CPU (no download), then cached.

The model is a 2-layer Llama with a character-level tokenizer, fine-tuned on the chosen answers
of freshly generated pairs (the paper's recipe for a reference model: SFT on chosen).
"""
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from prefrank.demo.task import ALPHABET, make_pairs

VERSION = 1  # bump when the task, tokenizer, model or training changes: invalidates caches
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def cache_root() -> Path:
    return Path(os.environ.get("PREFRANK_CACHE", Path.home() / ".cache" / "prefrank"))


def build_tokenizer():
    """A character-level tokenizer over the task's alphabet, BOS prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=64)


def build_model(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


def sft_on_chosen(model, tokenizer, *, steps: int, batch_size: int, lr: float, seed: int, log=None):
    """Fine-tune on prompt + chosen of freshly generated pairs; loss on the answer tokens only."""
    from prefrank.batching import pad
    from prefrank.reference import IGNORE_INDEX
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        rows = make_pairs(batch_size, seed=1_000_000 * (seed + 1) + step)  # never an eval seed
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]
        answers = [tokenizer(r["chosen"], add_special_tokens=False)["input_ids"] for r in rows]
        ids, mask = pad([p + a for p, a in zip(prompts, answers)], 0)
        labels, _ = pad([[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)], IGNORE_INDEX)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"  step {step:4d}  loss {loss.item():.3f}")
    model.eval()
    return model


def ensure_default(seed: int = 0, n_pairs: int = 1000, log=print) -> tuple[str, str]:
    """(data path, model path) of the embedded default, built and cached on first use."""
    target = cache_root() / f"default-v{VERSION}-seed{seed}-n{n_pairs}"
    if (target / "model.safetensors").exists():
        return str(target / "pairs.jsonl"), str(target)
    log(f"prefrank: training the embedded default model (first use; cached in {target})")
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    model = sft_on_chosen(build_model(len(tokenizer), seed), tokenizer, steps=600, batch_size=64, lr=3e-3,
                          seed=seed, log=log)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(tmp / "pairs.jsonl", "w") as f:
        for row in make_pairs(n_pairs, seed=seed):
            f.write(json.dumps(row) + "\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"prefrank: default model ready in {time.perf_counter() - start:.0f}s")
    return str(target / "pairs.jsonl"), str(target)
