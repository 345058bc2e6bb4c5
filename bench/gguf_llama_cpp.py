"""Does llama.cpp run our GGUF export like the run itself? Tokens, logits, greedy reply.

    python bench/gguf_llama_cpp.py --run runs/quickstart/sft [--dtype float16]

Exports the run to a temporary GGUF file, loads it with llama.cpp through `llama-cpp-python`
(not a project dependency: `pip install llama-cpp-python`, which compiles llama.cpp, ~10 min on 2
cores), and compares with the run: token ids of English, Chinese, digits and a rendered chat
prompt with special tokens; logits over that chat prompt; the greedy reply. Ends with
`RESULT tokens_equal=… max_logit_diff=… argmax_agreement=… same_reply=…`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ownllm.inference.generate import greedy_texts, load_run  # noqa: E402
from ownllm.interop.gguf import export_gguf  # noqa: E402

TEXTS = ["What is 48 + 27?", "把 305 写成中文数字。 Sort: 7 2 9 4, 12345 apples!",
         "ROMEO:\nO, she doth teach the torches to burn bright!"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/quickstart/sft")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--question", default="What is 48 + 27?")
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python); nothing to compare", file=sys.stderr)
        return 2
    model, tok = load_run(args.run)
    ids = tok.render([{"role": "user", "content": args.question}], add_generation_prompt=True).ids
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.gguf"
        export_gguf(args.run, path, dtype=args.dtype)
        llm = Llama(model_path=str(path), n_ctx=model.config.max_seq_len, logits_all=True, verbose=False, n_threads=2)
        texts = TEXTS + [tok.decode(ids)]
        same_tokens = [llm.tokenize(t.encode(), add_bos=False, special=True) == tok.encode(t) for t in texts]
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        reply = []
        llm.reset()
        for t in llm.generate(ids, temp=0.0, top_k=1):
            if t in (tok.end_id, tok.eos_id) or len(reply) >= 32:
                break
            reply.append(t)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].float().numpy()
    ours_reply = greedy_texts(model, tok, [ids], 32)[0]
    diff = float(np.abs(theirs - ours).max())
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    print(f"{'text':<60} tokens equal")
    for t, same in zip(texts, same_tokens):
        print(f"{t[:58]!r:<60} {same}")
    print(f"logits over the chat prompt ({len(ids)} positions, {args.dtype} GGUF): max |diff| {diff:.5f}, "
          f"argmax agreement {agree:.3f}")
    print(f"greedy reply: llama.cpp {tok.decode(reply)!r}, ownllm {ours_reply!r}")
    print(f"RESULT tokens_equal={int(all(same_tokens))} max_logit_diff={diff:.5f} argmax_agreement={agree:.3f} "
          f"same_reply={int(tok.decode(reply) == ours_reply)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
