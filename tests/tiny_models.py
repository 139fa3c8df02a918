"""Tiny random-init causal LMs of several architectures, with weights large enough that the
next-token distributions depend strongly on position and context (near-uniform ones would hide
position or masking bugs)."""
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

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


def float64_logp(model_dir, prompt, completion):
    """Independent: the convention applied by hand, one unpadded float64 forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    p, c = tok(prompt)["input_ids"], tok(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
    return sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c))
