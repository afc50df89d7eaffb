"""lora_mix with rank-1 experts and E in the hundreds (MoR1E: the rank is the expert count).

Every path the dispatchers can pick at r=1 against the float64 reference, gradients included: the torch
formulations (dense, dense-small, gathered) and, under the Triton interpreter on tiny shapes, the dense
and grouped kernels. The dispatcher's choices at these sizes are pinned too.
"""
import os

import pytest
import torch

from selfmoe.kernels import lora_mix
from selfmoe.kernels.dispatch import choose_lora_path
from selfmoe.kernels.torch_dispatch import ENV_TORCH_PATH, choose_torch_path
from selfmoe.kernels.contract import NO_GRADS, GradNeeds
from selfmoe.kernels.naive import lora_mix_naive

from helpers import check_against_reference, make_case, rel_err

R1_CASES = {
    "E256-dense": (19, 24, 20, 256, 1, 256),  # softmax over every rank-1 expert
    "E256-top8": (19, 24, 20, 256, 1, 8),
    "E32-dense": (19, 24, 20, 32, 1, 32),  # the 4 x 8 mix-and-match count
}


@pytest.mark.parametrize("name", list(R1_CASES))
@pytest.mark.parametrize("path", ["dense", "auto"])
def test_rank1_many_experts_torch_training(name, path, monkeypatch):
    monkeypatch.setenv(ENV_TORCH_PATH, path)
    T, d_in, d_out, E, r, k = R1_CASES[name]
    check_against_reference(make_case(T, d_in, d_out, E, r, k, seed=E + k), lora_mix, torch.float32, backend="torch")


@pytest.mark.parametrize("name", list(R1_CASES))
@pytest.mark.parametrize("T,path", [(1, "gathered"), (3, "gathered"), (19, "dense-small"), (80, "dense")])
def test_rank1_many_experts_torch_inference(name, T, path, monkeypatch):
    _, d_in, d_out, E, r, k = R1_CASES[name]
    monkeypatch.setenv(ENV_TORCH_PATH, path)
    case = make_case(T, d_in, d_out, E, r, k, seed=T + E + k).to(torch.float32)
    ref = case.to(torch.float64).call(lora_mix_naive)
    with torch.no_grad():
        out = case.call(lora_mix, backend="torch")
    assert choose_torch_path(T, E, k, NO_GRADS, r=r) == path
    assert rel_err(out, ref) <= 1e-5


def test_rank1_dispatch_choices():
    # torch side: decode goes gathered while T*k < E; training stays dense at rank 1 (sorting a slot
    # costs more than the one rank column it saves: torch_dispatch.sorted_pays)
    assert choose_torch_path(1, 256, 8, GradNeeds(False, False, False, False, False, False), r=1) == "gathered"
    assert choose_torch_path(4096, 256, 256, GradNeeds(True, False, False, True, False, False), r=1) == "dense"
    # Triton side (H100 model): prefill keeps the dense-rank kernels at E*r = 256 rank columns whether
    # gating is dense or top-8 (the grouped path would gather x once per slot and pad r=1 to a 16-wide
    # dot); the decode kernel is no candidate past 128 rank columns.
    for k in (256, 8):
        for training in (False, True):
            assert choose_lora_path(8192, 4096, 4096, 256, 1, k, training=training, grouped_ok=True, machine="h100") == "dense"
    assert choose_lora_path(1, 4096, 4096, 256, 1, 256, grouped_ok=True, machine="h100") != "decode"
    assert choose_lora_path(1, 4096, 4096, 32, 1, 32, grouped_ok=True, machine="h100") == "decode"


@pytest.mark.parametrize("path,E,k", [("dense", 256, 256), ("grouped", 256, 2), ("dense", 32, 32)])
def test_rank1_many_experts_triton(path, E, k, monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("SELFMOE_LORA_PATH", path)
    case = make_case(3, 32, 24, E, 1, k, seed=11 + k)
    if torch.cuda.is_available():
        for name in ("x", "lora_A", "lora_B", "expert_weights", "base_weight", "base_bias", "expert_ids"):
            setattr(case, name, getattr(case, name).cuda())
    check_against_reference(case, lora_mix, torch.float32, backend="triton")
