"""Training loops on a tiny random Llama (CPU, seconds): experts, router, resume, faults.

Every comparison is against a real computation: losses from :func:`evaluate_loss` on the trained
weights, logits from PEFT itself, weights from an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from selfmoe import MiXSE
from selfmoe.adapters import load_lora_adapter, save_lora_adapter
from selfmoe.data import DataFormatError, write_jsonl
from selfmoe.train import (CHECKPOINT_DIR, LOG_NAME, RUN_CONFIG_NAME, LoRALinear, NonFiniteLossError, TrainConfig,
                           TrainingInterrupted, add_lora, attach_lora_adapter, evaluate_loss, load_records, remove_lora,
                           select_domain, set_seed, train_expert, train_router)

from _tiny_lm import load_tiny_lm
from helpers import rel_err

# Tiny shapes run fastest on one thread (conftest restores the setting after the module).
pytestmark = pytest.mark.usefixtures("one_thread")

ALL7 = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def math_records(n=8):
    return [{"instruction": f"What is {i} plus {i + 3}?", "input": "", "output": f"{i} + {i + 3} = {2 * i + 3}.",
             "domain": "math"} for i in range(n)]


def code_records(n=8):
    return [{"instruction": f"Write a function that adds {i}.", "input": "",
             "output": f"def add{i}(x):\n    return x + {i}", "domain": "coding"} for i in range(n)]


def cfg(**kw):
    base = dict(batch_size=4, micro_batch_size=2, num_epochs=2, learning_rate=1e-2, progress=False, save_steps=1000,
                logging_steps=1, warmup_ratio=0.0)
    base.update(kw)
    return TrainConfig(**base)


def fresh(lm_path):
    return load_tiny_lm(lm_path)


def adapter_tensors(path):
    return load_file(str(path / "adapter_model.safetensors"))


def metric_lines(path):
    return [json.loads(line) for line in (path / LOG_NAME).read_text().splitlines() if "event" not in json.loads(line)]


# ------------------------------------------------------------------------------------------ experts


def test_expert_training_lowers_loss_and_leaves_base_untouched(lm_path, tmp_path):
    model, tok = fresh(lm_path)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    recs = math_records()
    loss0 = evaluate_loss(model, tok, recs)
    res = train_expert(model, tok, recs, tmp_path / "math", cfg(num_epochs=4))
    # The base model is handed back unwrapped, with its exact weights.
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == before_state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_state.items())
    assert all(p.requires_grad for p in model.parameters())  # flags as they came

    out = tmp_path / "math"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", RUN_CONFIG_NAME, LOG_NAME, CHECKPOINT_DIR} <= names
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ALL7
    assert len(adapter_tensors(out)) == 2 * 7 * 2  # A and B for 7 linears in each of 2 layers
    saved = json.loads((out / RUN_CONFIG_NAME).read_text())
    assert TrainConfig.from_dict(saved["config"]) == cfg(num_epochs=4)
    assert saved["run"]["kind"] == "expert" and saved["run"]["data"]["records"] == 8

    attach_lora_adapter(model, out)
    loss1 = evaluate_loss(model, tok, recs)
    remove_lora(model)
    assert loss1 < loss0 - 0.5, (loss0, loss1)
    losses = [m["loss"] for m in metric_lines(out)]
    assert len(losses) == res.step == res.total_steps == 8 and losses[-1] < losses[0]
    assert res.loss == losses[-1]  # logging_steps=1: the last window is the last step


def test_expert_dir_loads_in_peft_with_the_same_logits(lm_path, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = fresh(lm_path)
    train_expert(model, tok, math_records(), tmp_path / "e", cfg(num_epochs=1))
    ids = torch.tensor([tok("What is 3 plus 6?")["input_ids"]])

    base, _ = fresh(lm_path)
    with torch.no_grad():
        ref_base = base(ids).logits
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "e")).eval()
    with torch.no_grad():
        ref = peft_model(ids).logits
    assert rel_err(ref, ref_base) > 1e-3  # the expert really changes the model, so the comparisons can fail

    ours, _ = fresh(lm_path)
    attach_lora_adapter(ours, tmp_path / "e")
    with torch.no_grad():
        got = ours.eval()(ids).logits
    assert rel_err(got, ref) <= 1e-5

    mixse_base, _ = fresh(lm_path)
    mixse = MiXSE.from_adapters(mixse_base, {"math": tmp_path / "e"}).eval()
    with torch.no_grad():
        got = mixse(ids).logits
    assert rel_err(got, ref) <= 1e-5


def test_instance_merging_trains_on_the_union(lm_path, tmp_path):
    model, tok = fresh(lm_path)
    union = math_records(4) + code_records(4)
    train_expert(model, tok, union, tmp_path / "union", cfg(num_epochs=1))
    run = json.loads((tmp_path / "union" / RUN_CONFIG_NAME).read_text())["run"]
    assert run["data"]["domains"] == {"coding": 4, "math": 4}
    assert load_lora_adapter(tmp_path / "union").r == 8


def test_accumulation_and_micro_batches_give_the_full_batch_gradient(lm_path, tmp_path):
    """Loss and gradient norm of one step over the same 4 examples: 1 micro-batch of 4 == 2 of 2 == 4 of 1.
    Averaging per micro-batch instead of per target token would change both (responses differ in length)."""
    recs = [dict(r, output=r["output"] + " Done." * (i % 3)) for i, r in enumerate(math_records(4))]
    got = []
    for micro in (4, 2, 1):
        model, tok = fresh(lm_path)
        train_expert(model, tok, recs, tmp_path / f"m{micro}", cfg(micro_batch_size=micro, max_steps=1))
        (line,) = metric_lines(tmp_path / f"m{micro}")
        got.append((line["loss"], line["grad_norm"]))
    for loss, norm in got[1:]:
        assert loss == pytest.approx(got[0][0], rel=1e-5) and norm == pytest.approx(got[0][1], rel=1e-4)


def _checkpointing_on(model):
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing


def test_gradient_checkpointing_gives_the_same_weights(lm_path, tmp_path):
    out = {}
    for gc in (False, True):
        model, tok = fresh(lm_path)
        train_expert(model, tok, math_records(4), tmp_path / f"gc{gc}", cfg(max_steps=2, gradient_checkpointing=gc))
        assert not _checkpointing_on(model)  # switched off again afterwards
        out[gc] = adapter_tensors(tmp_path / f"gc{gc}")
    assert any(v.abs().sum() > 0 for k, v in out[True].items() if "lora_B" in k)
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_in_router_training(lm_path, tmp_path):
    """The shared router's gates are computed in a hook outside the checkpointed layer; the replay in
    backward must reuse them, so router gradients (and weights) match training without checkpointing."""
    model, _ = fresh(lm_path)
    _random_adapter(tmp_path / "a", model, seed=2, scale=0.3)
    _random_adapter(tmp_path / "b", model, seed=3, scale=0.3)
    experts = {"a": tmp_path / "a", "b": tmp_path / "b"}
    set_seed(0)  # the router init train_router starts from (TrainConfig.seed = 0)
    start = {k: v.clone() for k, v in MiXSE.from_adapters(model, experts).router.state_dict().items()}
    out = {}
    for gc in (False, True):
        model, tok = fresh(lm_path)
        train_router(model, tok, experts, math_records(4), tmp_path / f"r{gc}", cfg(max_steps=2, gradient_checkpointing=gc))
        out[gc] = load_file(str(tmp_path / f"r{gc}" / "router.safetensors"))
    assert not torch.equal(out[False]["router.linear.weight"], start["linear.weight"])  # the router did learn
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------- resume


def _interrupt_by_callback(step):
    def cb(state, model):
        if state.step == step:
            raise KeyboardInterrupt
    return {"callbacks": [cb]}


def _interrupt_by_signal(step):
    def cb(state, model):
        if state.step == step:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: the loop stops at the next safe point
    return {"callbacks": [cb]}


@pytest.fixture(scope="module")
def uninterrupted(lm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    model, tok = fresh(lm_path)
    train_expert(model, tok, math_records(10), out, cfg(lora_dropout=0.2, num_epochs=3))
    return out


@pytest.mark.parametrize("how,saved_step", [("callback", 3), ("signal", 4), ("mid_step", 4)])
def test_resume_after_interrupt_is_bit_identical(lm_path, tmp_path, uninterrupted, how, saved_step):
    """Dropout is on, so the RNG states must be restored exactly; 'mid_step' stops inside an accumulation
    (the half-done step's RNG draws must not leak into the resumed run)."""
    model, tok = fresh(lm_path)
    out = tmp_path / "run"
    extra, hook = {}, None
    if how == "callback":
        extra = _interrupt_by_callback(3)
    elif how == "signal":
        extra = _interrupt_by_signal(4)
    else:
        calls = []

        def pre_hook(module, args, kwargs):
            calls.append(1)
            # 10 examples in micro-batches of 2, 2 per step: steps 1-3 of epoch 0 take calls 1-2, 3-4, 5;
            # step 4 calls 6-7; step 5's call 8 runs (drawing dropout masks), its call 9 is interrupted
            if len(calls) == 9:
                raise KeyboardInterrupt

        hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    handler_before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `&` in a shell
    with pytest.raises(TrainingInterrupted) as info:
        train_expert(model, tok, math_records(10), out, cfg(lora_dropout=0.2, num_epochs=3), **extra)
    if hook is not None:
        hook.remove()
    assert info.value.step == saved_step and info.value.checkpoint == out / CHECKPOINT_DIR
    assert json.loads((out / CHECKPOINT_DIR / "trainer_state.json").read_text())["step"] == saved_step
    assert not (out / "adapter_config.json").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored

    model, tok = fresh(lm_path)
    res = train_expert(model, tok, math_records(10), out, cfg(lora_dropout=0.2, num_epochs=3), resume=True)
    assert res.resumed_from == saved_step and res.step == res.total_steps
    ref, got = adapter_tensors(uninterrupted), adapter_tensors(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # The log reads as one run: the same per-step losses, nothing duplicated.
    strip = lambda lines: [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in lines]  # noqa: E731
    assert strip(metric_lines(out)) == strip(metric_lines(uninterrupted))


def test_resume_from_periodic_checkpoint_after_a_crash(lm_path, tmp_path, uninterrupted):
    """A hard crash (an exception other than Ctrl-C) writes nothing; resuming uses the periodic checkpoint."""
    model, tok = fresh(lm_path)
    out = tmp_path / "run"

    def crash(state, model):
        if state.step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_expert(model, tok, math_records(10), out, cfg(lora_dropout=0.2, num_epochs=3, save_steps=2), callbacks=[crash])
    assert json.loads((out / CHECKPOINT_DIR / "trainer_state.json").read_text())["step"] == 4
    model, tok = fresh(lm_path)
    # save_steps is bookkeeping: a resume may change it.
    res = train_expert(model, tok, math_records(10), out, cfg(lora_dropout=0.2, num_epochs=3, save_steps=3), resume=True)
    assert res.resumed_from == 4
    ref, got = adapter_tensors(uninterrupted), adapter_tensors(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# --------------------------------------------------------------------------------------------- faults


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(lm_path, tmp_path):
    model, tok = fresh(lm_path)
    out = tmp_path / "run"

    def poison(state, model):
        if state.step == 2:  # after step 2's checkpoint: step 3's forward sees NaN weights
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.data.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"step 3 .*loss is nan.*last good checkpoint.*step 2") as info:
        train_expert(model, tok, math_records(10), out, cfg(save_steps=2, num_epochs=3), callbacks=[poison])
    assert info.value.step == 3 and info.value.checkpoint == out / CHECKPOINT_DIR
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    ckpt = out / CHECKPOINT_DIR
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "trainable.safetensors")).values())
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # nothing half-written
    events = [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]
    assert events[-1]["event"] == "non_finite" and events[-1]["step"] == 3

    # The kept checkpoint is usable: resuming (without the poison) finishes the run.
    model, tok = fresh(lm_path)
    res = train_expert(model, tok, math_records(10), out, cfg(save_steps=2, num_epochs=3), resume=True)
    assert res.resumed_from == 2 and (out / "adapter_config.json").is_file()


