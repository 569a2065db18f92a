"""kernels/cpu_bf16.py: bf16 products as fp32 GEMMs where the CPU lacks bf16 instructions.

References: float64 products rounded to bf16 (the value a bf16 GEMM with exact accumulation
would give) and torch's own bf16 kernels (`FORCE_NATIVE = True`). The emulated path is forced
(`FORCE_NATIVE = False`), so these tests run the same on any CPU.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.cpu_bf16 as cpu_bf16
from engine.loss import causal_lm_loss
from kernels.cpu_bf16 import addmm_, attention, linear
from model.config import LlamaConfig
from model.llama import Llama
from model.lora import LoRAConfig, mark_only_lora_trainable

BF16 = torch.bfloat16


@pytest.fixture
def emulate(monkeypatch):
    """The CPU treated as one without bf16 (the fallback path), whatever this one has."""
    monkeypatch.setattr(cpu_bf16, "FORCE_NATIVE", False)


def native(fn):
    """fn() with torch's own bf16 kernels (the reference)."""
    saved, cpu_bf16.FORCE_NATIVE = cpu_bf16.FORCE_NATIVE, True
    try:
        return fn()
    finally:
        cpu_bf16.FORCE_NATIVE = saved


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 steps between two bf16 tensors of the same sign pattern."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def test_linear_is_the_bf16_product_rounded_once(emulate):
    """Exact products, fp32 sums, one rounding: equal to the float64 product rounded to bf16
    on almost every element, never more than one bf16 step away."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 64, generator=g).to(BF16)
    w = torch.randn(40, 64, generator=g).to(BF16)
    y = linear(x, w)
    assert y.dtype == BF16 and y.shape == (3, 17, 40)
    assert y.grad_fn is None  # nothing required grad
    exact = (x.double() @ w.double().t()).to(BF16)
    assert ulps(y, exact).max() <= 1
    assert (y == exact).float().mean() > 0.98
    torch.testing.assert_close(y, native(lambda: F.linear(x, w)), rtol=2 ** -7, atol=1e-6)


def test_linear_follows_autocast_and_its_gradients(emulate):
    """fp32 x and an fp32 adapter weight under bf16 autocast (how LoRA's A and B run): the
    operands are rounded to bf16 as autocast rounds them, the result and grads match torch's
    bf16 path in value and dtype."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 9, 48, generator=g)
    w0 = torch.randn(24, 48, generator=g) * 0.1
    dy = torch.randn(2, 9, 24, generator=g).to(BF16)

    def run(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=BF16):
            y = fn(x, w)
        y.backward(dy)
        return y, x.grad, w.grad

    ours = run(linear)
    assert type(ours[0].grad_fn).__name__ == "_Bf16LinearFp32Backward"
    ref = native(lambda: run(F.linear))
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-3)


def test_linear_is_f_linear_wherever_bf16_is_not_emulated(monkeypatch):
    """fp32, or a CPU with bf16: the call is F.linear itself, bit for bit, no extra node."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 32, generator=g), torch.randn(8, 32, generator=g)
    monkeypatch.setattr(cpu_bf16, "FORCE_NATIVE", False)
    assert torch.equal(linear(x, w), F.linear(x, w))  # fp32 never takes the fallback
    monkeypatch.setattr(cpu_bf16, "FORCE_NATIVE", True)
    xb, wb = x.to(BF16).requires_grad_(), w.to(BF16)
    y = linear(xb, wb)
    assert torch.equal(y, F.linear(xb, wb)) and "Bf16" not in type(y.grad_fn).__name__


def test_addmm_rounds_once_and_passes_gradients(emulate):
    g = torch.Generator().manual_seed(3)
    y0 = torch.randn(12, 20, generator=g).to(BF16)
    a0 = torch.randn(12, 4, generator=g).to(BF16)
    b0 = torch.randn(4, 20, generator=g).to(BF16)
    exact = (y0.double() + 0.5 * a0.double() @ b0.double()).to(BF16)

    def run():
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = y0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=BF16):  # as in lora_addmm: autocast must not undo it
            out = addmm_(y * 1, a, b, 0.5)  # y * 1: addmm_ works in place on a non-leaf
        out.backward(torch.ones_like(out))
        return out, a.grad, b.grad, y.grad

    ours = run()
    assert ulps(ours[0], exact).max() <= 1
    ref = native(run)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_torch_bf16(emulate, masked):
    """fp32 attention rounded to bf16 against torch's bf16 kernel (which rounds the softmax
    weights to bf16 too): values and q/k/v grads agree to a few bf16 steps."""
    g = torch.Generator().manual_seed(4)
    q0, k0, v0 = (torch.randn(2, 4, 10, 16, generator=g).to(BF16) for _ in range(3))
    kw = {"is_causal": True}
    if masked:
        mask = torch.full((10, 10), float("-inf")).triu(1)
        mask[:, 0] = float("-inf")  # no one attends to position 0
        mask[0, 0] = 0.0
        kw = {"attn_mask": mask.to(BF16)}

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        y = fn(q, k, v, **kw)
        y.backward(torch.ones_like(y))
        return y, q.grad, k.grad, v.grad

    ours = run(attention)
    assert ours[0].dtype == BF16
    ref = native(lambda: run(F.scaled_dot_product_attention))
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2 ** -6, atol=2e-2)


class GemmDtypes(TorchDispatchMode):
    """Records the input dtypes of every GEMM and attention op that reaches ATen."""

    OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_flash_attention_for_cpu_backward")

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
            self.seen.append((name, dtypes))
        return func(*args, **(kwargs or {}))


def tiny_model():
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=96,
                      max_seq_len=32)
    torch.manual_seed(0)
    model = Llama(cfg, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v"))).to(BF16)
    for m in model.modules():  # LoRA params stay fp32, as load_base leaves them
        if hasattr(m, "lora_b"):
            m.lora_a.data, m.lora_b.data = m.lora_a.float(), torch.randn_like(m.lora_b.float())
    mark_only_lora_trainable(model)
    return model


def loss_and_grads(model, ids, mask):
    with torch.autocast("cpu", dtype=BF16):
        loss, _ = causal_lm_loss(model, ids, mask)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_a_training_step_runs_every_gemm_in_fp32_and_matches_torch_bf16(emulate):
    """The whole model (base layers, LoRA, attention, the chunked LM-head loss and its
    gradient, padded and causal batches): with bf16 emulated no GEMM or attention op sees a
    bf16 operand, and loss and LoRA grads agree with torch's bf16 kernels."""
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # one padded row: the masked attention path
    with GemmDtypes() as rec:
        loss, grads = loss_and_grads(model, ids, mask)
    names = {n for n, _ in rec.seen}
    assert names & {"mm", "addmm"}  # the recorder saw the GEMMs
    assert all(BF16 not in dtypes for _, dtypes in rec.seen), rec.seen
    ref_loss, ref_grads = native(lambda: loss_and_grads(model, ids, mask))
    # bf16 noise through two layers: seen ≤ 1.1e-3 on the loss (~4.6), ≤ 1.4% on the grads
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=5e-3)
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).norm() / b.norm() < 0.03


def test_native_path_leaves_bf16_gemms_to_torch(monkeypatch):
    """A CPU with bf16: the model's products are torch's bf16 kernels (no fp32 copies)."""
    monkeypatch.setattr(cpu_bf16, "FORCE_NATIVE", True)
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(6))
    with GemmDtypes() as rec:
        loss_and_grads(model, ids, torch.ones_like(ids))
    assert any(BF16 in dtypes for n, dtypes in rec.seen if n in ("mm", "addmm"))
