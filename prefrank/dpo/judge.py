"""Win rates against the reference during training, from a reward model.

`reward_model_judge` loads a reward model (AutoModelForSequenceClassification with one output) and
returns judge(model, tokenizer): the policy and the reference each sample one completion per
prompt (same seed for both, so a policy identical to the reference wins exactly half), the reward
model scores prompt + completion, and the policy wins when its reward is higher (ties count half).
Any Python callable judge(model, tokenizer) -> float serves as well (the demo's is exact).
"""
import torch

from prefrank.errors import InputError, bad_input


def sample_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """One sampled completion per prompt (left-padded batch, fixed seed)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def rewards(reward_model, reward_tokenizer, prompts: list[str], completions: list[str]) -> torch.Tensor:
    batch = reward_tokenizer([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True)
    with torch.no_grad():
        return reward_model(**batch.to(reward_model.device)).logits[:, 0].float().cpu()


def reward_model_judge(path: str, reference_model, prompts: list[str], *, max_new_tokens: int = 64, seed: int = 0,
                       trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    try:
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, trust_remote_code=trust_remote_code, use_safetensors=True).eval()
        reward_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        if not bad_input(e):
            raise
        raise InputError(f"cannot load reward model {path!r}: {type(e).__name__}: {e}") from None
    if reward_tokenizer.pad_token is None:
        reward_tokenizer.pad_token = reward_tokenizer.eos_token or reward_tokenizer.unk_token
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id
    reference_rewards = {}

    def judge(model, tokenizer) -> float:
        if not reference_rewards:  # the reference's samples and rewards never change
            reference_rewards["r"] = rewards(reward_model, reward_tokenizer, prompts, sample_completions(
                reference_model, tokenizer, prompts, max_new_tokens, seed))
        policy = rewards(reward_model, reward_tokenizer, prompts,
                         sample_completions(model, tokenizer, prompts, max_new_tokens, seed))
        ref = reference_rewards["r"]
        return float(((policy > ref).float() + 0.5 * (policy == ref).float()).mean())

    return judge