def test_output_dir_holding_a_run_is_refused_unless_resume_or_overwrite(lm_path, tmp_path):
    model, tok = fresh(lm_path)
    out = tmp_path / "run"
    train_expert(model, tok, math_records(4), out, cfg(max_steps=2))
    first = adapter_tensors(out)
    with pytest.raises(FileExistsError, match="already holds this training run; pass resume"):
        train_expert(model, tok, math_records(4), out, cfg(max_steps=2))
    with pytest.raises(FileExistsError, match=r"different training run.*learning_rate: 0\.01 \(saved\) vs 0\.02 \(now\)"):
        train_expert(model, tok, math_records(4), out, cfg(max_steps=2, learning_rate=0.02), resume=True)
    with pytest.raises(FileExistsError, match="different training run.*fingerprint"):
        train_expert(model, tok, math_records(5), out, cfg(max_steps=2), resume=True)
    # Resuming a finished run does no work and changes nothing.
    res = train_expert(model, tok, math_records(4), out, cfg(max_steps=2), resume=True)
    assert res.resumed_from == 2 and res.history == []
    assert all(torch.equal(first[k], v) for k, v in adapter_tensors(out).items())

    (out / "notes.txt").write_text("mine")
    res = train_expert(model, tok, math_records(4), out, cfg(max_steps=2, learning_rate=0.02), overwrite=True)
    assert res.resumed_from is None and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / RUN_CONFIG_NAME).read_text())["config"]["learning_rate"] == 0.02
    assert not all(torch.equal(first[k], v) for k, v in adapter_tensors(out).items())

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_text("x")
    with pytest.raises(FileExistsError, match="holds no selfmoe training run"):
        train_expert(model, tok, math_records(4), foreign, cfg(max_steps=1))
    with pytest.raises(ValueError, match="not both"):
        train_expert(model, tok, math_records(4), out, cfg(max_steps=1), resume=True, overwrite=True)


