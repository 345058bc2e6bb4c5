"""`ownllm explain`: why the model said what it said, token by token.

Where it sits: over inference (a greedy reply) and the model's own modules. For a prompt (as a
chat turn, or raw text) the model answers greedily; one more forward pass over prompt + reply,
collecting the residual stream between blocks, gives
- per reply token: its probability and the top alternatives the model weighed;
- the logit lens: the final norm and output head applied to the residual stream after every
  layer, read at each reply position (nostalgebraist 2020) — where in the stack the answer forms;
- attention: every layer's and head's attention weights from one chosen reply token back over
  the context (recomputed from the block's own q and k, RoPE and masks included).
Written as explain.json, PNGs and one self-contained HTML page (no script or font from a CDN).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import torch

from ownllm.errors import OwnLLMError
from ownllm.model import window_band


def _attention_probs(attn, x, cos, sin) -> torch.Tensor:
    """(B, heads, T, T) attention weights of `attn` (model.Attention) on its input x, no cache."""
    q, k, _ = attn._rope_qkv(x, cos, sin)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    T = x.shape[1]
    keep = window_band(0, T, T, attn.window or T, x.device)   # causal, and no further back than a window
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
    return scores.masked_fill(~keep, float("-inf")).softmax(-1)


@torch.no_grad()
def trace(model, ids: list[int]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One forward pass over `ids`: logits (T, vocab), the residual stream after each block
    [(T, dim)] and each layer's attention weights [(heads, T, T)], recomputed from the stream
    entering the layer (no hooks: safe beside a server's decoding thread)."""
    idx = torch.tensor([ids], device=model.device)
    stream: list[torch.Tensor] = []
    logits = model.lm_head(model.hidden_states(idx, collect=stream))[0].float()
    rope = model._rope(len(ids), None, 0)
    attention = [_attention_probs(block.self_attn, block.input_layernorm(stream[i]), *rope[i])[0]
                 for i, block in enumerate(model.layers)]
    return logits, [h[0] for h in stream[1:]], attention


PARTIAL = "…"   # a token holding the first bytes of a character that a later token completes


def _piece(tok, i: int) -> str:
    return tok.decode([i]).replace("\n", "⏎") or "∅"


