"""prefrank's fused loss inside TRL's DPOTrainer: the same loss and gradients as TRL's own."""
import pytest
import torch

trl = pytest.importorskip("trl")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
@pytest.mark.parametrize("precompute", [False, True])
def test_drop_in_equals_trl(loss_type, precompute, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from prefrank.demo.default import build_tokenizer
    from prefrank.demo.task import make_pairs
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    from tiny_models import tiny_model

    tokenizer = build_tokenizer()
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_pairs(8, seed=3)]
    results = []
    for cls in (DPOTrainer, PrefrankDPOTrainer):
        torch.manual_seed(0)
        model, ref = tiny_model("llama"), tiny_model("llama", seed=1)
        args = DPOConfig(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=8, max_steps=1,
                         loss_type=[loss_type], label_smoothing=0.1 if loss_type == "robust" else 0.0, beta=0.2,
                         precompute_ref_log_probs=precompute, report_to=[], use_cpu=True, dataloader_num_workers=0,
                         save_strategy="no", logging_steps=1, bf16=False)  # TRL defaults to bf16 autocast
        trainer = cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (trl_loss, trl_grads), (ours_loss, our_grads) = results
    print(f"{loss_type} precompute={precompute}: TRL {trl_loss:.7f}, prefrank {ours_loss:.7f}")
    assert ours_loss == pytest.approx(trl_loss, rel=1e-5)
    assert set(our_grads) == set(trl_grads)
    for name, g in trl_grads.items():  # fp32 on both sides, summed in different orders
        err = (our_grads[name] - g).abs().max().item()
        assert err <= 1e-4 * g.abs().max().item() + 1e-7, (name, err, g.abs().max().item())


def test_drop_in_runs_under_trl_default_bf16(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig

    from prefrank.demo.default import build_tokenizer
    from prefrank.demo.task import make_pairs
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    from tiny_models import tiny_model

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_pairs(8, seed=3)]
    model = tiny_model("llama")
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
                     save_strategy="no")  # bf16 autocast: TRL's default
    trainer = PrefrankDPOTrainer(model=model, ref_model=tiny_model("llama", seed=1), args=args,
                                 train_dataset=Dataset.from_list(rows), processing_class=build_tokenizer())
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
