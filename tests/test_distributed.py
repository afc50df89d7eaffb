"""Data-parallel training with two CPU processes over gloo, as users launch it: ``accelerate launch`` and
``torchrun`` running the ``selfmoe`` command line on the tiny random Llama.

Checked against real runs, never constants: the trained weights equal a one-process run with the same global
batch (within float32 all-reduce rounding, ``REL_TOL`` below), only rank 0 writes, the log holds every
step once, the shared router's gradient is all-reduced once per step, Ctrl-C of the launcher leaves a
checkpoint that resumes on two processes (bit-identical to the uninterrupted two-process run) and on one
(within the tolerance), a killed process stops the run (the launcher names it) with a resumable checkpoint, a
process that hangs makes the other stop with a clear error after the collective timeout, and ``--fsdp`` shards
the frozen base (each process holds half) while what trains stays whole. Every launch is bounded by
``LAUNCH_TIMEOUT``; the module skips when gloo cannot start. Seven launches, about 2.5 minutes on 2 cores.

This file is also the driver the launchers run (see the bottom): ``python tests/test_distributed.py SPEC ARGS``
installs the test instrumentation SPEC asks for, then runs ``selfmoe.cli.main(ARGS)``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH_TIMEOUT = 240  # seconds per launch; two processes start in ~15 s on 2 cores
TOTAL_STEPS = 9  # 12 records, global batch 4 in micro-batches of 1: 3 steps an epoch, 3 epochs
# One process sums a step's 4 micro-batch gradients in order; two processes sum 2 + 2 and all-reduce: float32
# rounding of the gradient (~1e-7 relative), which Adam passes on through 9 steps of lr 1e-2 (and magnifies
# on the odd element whose gradient is near 0, so the bound is per tensor, not per element). Measured here:
# <= 1.3e-6 per tensor, the largest element difference 2.3e-6 on weights of magnitude <= 0.16.
REL_TOL = 1e-5  # ||two processes - one|| / ||one||, per tensor


def records(n=12):
    return [{"instruction": f"What is {i} plus {i + 3}?", "input": "", "output": f"{i} + {i + 3} = {2 * i + 3}." + " Ok." * (i % 3),
             "domain": "math"} for i in range(n)]


TRAIN_FLAGS = ["--batch-size", "4", "--micro-batch-size", "1", "--epochs", "3", "--lr", "1e-2", "--warmup-steps", "0",
               "--save-steps", "1", "--logging-steps", "1", "--no-progress", "--device", "cpu", "--mixed-precision", "no"]
CONFIG = dict(batch_size=4, micro_batch_size=1, num_epochs=3, learning_rate=1e-2, warmup_steps=0, save_steps=1,
              logging_steps=1, progress=False, mixed_precision="no")


# ---------------------------------------------------------------------------------------------- driver


def _driver_main(spec: dict, argv: list) -> int:
    """Runs in every launched process: the instrumentation ``spec`` asks for, then the command line."""
    sys.path.insert(0, HERE)
    import selfmoe.train as train_mod
    import selfmoe.train_runtime as runtime_mod
    from selfmoe.cli import main

    rank = int(os.environ.get("RANK", "0"))
    step_fn = train_mod._Loop._step

    def step(self, group, bar):
        step_fn(self, group, bar)
        if spec.get("sleep"):  # slow steps, so that a Ctrl-C lands mid-run
            time.sleep(spec["sleep"])
        if spec.get("hang_rank") == rank and self.state.step == spec.get("hang_step"):
            time.sleep(3600)  # alive but silent: the other process must not wait for it forever
        if spec.get("die_rank") == rank and self.state.step == spec.get("die_step"):
            os.kill(os.getpid(), signal.SIGKILL)  # killed (out of memory, a node lost)

    train_mod._Loop._step = step
    if spec.get("count_allreduce"):
        prepare = runtime_mod.AccelerateRuntime.prepare
        calls = []

        def counting_prepare(self, model, optimizer):
            names = {id(p): n for n, p in model.named_parameters()}
            ddp, opt = prepare(self, model, optimizer)
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                calls.append(sorted(names[id(p)] for p in bucket.parameters()))
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, hook)
            return ddp, opt

        runtime_mod.AccelerateRuntime.prepare = counting_prepare
    if spec.get("record_sharding"):
        import selfmoe.fsdp as fsdp_mod

        place = fsdp_mod.FSDPRuntime.place

        def recording_place(self, model):
            kind = type(model).__name__  # before fully_shard renames the class (FSDP<name>)
            place(self, model)
            from torch.distributed.tensor import DTensor

            seen = {n: {"sharded": isinstance(p, DTensor), "numel": p.numel(),
                        "local": (p.to_local() if isinstance(p, DTensor) else p).numel(), "trains": p.requires_grad}
                    for n, p in model.named_parameters()}
            path = os.path.join(spec["record_sharding"], f"{kind}-rank{rank}.json")
            with open(path, "w") as f:
                json.dump(seen, f)

        fsdp_mod.FSDPRuntime.place = recording_place
    try:
        rc = main(argv)
        for more in spec.get("then", []):  # further commands in the same processes (one launch, less start-up)
            rc = rc or main(more)
        return rc
    finally:
        if spec.get("count_allreduce"):
            with open(os.path.join(spec["count_allreduce"], f"allreduce-rank{rank}.json"), "w") as f:
                json.dump(calls, f)


# ---------------------------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def _torchrun(spec, argv):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), os.path.abspath(__file__), json.dumps(spec)] + list(argv)


_GLOO_CANNOT_START = ("DistNetworkError", "failed to bind", "Address already in use", "gloo is not available",
                      "Connection refused")


class Launch:
    def __init__(self, cmd, env=None, cwd=None):
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env or _env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, text=True)
        self.output = ""

    def wait(self, timeout=LAUNCH_TIMEOUT):
        try:
            self.output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.output, _ = self.proc.communicate()
            pytest.fail(f"launch did not finish within {timeout} s:\n{self.output[-4000:]}")
        self.seconds = time.monotonic() - self.start
        if self.proc.returncode != 0 and any(m in self.output for m in _GLOO_CANNOT_START) and "selfmoe" not in self.output:
            pytest.skip(f"gloo cannot start two processes here: {self.output[-500:]}")
        return self.proc.returncode


def run_ok(cmd):
    launch = Launch(cmd)
    rc = launch.wait()
    assert rc == 0, launch.output[-6000:]
    return launch


# ---------------------------------------------------------------------------------------------- fixtures

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
]


@pytest.fixture(scope="module")
def setup(lm_path, tmp_path_factory):
    pytest.importorskip("accelerate")
    from selfmoe.adapters import save_lora_adapter
    from selfmoe.data import write_jsonl
    from _tiny_lm import load_tiny_lm

    root = tmp_path_factory.mktemp("dist")
    write_jsonl(root / "math.jsonl", records())
    base, _ = load_tiny_lm(lm_path)
    experts = {}
    for name, seed in (("a", 2), ("b", 3)):  # two random experts that change the model's output
        g = torch.Generator().manual_seed(seed)
        weights = {n: (torch.randn(8, m.in_features, generator=g) * 0.3, torch.randn(m.out_features, 8, generator=g) * 0.3)
                   for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
        save_lora_adapter(root / name, weights, r=8, lora_alpha=16)
        experts[name] = root / name
    return {"root": root, "lm": lm_path, "data": root / "math.jsonl", "experts": experts}


def router_args(s, out):
    return (["train-router", "--model", str(s["lm"]), "--data", str(s["data"]), "--output", str(out),
             "--expert", f"a={s['experts']['a']}", "--expert", f"b={s['experts']['b']}",
             "--aux-loss", "load_balancing=0.01"] + TRAIN_FLAGS)


def one_process_router(s, out, **kw):
    from selfmoe.train import TrainConfig, train_router
    from _tiny_lm import load_tiny_lm

    model, tok = load_tiny_lm(s["lm"])
    return train_router(model, tok, s["experts"], records(), out, TrainConfig(**CONFIG, aux_loss={"load_balancing": 0.01}),
                        **kw)


@pytest.fixture(scope="module")
def router_two(setup):
    """The uninterrupted two-process router run (torchrun), counting DDP's all-reduces."""
    out = setup["root"] / "router-2p"
    counts = setup["root"] / "counts"
    counts.mkdir()
    launch = run_ok(_torchrun({"count_allreduce": str(counts)}, router_args(setup, out)))
    return out, counts, launch


