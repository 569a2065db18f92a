"""Precision policies: dtypes of weights, adapters and grads; fp16 loss scaling skips bad steps."""

import pytest
import torch

from engine.loss import causal_lm_loss
from engine.precision import (
    PRECISIONS,
    cpu_bf16_support,
    default_precision,
    explain_precision,
    get_precision,
    resolve_precision,
)
from model.checkpoint import load_base
from model.lora import LoRAConfig


def test_policies():
    assert get_precision("bf16").weight_dtype == torch.bfloat16
    assert get_precision("fp16").loss_scaling and not get_precision("bf16").loss_scaling
    assert get_precision("fp32").compute_dtype is None
    assert default_precision("cpu", cpu_bf16=False) is PRECISIONS["fp32"]
    assert default_precision("cpu", cpu_bf16=True) is PRECISIONS["bf16"]
    with pytest.raises(ValueError, match="unknown precision"):
        get_precision("fp8")


def test_cpu_default_follows_the_cpu_flags():
    """auto on CPU = bf16 exactly when /proc/cpuinfo lists native bf16 (AVX512-BF16/AMX-BF16);
    --precision overrides, and the header line says which policy and why."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo to check the detection against")
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert cpu_bf16_support()[0] == native
    dev, policy, why = explain_precision("cpu", "auto")
    assert policy is PRECISIONS["bf16" if native else "fp32"] and dev.type == "cpu"
    assert why.startswith(policy.name) and "auto:" in why
    assert ("BF16" in why) == native or not native
    _, forced, why = explain_precision("cpu", "fp32")
    assert forced is PRECISIONS["fp32"] and "--precision fp32" in why
    assert resolve_precision("cpu", "auto")[1] is policy


def test_bf16_asked_for_on_a_cpu_without_it_warns():
    """--precision bf16 on a CPU without bf16: the header says it runs as fp32 GEMMs, slower
    than fp32, and names the fix; not where the CPU has it, not for fp32, not on auto (which
    never picks bf16 there)."""
    _, policy, why = explain_precision("cpu", "bf16", cpu_bf16=False)
    assert policy is PRECISIONS["bf16"]
    assert "WARNING" in why and "as fp32 GEMMs" in why and "--precision fp32" in why
    assert "WARNING" not in explain_precision("cpu", "bf16", cpu_bf16=True)[2]
    assert "WARNING" not in explain_precision("cpu", "fp32", cpu_bf16=False)[2]
    assert "WARNING" not in explain_precision("cpu", "auto", cpu_bf16=False)[2]


def train_step(model, policy, scaler, opt, poison=False):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with policy.autocast("cpu"):
        loss, _ = causal_lm_loss(model, ids)
    scaler.scale(loss).backward()
    if poison:  # an overflowed gradient, as fp16 produces when the scale is too large
        next(p for p in model.parameters() if p.requires_grad).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_low_precision_step_keeps_adapters_fp32(name):
    policy = get_precision(name)
    model, _ = load_base("random:tiny", dtype=policy.weight_dtype,
                         lora=LoRAConfig(r=4, dropout=0.0))
    lora = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == policy.weight_dtype for p in frozen)  # no fp32 copy of the base
    before = [p.detach().clone() for p in lora]
    opt = torch.optim.AdamW(lora, lr=1e-2)
    train_step(model, policy, policy.make_scaler("cpu"), opt)
    assert any(not torch.equal(a, b) for a, b in zip(before, lora, strict=True))
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in lora)


def test_fp16_scaler_skips_step_on_inf_and_writes_no_nan():
    policy = get_precision("fp16")
    model, _ = load_base("random:tiny", dtype=torch.float16, lora=LoRAConfig(r=4, dropout=0.0))
    lora = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=1e-2)
    scaler = policy.make_scaler("cpu", init_scale=2.0**10)
    assert scaler.is_enabled()
    before = [p.detach().clone() for p in lora]
    train_step(model, policy, scaler, opt, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(before, lora, strict=True))  # step skipped
    assert scaler.get_scale() == 2.0**9  # and the scale backed off
    assert not opt.state  # AdamW never ran, so no inf/NaN moments either
    train_step(model, policy, scaler, opt)  # the next, clean step goes through
    assert any(not torch.equal(a, b) for a, b in zip(before, lora, strict=True))
    assert all(torch.isfinite(p).all() for p in lora)


def test_bf16_scaler_is_a_no_op():
    scaler = get_precision("bf16").make_scaler("cpu")
    assert not scaler.is_enabled()
    loss = torch.tensor(2.0)
    assert scaler.scale(loss) is loss
