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
    q = Int8Linear(lin)
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
    q = Int8Linear(torch.nn.Linear(64, 48))
    q.use_pack, q.scale_bf16 = True, q.scale.bfloat16()     # forced: on any CPU with the op
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
                m.use_pack = False
        exact = Engine(model, 0).generate([prompt], params)[0]
        for m in model.modules():
            if isinstance(m, Int8Linear):
                m.use_pack, m.scale_bf16 = True, m.scale.bfloat16()
        packed = Engine(model, 0).generate([prompt], params)[0]
        compiled = Engine(model, 0, compile=True).generate([prompt], params)[0]   # the kernel inside a graph
    assert sum(a == b for a, b in zip(exact, packed)) >= 6   # bfloat16 activations may flip a near tie
    assert compiled == packed
