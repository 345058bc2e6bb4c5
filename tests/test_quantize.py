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
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), x @ q.dequantized().T, rtol=1e-5, atol=1e-5)


def test_quantized_model_memory_and_logits(tiny_cfg):
    torch.manual_seed(0)
    model = randomize_(GPT(tiny_cfg), 0.05).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    ref = model(idx)
    before = linear_weight_bytes(model)
    assert quantize_int8(model) == tiny_cfg.n_layers * 7
    after = linear_weight_bytes(model)
    assert before / after > 3.5
    out = model(idx)
    assert (out - ref).abs().max() / ref.abs().max() < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
