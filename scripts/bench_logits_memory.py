"""Peak memory of the trainer's logprob pass with the LM head in one block vs in chunks (``trainer.logits_chunk_rows``),
side by side in one run, each configuration in a fresh process (its peak RSS is its own).

    .venv/bin/python scripts/bench_logits_memory.py [--model DIR] [--rows 16] [--prompt 64] [--response 48]
                                                    [--chunks 0 256 64]

One micro-batch of ``--rows`` sequences (``--prompt`` + ``--response`` tokens, random ids) through the model's
decoder, then the response positions through ``trainer.algorithms.head_logprobs_and_entropy`` (the trainer's
path), then a backward of the summed logprobs: peak RSS of the process, seconds of forward + backward, and the
largest logprob difference to the unchunked pass. Default model: SmolLM2-135M-Instruct (vocabulary 49,152, the
package's builtin). Writes docs/benchmarks/logits-memory.md (+ .json) with the machine described.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(model_dir: str, rows: int, prompt: int, response: int, chunk: int, out: str) -> None:
    """Run one configuration in this process and write its numbers to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.algorithms import head_logprobs_and_entropy

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (rows, prompt + response))
    mask = torch.zeros(rows, prompt + response - 1, dtype=torch.bool)
    mask[:, prompt - 1:] = True  # the positions that predict a response token
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]
    lp, _ = head_logprobs_and_entropy(hidden[mask], model.get_output_embeddings(), ids[:, 1:][mask], chunk_rows=chunk)
    lp.sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    Path(out).write_text(json.dumps({"chunk_rows": chunk, "peak_rss_gib": peak / 2**20, "model_rss_gib": base_rss / 2**20,
                                     "seconds": seconds, "logprobs": lp.detach().tolist(), "vocab": vocab,
                                     "response_tokens": int(mask.sum())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an HF model directory (default: builtin:smollm2-135m-instruct)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=48)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 256, 64])
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--one", nargs=2, metavar=("CHUNK", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from rl.tasks.pretrained import build_pretrained

        args.model = str(build_pretrained("builtin:smollm2-135m-instruct", log=lambda s: None))
    if args.one:
        one(args.model, args.rows, args.prompt, args.response, int(args.one[0]), args.one[1])
        return
    command = "python scripts/bench_logits_memory.py" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    results = []
    for chunk in args.chunks:
        tmp = Path(args.out) / f".logits-memory-{chunk}.json"
        subprocess.run([sys.executable, __file__, "--model", args.model, "--rows", str(args.rows), "--prompt", str(args.prompt),
                        "--response", str(args.response), "--one", str(chunk), str(tmp)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))})
        results.append(json.loads(tmp.read_text()))
        tmp.unlink()
    ref = results[0]["logprobs"]
    from rl.metrics import describe_machine

    lines = ["# LM head in chunks: peak memory of the trainer's logprob pass", "", f"Reproduce: `{command}`", "",
             f"Machine: {describe_machine()}. Model {args.model} (vocabulary {results[0]['vocab']:,}), float32; one micro-batch "
             f"of {args.rows} sequences x ({args.prompt} prompt + {args.response} response tokens) = "
             f"{results[0]['response_tokens']:,} response positions through the head; forward + backward.", "",
             "| trainer.logits_chunk_rows | peak RSS (GiB) | above the loaded model (GiB) | forward + backward (s) | "
             "max logprob difference to 0 |", "|---|---|---|---|---|"]
    for r in results:
        diff = max(abs(a - b) for a, b in zip(r["logprobs"], ref))
        lines.append(f"| {r['chunk_rows']} | {r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] - r['model_rss_gib']:.2f} | "
                     f"{r['seconds']:.1f} | {diff:.1e} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    (out / "logits-memory.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "logprobs"} for r in results], indent=1))
    (out / "logits-memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