@torch.no_grad()
def explain(run: str | Path, prompt: str, max_new_tokens: int = 24, top_k: int = 5, raw: bool = False,
            token: int = 0) -> dict:
    """Greedy reply to `prompt` (a user turn in the run's chat template; raw=True: text to
    continue) and why: per-token probabilities and alternatives, the logit lens, and the
    attention of reply token `token` (0: the first; negative counts from the end)."""
    from ownllm.inference import Engine, SamplingParams
    from ownllm.inference.generate import load_run

    model, tok = load_run(run)
    prompt_ids = (tok.encode(prompt) or [tok.bos_id]) if raw else tok.user_turn(prompt)
    ctx = model.config.max_seq_len
    if len(prompt_ids) + max_new_tokens > ctx:
        raise OwnLLMError(f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new exceeds the context of {ctx}")
    stops = (tok.eos_id, *tok.stop_ids)
    new = Engine(model, tok.pad_id).generate([prompt_ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0,
                                                                          stop_ids=stops))[0]
    if not new:
        raise OwnLLMError("the model produced no token to explain")
    return {"prompt": prompt, "raw": raw, **explain_ids(model, tok, prompt_ids, new, top_k, token)}


@torch.no_grad()
def explain_ids(model, tok, prompt_ids: list[int], new: list[int], top_k: int = 5, token: int = 0) -> dict:
    """Why `new` followed `prompt_ids` (sampled, greedy or written by anyone: it is read, not
    generated): each token's probability, rank and alternatives, the logit lens, and the attention
    of token `token` of `new`."""
    if not -len(new) <= token < len(new):
        raise OwnLLMError(f"--token {token}: the reply has {len(new)} tokens (0 … {len(new) - 1})")
    ids = prompt_ids + new
    logits, hidden, attention = trace(model, ids)
    n = len(prompt_ids)
    probs = logits[n - 1: len(ids) - 1].softmax(-1)         # position t predicts token t + 1
    decoder = tok.stream_decoder()   # a character split over tokens shows whole at its last token
    steps = []
    for j, t in enumerate(new):
        p, alt = probs[j].topk(top_k)
        steps.append({"token": decoder.push(t).replace("\n", "⏎") or PARTIAL, "piece": _piece(tok, t), "id": t, "prob": float(probs[j, t]), "rank": int((probs[j] > probs[j, t]).sum()) + 1,
                      "alternatives": [[_piece(tok, int(i)), float(q)] for q, i in zip(p, alt)]})
    lens = []
    for h in hidden[:-1]:
        lp = model.lm_head(model.norm(h[n - 1: len(ids) - 1])).float().softmax(-1)
        lens.append(_lens_row(tok, lp, new))
    lens.append(_lens_row(tok, probs, new))   # after the last block the lens is the model's own prediction
    token %= len(new)
    at = n - 1 + token    # the position whose output is reply token `token`
    stops = set(tok.stop_ids) | {tok.eos_id}
    return {"reply": tok.decode([t for t in new if t not in stops]),
            "context": [_piece(tok, i) for i in ids[: at + 1]], "n_prompt": n, "steps": steps, "lens": lens,
            "attention_token": token,
            "attention": [[[round(float(w), 5) for w in head[at, : at + 1]] for head in layer] for layer in attention]}


def _lens_row(tok, probs: torch.Tensor, new: list[int]) -> list[dict]:
    top_p, top_i = probs.max(-1)
    return [{"top": _piece(tok, int(i)), "top_prob": float(q), "chosen_prob": float(probs[j, new[j]])}
            for j, (q, i) in enumerate(zip(top_p, top_i))]


def write_explanation(res: dict, out: str | Path) -> dict:
    """explain.json, lens.png, attention.png and explain.html (the PNGs inlined) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding="utf-8")
    pngs = {"lens": _lens_png(res), "attention": _attention_png(res)}
    for name, data in pngs.items():
        (out / f"{name}.png").write_bytes(data)
    (out / "explain.html").write_text(render_html(res, pngs), encoding="utf-8")
    return {k: out / f"{k}.png" for k in pngs} | {"html": out / "explain.html", "json": out / "explain.json"}


CJK_FONTS = ("WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans CJK JP")


def _pyplot():
    import logging

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)   # (a CJK font's weights, at length)

    # Chinese tokens need a CJK font where one is installed (matplotlib's cache may predate it);
    # matplotlib falls back along the family list glyph by glyph
    have = {f.name for f in font_manager.fontManager.ttflist}
    if not have & set(CJK_FONTS):
        for path in font_manager.findSystemFonts():
            if any(k in path.lower() for k in ("wqy", "notosanscjk", "noto-cjk")):
                font_manager.fontManager.addfont(path)
        have = {f.name for f in font_manager.fontManager.ttflist}
    plt.rcParams["font.family"] = ["DejaVu Sans"] + [f for f in CJK_FONTS if f in have]
    return plt


def _heatmap(grid: list[list[float]], size: tuple[float, float], cmap: str, xlabels: list[str], xrot: int,
             yticks: tuple[list[int], list[str]], title: str, ylabel: str = "", origin: str = "upper") -> bytes:
    """A PNG of `grid` (values in [0, 1]) with labelled axes and a colour bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size, dpi=100)
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=1, origin=origin)
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=xrot, fontsize=8 if xrot < 90 else 7)
    ax.set_yticks(*yticks, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _lens_png(res: dict) -> bytes:
    grid = [[c["chosen_prob"] for c in layer] for layer in res["lens"]]
    labels = [s["token"] for s in res["steps"]]
    return _heatmap(grid, (max(6, 0.5 * len(labels) + 2), max(3, 0.3 * len(grid) + 1.5)), "viridis", labels, 60,
                    (list(range(len(grid))), [str(i + 1) for i in range(len(grid))]),
                    "logit lens: p(final token) after each layer", ylabel="after layer", origin="lower")


def _attention_png(res: dict) -> bytes:
    rows = [head for layer in res["attention"] for head in layer]
    heads, layers, ctx = len(res["attention"][0]), len(res["attention"]), res["context"]
    step = res["steps"][res["attention_token"]]
    return _heatmap(rows, (max(5, 0.28 * len(ctx) + 2), max(3, 0.18 * len(rows) + 1.5)), "magma", ctx, 90,
                    ([i * heads for i in range(layers)], [f"layer {i + 1}" for i in range(layers)]),
                    f"attention while writing reply token {res['attention_token']} ({step['token']!r}): one row per head")


def _shade(p: float) -> str:
    """Low probability red, high green."""
    return f"hsl({int(120 * p)}, 70%, 85%)"


def render_html(res: dict, pngs: dict[str, bytes]) -> str:
    e = html.escape
    toks = "".join(
        f'<span class="tok" style="background:{_shade(s["prob"])}" title="'
        + e(f"p = {s['prob']:.3f} (rank {s['rank']}); " + ", ".join(f"{a!r} {q:.3f}" for a, q in s["alternatives"]))
        + f'">{e(s["token"])}</span>' for s in res["steps"])
    step_rows = "".join(
        f"<tr><td>{j}</td><td class=mono>{e(s['token'])}</td><td>{s['prob']:.3f}</td><td>{s['rank']}</td><td>"
        + " ".join(f'<span class="alt mono">{e(a)} <small>{q:.3f}</small></span>' for a, q in s["alternatives"])
        + "</td></tr>" for j, s in enumerate(res["steps"]))
    lens_head = "".join(f"<th class=mono>{e(s['token'])}</th>" for s in res["steps"])
    lens_rows = "".join(
        f"<tr><th>{i + 1}</th>" + "".join(
            f'<td class="mono{" hit" if c["top"] == s["piece"] else ""}" style="background:{_shade(c["chosen_prob"])}" '
            f'title="top {c["top_prob"]:.3f}; chosen {c["chosen_prob"]:.3f}">{e(c["top"])}</td>'
            for c, s in zip(layer, res["steps"])) + "</tr>" for i, layer in enumerate(res["lens"]))
    step = res["steps"][res["attention_token"]]
    mean_last = [sum(col) / len(col) for col in zip(*res["attention"][-1])]
    top_ctx = sorted(range(len(mean_last)), key=lambda i: -mean_last[i])[:5]
    top_txt = ", ".join(f"<span class=mono>{e(res['context'][i])}</span> {mean_last[i]:.2f}" for i in top_ctx)
    img = {k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in pngs.items()}
    mode = "raw text continued" if res["raw"] else "a user turn in the run's chat template"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ownllm explain</title>
<style>
body {{ font: 15px/1.5 system-ui, "Noto Sans CJK SC", "WenQuanYi Zen Hei", sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em; color: #222; }}
.mono {{ font-family: ui-monospace, "DejaVu Sans Mono", "WenQuanYi Zen Hei Mono", monospace; white-space: pre; }}
.tok {{ font-family: ui-monospace, monospace; white-space: pre; padding: 1px 2px; margin: 1px; border-radius: 3px; display: inline-block; }}
table {{ border-collapse: collapse; margin: .5em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; }}
td.hit {{ font-weight: bold; }}
.alt {{ margin-right: .8em; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
.scroll {{ overflow-x: auto; }}
</style></head><body>
<h1>Why this reply</h1>
<p><b>Prompt</b> ({e(mode)}):</p><pre id="prompt">{e(res['prompt'])}</pre>
<p><b>Reply</b> (greedy), each token shaded by the probability the model gave it (hover for the alternatives;
{PARTIAL} marks a token holding the first bytes of a character the next token completes):</p>
<p id="reply">{toks}</p>
<h2>Token by token</h2>
<table id="steps"><tr><th>#</th><th>token</th><th>p</th><th>rank</th><th>top alternatives</th></tr>{step_rows}</table>
<h2>Logit lens</h2>
<p>The final norm and output head applied after every layer: the token that layer would predict (bold where it
is already the final choice), shaded by the probability it gives the final choice.</p>
<div class="scroll"><table id="lens"><tr><th>layer</th>{lens_head}</tr>{lens_rows}</table></div>
<img alt="logit lens" src="{img['lens']}">
<h2>Attention while writing token {res['attention_token']} (<span class="mono">{e(step['token'])}</span>)</h2>
<p>Last layer, mean over heads, most attended: {top_txt}.</p>
<img alt="attention" src="{img['attention']}">
</body></html>
"""