# --------------------------------------------------------------------------------------------- router


def _random_adapter(path, base, seed, scale):
    """A harmful expert: random nonzero A and B on every linear of the decoder layers."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, m in base.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            weights[name] = (torch.randn(8, m.in_features, generator=g) * scale,
                             torch.randn(m.out_features, 8, generator=g) * scale)
    save_lora_adapter(path, weights, r=8, lora_alpha=16)


def test_router_training_lowers_loss_and_keeps_base_and_experts_bit_identical(lm_path, tmp_path):
    recs = math_records(6)
    model, tok = fresh(lm_path)
    train_expert(model, tok, recs, tmp_path / "good", cfg(num_epochs=4))
    _random_adapter(tmp_path / "bad", model, seed=1, scale=0.5)
    experts = {"good": tmp_path / "good", "bad": tmp_path / "bad"}
    rcfg = cfg(num_epochs=6, learning_rate=5e-2, micro_batch_size=2, batch_size=2)

    base, _ = fresh(lm_path)
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    set_seed(rcfg.seed)  # the router init train_router starts from
    start = MiXSE.from_adapters(base, experts)
    loss0 = evaluate_loss(start, tok, recs)
    start.unload()
    res = train_router(base, tok, experts, recs + code_records(2), tmp_path / "mixse", rcfg)
    assert res.step == res.total_steps
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_before.items())  # base untouched, unwrapped
    names = {p.name for p in (tmp_path / "mixse").iterdir()}
    assert {"mixse_config.json", "experts.safetensors", "router.safetensors", RUN_CONFIG_NAME, LOG_NAME} <= names

    loaded = MiXSE.from_pretrained(tmp_path / "mixse", base)
    assert loaded.expert_names == ["good", "bad"]
    for e, name in enumerate(loaded.expert_names):  # saved experts are exactly the adapters
        ad = load_lora_adapter(experts[name])
        for path, layer in loaded.lora_modules.items():
            A, B = layer.expert_factors(e)
            assert torch.equal(A, ad.weights[path][0]) and torch.equal(B, ad.weights[path][1])
    loss1 = evaluate_loss(loaded, tok, recs)
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    run = json.loads((tmp_path / "mixse" / RUN_CONFIG_NAME).read_text())["run"]
    assert run["kind"] == "router" and set(run["experts"]) == {"good", "bad"}
    loaded.unload()


def test_router_aux_loss_is_logged_and_trained(lm_path, tmp_path):
    model, tok = fresh(lm_path)
    _random_adapter(tmp_path / "a", model, seed=2, scale=0.1)
    _random_adapter(tmp_path / "b", model, seed=3, scale=0.1)
    train_router(model, tok, {"a": tmp_path / "a", "b": tmp_path / "b"}, math_records(4), tmp_path / "mixse",
                 cfg(max_steps=2, aux_loss={"load_balancing": 0.5}))
    lines = metric_lines(tmp_path / "mixse")
    assert all(m["aux_loss"] > 0 for m in lines)


def test_router_training_refuses_bad_experts(lm_path, tmp_path):
    model, tok = fresh(lm_path)
    with pytest.raises(FileNotFoundError, match="expert 'x'.*adapter_model.safetensors"):
        train_router(model, tok, {"x": tmp_path / "missing"}, math_records(4), tmp_path / "out", cfg())
    with pytest.raises(ValueError, match="top_k"):
        _random_adapter(tmp_path / "a", model, seed=2, scale=0.1)
        train_router(model, tok, {"a": tmp_path / "a"}, math_records(4), tmp_path / "out", cfg(top_k=2))


# -------------------------------------------------------------------------------------- accelerate


def test_accelerate_single_process_matches_the_plain_loop(lm_path, tmp_path):
    pytest.importorskip("accelerate")
    out = {}
    for use in (False, True):
        model, tok = fresh(lm_path)
        res = train_expert(model, tok, math_records(4), tmp_path / f"acc{use}", cfg(max_steps=2, mixed_precision="no"),
                           accelerate=use, device="cpu")
        assert res.step == 2
        out[use] = adapter_tensors(tmp_path / f"acc{use}")
    assert all(torch.equal(out[True][k], out[False][k]) for k in out[False])


def test_precision_auto_is_float32_on_cpu_and_bf16_autocast_runs(lm_path, tmp_path):
    model, tok = fresh(lm_path)
    train_expert(model, tok, math_records(4), tmp_path / "auto", cfg(max_steps=1))
    start = json.loads((tmp_path / "auto" / LOG_NAME).read_text().splitlines()[0])
    assert start["event"] == "start" and start["precision"] == "no" and start["device"] == "cpu"
    res = train_expert(model, tok, math_records(4), tmp_path / "bf16", cfg(max_steps=2, mixed_precision="bf16"))
    assert res.step == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in res.history)
    tensors = adapter_tensors(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 for t in tensors.values())  # adapters stay float32 under autocast


# ------------------------------------------------------------------------------------ config & data


def test_train_config_validation_and_round_trip():
    c = TrainConfig(aux_loss={"z_loss": 1e-3}, target_modules=["q_proj", "v_proj"])
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert TrainConfig().batch_size == 32 and TrainConfig().lora_r == 8 and TrainConfig().learning_rate == 3e-4
    for kw, field in [({"batch_size": 30, "micro_batch_size": 4}, "batch_size"), ({"learning_rate": 0}, "learning_rate"),
                      ({"lr_scheduler": "step"}, "lr_scheduler"), ({"lora_dropout": 1.0}, "lora_dropout"),
                      ({"mixed_precision": "fp16"}, "mixed_precision"), ({"router": "moe"}, "router"),
                      ({"max_steps": 0}, "max_steps"), ({"aux_loss": {"nope": 1.0}}, "aux_loss")]:
        with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
            TrainConfig(**kw)
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['lr'\]"):
        TrainConfig.from_dict({"lr": 1.0})


def test_load_records_files_dirs_and_errors(tmp_path):
    write_jsonl(tmp_path / "d" / "math.jsonl", math_records(2))
    write_jsonl(tmp_path / "d" / "coding.jsonl", code_records(3))
    write_jsonl(tmp_path / "plain.jsonl", [{"instruction": "a", "output": "b"}])
    recs = load_records([tmp_path / "d", tmp_path / "plain.jsonl"])
    assert [r.get("domain") for r in recs] == ["coding"] * 3 + ["math"] * 2 + [None]
    assert len(select_domain(recs, "math")) == 2
    with pytest.raises(ValueError, match=r"no records of domain 'law'.*\['None', 'coding', 'math'\]"):
        select_domain(recs, "law")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: missing required key 'output'"):
        load_records(tmp_path / "bad.jsonl")


def test_add_and_remove_lora_restore_the_model(lm_path):
    model, _ = fresh(lm_path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers = add_lora(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert len(layers) == 4 and all(layer.scaling == 2.0 for layer in layers.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{p}.{w}" for p in layers for w in ("lora_A", "lora_B")}
    with pytest.raises(ValueError, match="already holds LoRALinear"):
        add_lora(model)
    remove_lora(model)
    after = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert after.keys() == linears.keys() and all(after[n] is linears[n] for n in linears)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="'nope' matches no nn.Linear"):
        add_lora(model, target_modules=["nope"])


def test_attach_lora_adapter_checks_everything_first(lm_path, tmp_path):
    model, _ = fresh(lm_path)
    q, up = model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.up_proj
    weights = {"model.layers.0.self_attn.q_proj": (torch.randn(4, 64), torch.randn(64, 4)),
               "model.layers.1.mlp.up_proj": (torch.randn(4, 64), torch.randn(64, 4))}  # up_proj is 64 -> 128
    save_lora_adapter(tmp_path / "bad", weights, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj'.*\[64 -> 128\]"):
        attach_lora_adapter(model, tmp_path / "bad")
    assert model.model.layers[0].self_attn.q_proj is q and model.model.layers[1].mlp.up_proj is up
    assert not hasattr(model, "_selfmoe_lora_flags")
