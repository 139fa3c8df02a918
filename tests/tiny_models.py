"""Tiny random-init causal LMs of several architectures, with weights large enough that the
next-token distributions depend strongly on position and context (near-uniform ones would hide
position or masking bugs)."""
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 101  # odd on purpose


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, initializer_range=0.3)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, tie_word_embeddings=False, **common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common))
    elif arch == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=256,
                                                 rotary_pct=0.5, **common))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ("llama", "qwen2", "gpt2", "neox")


def float64_logp(model_dir, prompt, completion, siblings=()):
    """Independent: the joint tokenization applied by hand (the ids of prompt + completion; the
    prompt is what the prompt's own ids share with those of prompt + each of completion and its
    `siblings`), one unpadded float64 forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    own = tok(prompt)["input_ids"]
    ids = tok(prompt + completion)["input_ids"]
    n = min(next((i for i, (a, b) in enumerate(zip(own, full)) if a != b), min(len(own), len(full)))
            for full in [ids] + [tok(prompt + s)["input_ids"] for s in siblings])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    return sum(logp[j - 1, ids[j]].item() for j in range(n, len(ids)))


SENTENCES = ["Hello world!! How are you?", "Q: 1+2=?\nA: 3.", "The cat sat... on the mat!?", "I'm sorry; I can't.",
             "emoji 😀🎉 time", "Well,\n\nthat's   it -- done!!!", "Assistant: No. Assistant: Yes?!"]


def byte_level_bpe():
    """A byte-level BPE (GPT-2 style) trained here on a few sentences, BOS prepended: its merges
    join letters with letters and punctuation with punctuation across a prompt/completion boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(SENTENCES * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)
