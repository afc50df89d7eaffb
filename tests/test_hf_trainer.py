"""``transformers.Trainer`` trains a MiXSE's router (:class:`selfmoe.hf_trainer.MiXSETrainer`): router-only
optimizer, the auxiliary router loss in the loss (token-weighted like the LM loss under gradient
accumulation), checkpoints and ``save_model`` in :meth:`MiXSE.save_pretrained`'s format, resume from a
checkpoint equal to an uninterrupted run. Tiny random Llama, CPU, seconds.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from selfmoe import MiXSE  # noqa: E402
from selfmoe.data import SFTCollator, SFTDataset  # noqa: E402

from _tiny_lm import load_tiny_lm  # noqa: E402
from helpers import random_adapter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

AUX = {"load_balancing": 0.5}


def records(n=8):
    return [{"instruction": f"What is {i} plus {i + 3}?", "input": "", "output": f"{i} + {i + 3} = {2 * i + 3}." + " Ok." * (i % 3)}
            for i in range(n)]


@pytest.fixture(scope="module")
def experts(lm_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-trainer-experts")
    base, _ = load_tiny_lm(lm_path)
    return {"a": random_adapter(root / "a", base, 2), "b": random_adapter(root / "b", base, 3)}


def build(lm_path, experts):
    base, tok = load_tiny_lm(lm_path)
    torch.manual_seed(0)  # the router init
    return MiXSE.from_adapters(base, experts, aux_loss=AUX), tok


def trainer_for(model, tok, out, **kw):
    from transformers import TrainingArguments

    from selfmoe.hf_trainer import MiXSETrainer

    args = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
                learning_rate=5e-2, lr_scheduler_type="constant", warmup_steps=0, save_steps=2, logging_steps=1,
                report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0)
    args.update(kw)
    return MiXSETrainer(model=model, args=TrainingArguments(**args), train_dataset=SFTDataset(records(), tok),
                        data_collator=SFTCollator.for_tokenizer(tok), processing_class=tok)


def router(model):
    return {k: v.detach().clone() for k, v in model.router_state_dict().items()}


def test_the_optimizer_holds_the_router_only_and_the_loss_includes_the_aux_loss(lm_path, experts, tmp_path):
    model, tok = build(lm_path, experts)
    trainer = trainer_for(model, tok, tmp_path / "out")
    trainer.create_optimizer()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.router_parameters()}

    batch = SFTCollator.for_tokenizer(tok)([SFTDataset(records(4), tok)[i] for i in range(4)])
    items = int(batch["labels"][:, 1:].ne(-100).sum())
    model.train()

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in model.router_parameters()]

    out = model(**batch)
    lm_only = grads(out.loss)
    out = model(**batch)
    want = grads(out.loss + model.router_aux_loss())
    got = grads(trainer.compute_loss(model, dict(batch)))  # the mean over this batch's tokens + aux
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-8) for g, w in zip(got, want))
    assert any(not torch.allclose(g, w, rtol=1e-3, atol=1e-6) for g, w in zip(lm_only, want))  # aux matters
    # Accumulating over 2 micro-batches: each term is this micro-batch's share of the accumulated tokens.
    out = model(**batch)
    want = grads((out.loss * items + model.router_aux_loss() * items) / (2 * items))
    got = grads(trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(2 * items)))
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-8) for g, w in zip(got, want))


def test_trainer_trains_the_router_saves_loads_and_resumes(lm_path, experts, tmp_path):
    from selfmoe.hf_trainer import load_mixse_weights

    model, tok = build(lm_path, experts)
    start = router(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out = tmp_path / "run"
    trainer = trainer_for(model, tok, out)
    trainer.train()
    assert trainer.state.global_step == 4
    assert all(not torch.allclose(start[k], v, atol=1e-4) for k, v in router(model).items())  # the router learned
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4

    trainer.save_model()  # into output_dir, next to the checkpoint-* folders, which stay
    names = {p.name for p in out.iterdir()}
    assert {"mixse_config.json", "experts.safetensors", "router.safetensors", "checkpoint-2", "checkpoint-4"} <= names
    assert "model.safetensors" not in names  # never the base model
    ckpt = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"mixse_config.json", "router.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= ckpt

    ids = torch.tensor([tok("What is 3 plus 6?")["input_ids"]])
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    fresh, _ = load_tiny_lm(lm_path)
    loaded = MiXSE.from_pretrained(out, fresh).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    assert loaded.mixse_config.aux_loss == AUX

    # Resuming from checkpoint-2 on a fresh MiXSE gives the uninterrupted run's router.
    final = router(model)
    again, _ = build(lm_path, experts)
    resumed = trainer_for(again, tok, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for k, v in router(again).items():
        torch.testing.assert_close(v, final[k], rtol=1e-6, atol=1e-7)

    with pytest.raises(ValueError, match="experts"):
        other, _ = load_tiny_lm(lm_path)
        load_mixse_weights(MiXSE.from_adapters(other, {"b": experts["b"], "a": experts["a"]}), out)


def test_trainer_refuses_what_is_not_a_trainable_mixse(lm_path, experts, tmp_path):
    from transformers import TrainingArguments

    from selfmoe.hf_trainer import MiXSETrainer

    base, tok = load_tiny_lm(lm_path)
    with pytest.raises(TypeError, match="MiXSE"):
        MiXSETrainer(model=base, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True))
    model, _ = build(lm_path, experts)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MiXSETrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True))