@pytest.fixture(scope="module")
def router_one(setup):
    out = setup["root"] / "router-1p"
    one_process_router(setup, out)
    return out


# ---------------------------------------------------------------------------------------------- checks


def tensors(path, name):
    from safetensors.torch import load_file

    return load_file(str(path / name))


def assert_close_run(got, ref, name, exact=False):
    a, b = tensors(ref, name), tensors(got, name)
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert rel_err(b[k], a[k]) <= REL_TOL, (k, rel_err(b[k], a[k]))


def log_lines(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def metrics(out):
    return [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in log_lines(out) if "event" not in m]


def assert_single_writer(out, final):
    """Rank 0 alone wrote: the log holds one start, every step once, one done; no stray files."""
    lines = log_lines(out)
    events = [m["event"] for m in lines if "event" in m]
    assert events.count("done") == 1 and (events.count("start") + events.count("resume")) >= 1
    assert [m[0] for m in metrics(out)] == list(range(1, TOTAL_STEPS + 1))
    names = {p.name for p in out.iterdir()}
    assert names == {"train_config.json", "log.jsonl", "checkpoint"} | set(final), names
    ckpt = {p.name for p in (out / "checkpoint").iterdir()}
    assert ckpt == {"manifest.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt",
                    "trainer_state.json", "train_config.json"}


EXPERT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MIXSE_FILES = ("mixse_config.json", "experts.safetensors", "router.safetensors")


# ---------------------------------------------------------------------------------------------- tests


def test_accelerate_launch_train_expert_equals_one_process(setup, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath; gloo on CPUs) of the command line."""
    out = tmp_path / "expert-2p"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "selfmoe", "train-expert", "--model", str(setup["lm"]), "--data", str(setup["data"]),
           "--output", str(out)] + TRAIN_FLAGS
    launch = run_ok(cmd)
    assert launch.output.count("expert 'math' -> ") == 1, launch.output[-3000:]  # said once, by rank 0
    start = log_lines(out)[0]
    assert start["event"] == "start" and start["processes"] == 2
    assert_single_writer(out, EXPERT_FILES)
    rngs = torch.load(out / "checkpoint" / "rng_state.pt", weights_only=True)
    assert len(rngs) == 2  # each process's RNG state, gathered by rank 0

    ref = tmp_path / "expert-1p"
    one_process_expert(setup, ref)
    assert_close_run(out, ref, "adapter_model.safetensors")
    lora_b = [v for k, v in tensors(ref, "adapter_model.safetensors").items() if "lora_B" in k]
    assert all(v.abs().max() > 1e-3 for v in lora_b)  # trained well away from the zero init: the comparison can fail
    for (s1, l1, g1, r1), (s2, l2, g2, r2) in zip(metrics(out), metrics(ref)):
        assert s1 == s2 and r1 == r2 and l1 == pytest.approx(l2, rel=1e-5) and g1 == pytest.approx(g2, rel=1e-4)


def test_torchrun_train_router_equals_one_process_and_reduces_the_router_gradient_once_per_step(setup, router_two,
                                                                                                 router_one):
    out, counts, launch = router_two
    assert launch.output.count("MiXSE router over ['a', 'b'] -> ") == 1, launch.output[-3000:]
    assert_single_writer(out, MIXSE_FILES)
    assert_close_run(out, router_one, "router.safetensors")
    start = tensors(router_one, "router.safetensors")
    from selfmoe import MiXSE
    from selfmoe.train import set_seed
    from _tiny_lm import load_tiny_lm

    base, _ = load_tiny_lm(setup["lm"])
    set_seed(0)  # the router init train_router starts from
    router = MiXSE.from_adapters(base, setup["experts"]).router
    init = {f"router.{k}": v.detach().clone() for k, v in router.named_parameters()}
    assert all(not torch.allclose(start[k], init[k], rtol=0, atol=1e-4) for k in init)  # it learned: can fail
    assert_close_run(out, router_one, "experts.safetensors", exact=True)  # the experts are the frozen adapters

    # The shared router serves both decoder layers; DDP still all-reduces its gradient once per optimizer
    # step (after the last micro-batch of the step), not once per layer nor per micro-batch.
    for rank in (0, 1):
        calls = json.loads((counts / f"allreduce-rank{rank}.json").read_text())
        assert len(calls) == TOTAL_STEPS, calls
        assert all(c == sorted(init) for c in calls), calls[:2]  # one bucket: the router's parameters


def test_ctrl_c_of_the_launcher_leaves_a_checkpoint_that_resumes_on_two_and_on_one(setup, router_two, tmp_path):
    from selfmoe.checkpoints import checkpoint_step

    out = tmp_path / "router"
    launch = Launch(_torchrun({"sleep": 0.5}, router_args(setup, out)))
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while checkpoint_step(out) < 2 and launch.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # A terminal's Ctrl-C: SIGINT to the launcher and its workers, which the launcher forwards once more.
    os.killpg(launch.proc.pid, signal.SIGINT)
    sent = time.monotonic()
    rc = launch.wait()
    assert rc != 0 and time.monotonic() - sent < 60, launch.output[-4000:]
    step = checkpoint_step(out)
    assert 2 <= step < TOTAL_STEPS, (step, launch.output[-4000:])
    assert "continue with the same command plus --resume" in launch.output
    assert launch.output.count("interrupted after step") == 1, launch.output[-4000:]  # rank 0 says it once
    assert not (out / "router.safetensors").exists()
    events = [m.get("event") for m in log_lines(out)]
    assert events.count("interrupted") == 1
    assert [m[0] for m in metrics(out)] == list(range(1, step + 1))
    rngs = torch.load(out / "checkpoint" / "rng_state.pt", weights_only=True)
    assert len(rngs) == 2  # both processes stopped at the same step and saved together

    on_one = tmp_path / "router-resumed-1p"
    shutil.copytree(out, on_one)
    # On two processes: bit-identical to the uninterrupted two-process run, the log reads as one run.
    resumed = Launch(_torchrun({}, router_args(setup, out) + ["--resume"]))
    assert resumed.wait() == 0, resumed.output[-6000:]
    assert_close_run(out, router_two[0], "router.safetensors", exact=True)
    assert metrics(out) == metrics(router_two[0])
    assert_single_writer(out, MIXSE_FILES)

    # On one process: the same plan (12 examples cut the same way), the sum of the same gradients in another order.
    with pytest.warns(RuntimeWarning, match="saved with 2 process"):
        res = one_process_router(setup, on_one, resume=True)
    assert res.resumed_from == step
    assert_close_run(on_one, router_two[0], "router.safetensors")
    assert [m[0] for m in metrics(on_one)] == list(range(1, TOTAL_STEPS + 1))


def expert_args(s, out):
    return ["train-expert", "--model", str(s["lm"]), "--data", str(s["data"]), "--output", str(out)] + TRAIN_FLAGS


def one_process_expert(s, out):
    from selfmoe.train import TrainConfig, train_expert
    from _tiny_lm import load_tiny_lm

    model, tok = load_tiny_lm(s["lm"])
    return train_expert(model, tok, records(), out, TrainConfig(**CONFIG))


def test_fsdp2_shards_the_frozen_base_and_trains_like_one_process(setup, router_one, tmp_path):
    """``train-router --fsdp`` then ``train-expert --fsdp`` under torchrun: each process holds half of the base;
    the router, the experts and the LoRA being trained stay whole; checkpoints hold only what trains; the
    results equal the one-process runs."""
    router_out, expert_out, rec = tmp_path / "router-fsdp", tmp_path / "expert-fsdp", tmp_path / "sharding"
    rec.mkdir()
    spec = {"record_sharding": str(rec), "then": [expert_args(setup, expert_out) + ["--fsdp"]]}
    launch = run_ok(_torchrun(spec, router_args(setup, router_out) + ["--fsdp"]))
    assert launch.output.count("MiXSE router over ['a', 'b'] -> ") == 1, launch.output[-3000:]
    assert launch.output.count("expert 'math' -> ") == 1, launch.output[-3000:]
    assert_single_writer(router_out, MIXSE_FILES)
    assert_close_run(router_out, router_one, "router.safetensors")
    assert_close_run(router_out, router_one, "experts.safetensors", exact=True)
    assert set(tensors(router_out / "checkpoint", "trainable.safetensors")) == {"router.linear.weight", "router.linear.bias"}
    assert_single_writer(expert_out, EXPERT_FILES)
    one_process_expert(setup, tmp_path / "expert-1p")
    assert_close_run(expert_out, tmp_path / "expert-1p", "adapter_model.safetensors")
    lora = {k for k in tensors(expert_out / "checkpoint", "trainable.safetensors")}
    assert len(lora) == 2 * 7 * 2 and all(k.endswith(("lora_A", "lora_B")) for k in lora)

    for kind, whole_ok in (("MiXSE", lambda n: n.startswith("router.") or n.endswith((".lora_A", ".lora_B"))),
                           ("LlamaForCausalLM", lambda n: n.endswith((".lora_A", ".lora_B")))):
        for rank in (0, 1):
            seen = json.loads((rec / f"{kind}-rank{rank}.json").read_text())
            whole = {n for n, v in seen.items() if not v["sharded"]}
            assert whole and whole == {n for n in seen if whole_ok(n)}, whole
            assert {n for n, v in seen.items() if v["trains"]} <= whole
            base = [v for v in seen.values() if v["sharded"]]
            held, total = sum(v["local"] for v in base), sum(v["numel"] for v in base)
            assert 0.45 * total <= held <= 0.55 * total, (kind, held, total)  # this process holds half of the base


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_fsdp2_on_two_gpus_with_nccl(setup, router_one, tmp_path):
    """The GPU suite's check of the same recipe over NCCL (never run on the CPU-only CI). The reference is the
    one-process CPU run: float32 GPU matmuls (TF32 off) round differently, hence the 10x looser bound."""
    out = tmp_path / "router-fsdp-gpu"
    flags = [f for f in router_args(setup, out) if f not in ("--device", "cpu")]
    launch = run_ok(_torchrun({}, flags + ["--fsdp"]))
    assert launch.output.count("MiXSE router over ['a', 'b'] -> ") == 1, launch.output[-3000:]
    assert_single_writer(out, MIXSE_FILES)
    a, b = tensors(router_one, "router.safetensors"), tensors(out, "router.safetensors")
    assert a.keys() == b.keys() and all(rel_err(b[k], a[k]) <= 10 * REL_TOL for k in a)


def test_a_hung_process_makes_the_other_stop_with_a_clear_error(setup, tmp_path):
    out = tmp_path / "router"
    launch = Launch(_torchrun({"hang_rank": 1, "hang_step": 2}, router_args(setup, out)),
                    env=_env(SELFMOE_COLLECTIVE_TIMEOUT="12"))  # > any start-up skew of two loaded processes
    rc = launch.wait()
    assert rc != 0
    assert "train-router: error: process 0 of 2: a collective operation failed" in launch.output, launch.output[-4000:]
    assert "SELFMOE_COLLECTIVE_TIMEOUT" in launch.output and "rerun with --resume" in launch.output
    # The checkpoint of the last step both processes finished is complete and resumable.
    from selfmoe.checkpoints import checkpoint_step

    assert checkpoint_step(out) == 2 and (out / "checkpoint" / "manifest.json").is_file()


def test_a_killed_process_stops_the_run_and_leaves_a_resumable_checkpoint(setup, tmp_path):
    """On one machine the launcher watches its processes: one killed (SIGKILL: out of memory, say) makes it
    stop the others at once and name the one that died; the last checkpoint resumes."""
    from selfmoe.checkpoints import checkpoint_step

    out = tmp_path / "expert"
    launch = Launch(_torchrun({"die_rank": 1, "die_step": 2}, expert_args(setup, out)))
    assert launch.wait() != 0
    root_cause = launch.output[launch.output.index("Root Cause"):]
    assert "rank      : 1" in root_cause and "SIGKILL" in root_cause, launch.output[-3000:]
    saved = checkpoint_step(out)
    assert 1 <= saved <= 2 and not (out / "adapter_model.safetensors").exists()
    with pytest.warns(RuntimeWarning, match="saved with 2 process"):
        from selfmoe.train import TrainConfig, train_expert
        from _tiny_lm import load_tiny_lm

        model, tok = load_tiny_lm(setup["lm"])
        res = train_expert(model, tok, records(), out, TrainConfig(**CONFIG), resume=True)
    assert res.resumed_from == saved
    assert res.step == TOTAL_STEPS and [m[0] for m in metrics(out)] == list(range(1, TOTAL_STEPS + 1))


# ---------------------------------------------------------------------------------------------- no launcher needed


def test_accelerate_cpu_launcher_starting_one_process_is_warned_about(monkeypatch):
    from selfmoe.train_runtime import SingleProcess, accelerate_cpu_single_process, make_runtime

    for k in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert not accelerate_cpu_single_process()  # --num_processes 1: nothing to say
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what accelerate sets for --num_processes 2 without mpirun
    assert accelerate_cpu_single_process()
    with pytest.warns(RuntimeWarning, match="--multi_gpu --num_processes N"):
        assert isinstance(make_runtime("no", False, "cpu"), SingleProcess)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not accelerate_cpu_single_process()


def test_collective_timeout_and_failure_classification(monkeypatch):
    from selfmoe.train_runtime import DEFAULT_COLLECTIVE_TIMEOUT, collective_failure, collective_timeout

    monkeypatch.delenv("SELFMOE_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == DEFAULT_COLLECTIVE_TIMEOUT
    monkeypatch.setenv("SELFMOE_COLLECTIVE_TIMEOUT", "12.5")
    assert collective_timeout() == 12.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("SELFMOE_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ValueError, match="SELFMOE_COLLECTIVE_TIMEOUT"):
            collective_timeout()
    gloo = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"
    assert collective_failure(RuntimeError(gloo))
    assert collective_failure(RuntimeError("[..] Connection closed by peer [127.0.0.1]:1234"))
    assert not collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not collective_failure(ValueError("timed out"))
    assert not collective_failure(RuntimeError("could not restore the store of shapes"))


def test_a_second_sigint_right_after_the_first_is_the_same_ctrl_c():
    from selfmoe.train_runtime import InterruptGuard

    guard = InterruptGuard(same_press=30.0)
    with guard:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the launcher forwarding the terminal's Ctrl-C: not "stop now"
        assert guard.requested
    alone = InterruptGuard()
    with pytest.raises(KeyboardInterrupt):
        with alone:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # one process: a second Ctrl-C stops at once


if __name__ == "__main__":
    sys.exit(_driver_main(json.loads(sys.argv[1]), sys.argv[2:]))
