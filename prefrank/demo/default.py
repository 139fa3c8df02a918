"""The embedded default: the built-in addition task and a tiny causal LM trained on it here, on
first use, on the CPU (no download), then cached.

The model is a 2-layer Llama with a character-level tokenizer, fine-tuned with `prefrank sft` on
the chosen answers of freshly generated pairs (the paper's recipe for a reference model).
"""
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from prefrank.demo.task import ALPHABET, COLUMNS, make_pairs

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def cache_root() -> Path:
    return Path(os.environ.get("PREFRANK_CACHE", Path.home() / ".cache" / "prefrank"))


def build_key() -> str:
    """What decides the default model's weights: prefrank's Python code (the task, tokenizer, model, the
    trainer and ops it trains with), torch's version and its thread count (the reduction order of
    its matmuls). A cached model built by any other is not reused: the demo's numbers are the ones
    this code gives here."""
    digest = hashlib.sha256(f"{torch.__version__} threads={torch.get_num_threads()}".encode())
    package = Path(__file__).resolve().parents[1]
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:12]


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


def ensure_default(seed: int = 0, n_pairs: int = 1000, log=print) -> tuple[str, str]:
    """(data path, model path) of the embedded default, built and cached on first use: a random
    2-layer Llama fine-tuned by `prefrank sft` on the chosen answers of 38,400 fresh pairs."""
    from prefrank.dpo.trainer import TrainOptions, train
    target = cache_root() / f"default-seed{seed}-n{n_pairs}-{build_key()}"
    if (target / "model.safetensors").exists():
        log(f"prefrank: the embedded default model of this code, from the cache ({target})")
        return str(target / "pairs.jsonl"), str(target)
    log(f"prefrank: training the embedded default model (first use; cached in {target})")
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    tokenizer = build_tokenizer()
    build_model(len(tokenizer), seed).save_pretrained(tmp / "init")
    tokenizer.save_pretrained(tmp / "init")
    steps, batch_size = 600, 64
    with open(tmp / "sft.jsonl", "w") as f:  # problems of other seeds than any evaluation set's
        f.writelines(json.dumps(r) + "\n" for r in make_pairs(steps * batch_size, seed=1_000_000 * (seed + 1)))
    train(TrainOptions(model=str(tmp / "init"), data=str(tmp / "sft.jsonl"), out=str(tmp / "sft"), mode="sft",
                       lr=3e-3, warmup_steps=20, batch_size=batch_size, max_steps=steps, eval_every=steps, eval_pairs=256,
                       val_fraction=0.0, seed=seed, device="cpu", columns=COLUMNS), log=log)
    final = tmp / "sft" / "final"
    with open(final / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in make_pairs(n_pairs, seed=seed))
    try:
        os.replace(final, target)
    except OSError:  # another process finished first: keep its copy
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"prefrank: default model ready in {time.perf_counter() - start:.0f}s")
    return str(target / "pairs.jsonl"), str(target)
