"""Weight-only int8: 4x smaller linear weights, outputs close to fp32, used by the server."""
import torch

from ownllm.inference.quantize import Int8Linear, linear_weight_bytes, quantize_int8
from ownllm.model import GPT
from tests.conftest import randomize_


def test_int8_linear_is_close_and_per_channel():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight[3] *= 100  # one loud row must not cost the others their precision
    q = Int8Linear(lin, kernel="dequant")
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (48,)
    err = (q.dequantized() - lin.weight).abs().amax(dim=1)
    assert torch.all(err <= q.scale / 2 + 1e-7)  # rounding error at most half a step, per row
    x = torch.randn(16, 64)   # more rows than a decode step: the exact dequantising path (the kernel: below)
    torch.testing.assert_close(q(x), x @ q.dequantized().T, rtol=1e-5, atol=1e-5)


def test_quantized_model_memory_and_logits(tiny_cfg):
    torch.manual_seed(0)
    model = randomize_(GPT(tiny_cfg), 0.05).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    ref = model(idx)
    before = linear_weight_bytes(model)
    assert quantize_int8(model) == tiny_cfg.n_layers * 7 + 1   # and the output head
    after = linear_weight_bytes(model)
    assert before / after > 3.5
    out = model(idx)
    assert (out - ref).abs().max() / ref.abs().max() < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_int8_decode_kernel_where_it_is_safe(tiny_cfg):
    """The int8 kernel (bfloat16 activations) at decode-sized calls: within 1% of the dequantised
    product; never chosen for in-features it mishandles; many rows keep the exact path; a model
    using it decodes with the Engine (compiled step) like the dequantising path."""
    import ownllm.inference.quantize as qz
    from ownllm.inference.engine import Engine, SamplingParams

    assert not qz._pack_kernel_pays(torch.zeros(40, 24, dtype=torch.int8), torch.ones(40))   # 24 % 16: wrong sums
    assert not qz._pack_kernel_pays(torch.zeros(40, 30, dtype=torch.int8), torch.ones(40))   # 30: crashes the kernel
    torch.manual_seed(0)
    q = Int8Linear(torch.nn.Linear(64, 48), kernel="pack")   # forced: on any CPU with the op
    ref = lambda x: x @ q.dequantized().T + q.bias           # noqa: E731
    for rows in (1, 3, qz.PACK_ROWS):
        x = torch.randn(rows, 64)
        assert (q(x) - ref(x)).norm() < 0.01 * ref(x).norm()
    x = torch.randn(2, qz.PACK_ROWS, 64)                     # 16 rows: the dequantising path, exact
    torch.testing.assert_close(q(x), ref(x), rtol=1e-5, atol=1e-5)

    model = randomize_(GPT(tiny_cfg), 0.05).eval()
    quantize_int8(model)
    prompt = torch.randint(0, tiny_cfg.vocab_size, (12,)).tolist()
    params = SamplingParams(max_new_tokens=8, temperature=0)
    with torch.inference_mode():
        for m in model.modules():
            if isinstance(m, Int8Linear):
                m.set_kernel("dequant")
        exact = Engine(model, 0).generate([prompt], params)[0]
        for m in model.modules():
            if isinstance(m, Int8Linear):
                m.set_kernel("pack")
        packed = Engine(model, 0).generate([prompt], params)[0]
        compiled = Engine(model, 0, compile=True).generate([prompt], params)[0]   # the kernel inside a graph
    assert sum(a == b for a, b in zip(exact, packed)) >= 6   # bfloat16 activations may flip a near tie
    assert compiled == packed


def test_int8_fbgemm_kernel_close_at_every_row_count():
    """The x86 int8 GEMM (activations quantised per call): within 3% of the dequantised product for
    a decode step, a batch and a prefill, biases kept."""
    import ownllm.inference.quantize as qz

    if not qz._fbgemm():
        import pytest
        pytest.skip("no fbgemm in this PyTorch build")
    torch.manual_seed(0)
    q = Int8Linear(torch.nn.Linear(96, 40), kernel="fbgemm")
    for rows in (1, 8, 300):
        x = torch.randn(rows, 96)
        ref = x @ q.dequantized().T + q.bias
        assert (q(x) - ref).norm() < 0.03 * ref.norm()
    assert q(torch.randn(2, 3, 96)).shape == (2, 3, 40)


def test_int4_is_the_q4_1_layout_and_a_q4_1_model_comes_back_exactly(tiny_cfg):
    """int4: groups of 32 with a scale and a minimum, as GGUF Q4_1; error at most half a step per
    group; weights that already sit on such a grid (a model imported from a Q4_1 file)
    requantise exactly; a model quantised to int4 stays close and decodes."""
    from ownllm.inference.engine import Engine, SamplingParams
    from ownllm.inference.quantize import INT4_GROUP, Int4Linear, quantize

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int4Linear(lin)
    w = lin.weight.detach().view(48, 2, INT4_GROUP)
    step = (w.amax(-1) - w.amin(-1)) / 15
    err = (q.dequantized().view(48, 2, INT4_GROUP) - w).abs().amax(-1)
    assert torch.all(err <= step / 2 + 1e-6)
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), x @ q.dequantized().T + lin.bias, rtol=1e-4, atol=1e-4)
    xt = torch.randn(64, 5).t()                     # not contiguous (a batch's rows after a transpose)
    torch.testing.assert_close(q(xt), xt @ q.dequantized().T + lin.bias, rtol=1e-4, atol=1e-4)
    again = torch.nn.Linear(64, 48)
    with torch.no_grad():
        again.weight.copy_(q.dequantized())
    torch.testing.assert_close(Int4Linear(again).dequantized(), q.dequantized(), rtol=0, atol=1e-6)

    model = randomize_(GPT(tiny_cfg), 0.05).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    ref = model(idx)
    before = linear_weight_bytes(model)
    quantize(model, "int4")
    assert before / linear_weight_bytes(model) > 5      # 4.5 bits per weight against 32
    with torch.inference_mode():
        out = model(idx)
    assert (out - ref).norm() / ref.norm() < 0.3         # 4 bits of random weights: ~0.17 here; noise: ~1.4
    prompt = idx[0].tolist()
    assert len(Engine(model, 0).generate([prompt], SamplingParams(max_new_tokens=6, temperature=0))[0]) == 6
