"""Peak host memory per token of whole sft.py and rl.py processes at Qwen's vocabulary (152,064), on the CPU.

    python scripts/bench_peak_memory.py                      # this checkout
    python scripts/bench_peak_memory.py --compare OLD_DIR    # and another checkout of the project, side by side

The model is the tiny text model (hidden 64, 2 layers) with its vocabulary widened to 152,064, so the
LM head, logits, log-softmax, entropy and the generation-time scores weigh what they weigh at the 7B's
vocabulary while the rest stays small. Each configuration runs in a fresh process (`/usr/bin/time -f %M`
reads its peak resident memory); each stage runs at two sizes and the slope (MB per token) is what grows
with the tokens:
  sft.py: one optimizer step over B sequences of L tokens (loss + backward); tokens = B x L.
  rl.py --backend hf: one GRPO step, P prompts x G completions of R tokens (generation with log-probs,
          reference and policy log-probs, entropy, backward; a random model never stops early, so every
          completion is R tokens); tokens = P x G x R.
The issue's bar: at most 0.3 MB per token for both (the full-vocabulary code paths: ~1.8 and ~3).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 152064


def make_model(out):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_model.py"), "--output_dir", out,
                    "--kind", "text"], check=True, capture_output=True)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    config.vocab_size = VOCAB
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)


def make_data(tmp, length):
    """SFT rows whose assistant turn is ~length tokens (every digit is a token); RL questions."""
    sft = os.path.join(tmp, f"sft-{length}.jsonl")
    with open(sft, "w") as f:
        for i in range(8):
            answer = " ".join(str((i * 7 + k) % 10) for k in range(length // 2))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Count {i}."},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    rl = os.path.join(tmp, "rl.json")
    with open(rl, "w") as f:
        json.dump([{"question": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(8)], f)
    return sft, rl


def peak_mb(cmd, cwd):
    """Peak resident memory (MB) of `cmd`, run in a fresh process."""
    proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stderr.splitlines() if x.startswith("PEAK_KB")][-1]
    return int(line.split()[1]) / 1024


def new_flags(repo):
    """Flag names differ between versions of the scripts: pick what this checkout's rl.py knows."""
    src = open(os.path.join(repo, "rl.py")).read()
    return {"packing": "micro_batch_tokens" in src}


def run(repo, model, tmp, args):
    flags = new_flags(repo)
    out = {}
    sft_points = []
    for length in args.sft_lengths:
        data, _ = make_data(tmp, length)
        cmd = [sys.executable, "sft.py", "--model_name_or_path", model, "--dataset", data,
               "--output_dir", os.path.join(tmp, f"sft-out-{os.path.basename(repo)}-{length}"), "--max_steps", "1",
               "--per_device_batch_size", str(args.sft_batch), "--max_length", str(length + 64),
               "--gradient_checkpointing", "False", "--save_steps", "0", "--packing", "False"]
        tokens = args.sft_batch * length
        sft_points.append((tokens, peak_mb(cmd, repo)))
    out["sft"] = sft_points
    rl_points = []
    _, rl_data = make_data(tmp, 16)
    for R in args.rl_lengths:
        cmd = [sys.executable, "rl.py", "--backend", "hf", "--model_name_or_path", model, "--dataset", rl_data,
               "--output_dir", os.path.join(tmp, f"rl-out-{os.path.basename(repo)}-{R}"), "--max_steps", "1",
               "--prompts_per_step", str(args.rl_prompts), "--num_generations", str(args.rl_generations),
               "--max_response_length", str(R), "--save_steps", "0", "--beta", "0.01",
               "--gradient_checkpointing", "False", "--generation_batch_size", "64"]
        n = args.rl_prompts * args.rl_generations
        # the whole step in one forward/backward: what grows with the tokens shows in full
        cmd += ["--micro_batch_tokens", str(n * (R + 64))] if flags["packing"] else ["--micro_batch_size", str(n)]
        rl_points.append((n * R, peak_mb(cmd, repo)))
    out["rl"] = rl_points
    return out


def slope(points):
    (t0, m0), (t1, m1) = points[0], points[-1]
    return (m1 - m0) / (t1 - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", default=None, help="another checkout of the project (e.g. a git worktree)")
    p.add_argument("--sft_batch", type=int, default=2)
    p.add_argument("--sft_lengths", type=int, nargs=2, default=[512, 2048])
    p.add_argument("--rl_prompts", type=int, default=2)
    p.add_argument("--rl_generations", type=int, default=2)
    p.add_argument("--rl_lengths", type=int, nargs=2, default=[128, 512])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        make_model(model)
        repos = [("this checkout", ROOT)] + ([("--compare", os.path.abspath(args.compare))] if args.compare else [])
        for name, repo in repos:
            res = run(repo, model, tmp, args)
            for stage in ("sft", "rl"):
                pts = res[stage]
                print(f"{name:14s} {stage}.py: peak RSS " + ", ".join(f"{m:.0f} MB at {t} tokens" for t, m in pts)
                      + f" -> {slope(pts):.3f} MB per token", flush=True)


if __name__ == "__main__":
    main()
