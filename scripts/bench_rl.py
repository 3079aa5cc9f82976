"""Seconds per GRPO step of rl.py, and its split (generation / scoring / training / weight sync), on a tiny
model and a toy adder dataset; optionally TRL's GRPOTrainer with the same model, data and settings, and
the whole-process time (start to exit) of both.

    python scripts/bench_rl.py                       # rl.py, hf backend, tiny text model
    python scripts/bench_rl.py --kind vl --steps 6   # the tiny Qwen2.5-VL
    # rl.py against TRL at the issue's setting: 20 steps of 4 prompts x 4 completions x 32 tokens
    OMP_NUM_THREADS=1 python scripts/bench_rl.py --kind vl --steps 20 --prompts_per_step 4 \
        --num_generations 4 --max_response_length 32 --trl --trl_python /path/to/trl-venv/bin/python
    .venv-vllm/bin/python scripts/bench_rl.py --backend vllm   # rl.py with a vLLM engine

Both run as separate processes with the same model, data, prompt, reward, group size, lengths, loss
(DAPO token mean, clip-higher), beta, and without gradient checkpointing unless asked; rl.py saves
no intermediate checkpoint. TRL runs in whatever Python --trl_python names (a venv with `trl`; it may
pin another transformers), so nothing here installs it. The first step (warm-up) is left out of the
per-step means. Numbers depend on the machine and its load (printed before and after): compare runs
made back to back, and use --reps to alternate the two.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def adder_data(path, k=10):
    pairs = [[{"from": "human", "value": f"What is {a} + {b}?"}, {"from": "assistant", "ground_truth": {"value": str(a + b)}}]
             for a in range(k) for b in range(k)]
    with open(path, "w") as f:
        json.dump(pairs, f)


def bench_rl(args, model, data, out):
    cmd = [sys.executable, os.path.join(ROOT, "rl.py"), "--backend", args.backend, "--model_name_or_path", model,
           "--dataset", data, "--output_dir", out, "--max_steps", str(args.steps), "--prompts_per_step",
           str(args.prompts_per_step), "--num_generations", str(args.num_generations), "--max_response_length",
           str(args.max_response_length), "--micro_batch_size", str(args.micro_batch_size), "--save_steps", "0",
           "--beta", str(args.beta), "--gradient_checkpointing", str(args.gradient_checkpointing)]
    if args.backend == "vllm":
        cmd += ["--vllm_kv_cache_memory_bytes", str(256 << 20)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f][1:]  # drop the warm-up step
    mean = {k: sum(r[k] for r in log) / len(log) for k in
            ("time_step", "time_generate", "time_score", "time_train", "time_sync", "gen_tokens_per_s",
             "train_tokens_per_s", "response_length_mean")}
    print(f"rl.py ({args.backend}): {mean['time_step']:.2f} s/step = generate {mean['time_generate']:.2f} + score "
          f"{mean['time_score']:.2f} + train {mean['time_train']:.2f} + sync {mean['time_sync']:.2f} (+ rest); "
          f"{mean['gen_tokens_per_s']:.0f} gen tok/s, {mean['train_tokens_per_s']:.0f} train tok/s, "
          f"mean response {mean['response_length_mean']:.1f} tokens; whole process {wall:.1f} s")
    return wall


def bench_trl(args, model, data, out):
    """TRL's GRPOTrainer in its own process (--trl_python): the whole-process time."""
    cmd = [args.trl_python, os.path.abspath(__file__), "--trl_worker", "--model", model, "--data", data, "--out", out,
           "--steps", str(args.steps), "--prompts_per_step", str(args.prompts_per_step), "--num_generations",
           str(args.num_generations), "--max_response_length", str(args.max_response_length), "--beta",
           str(args.beta), "--gradient_checkpointing", str(args.gradient_checkpointing)]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode:
        raise SystemExit(f"TRL failed ({args.trl_python}):\n{res.stderr[-3000:]}")
    print(res.stdout.strip().splitlines()[-1] + f"; whole process {wall:.1f} s")
    return wall


def trl_worker(args):
    """Runs under TRL's Python: the same prompt, reward, group size, lengths and loss as rl.py."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, ROOT)
    import rewards

    with open(args.data) as f:
        pairs = json.load(f)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": rewards.train_prompt(q["value"])}],
                             "gold": a["ground_truth"]["value"]} for q, a in pairs])

    def accuracy(completions, gold, **_):
        return [r or 0.0 for r in rewards.accuracy_reward([c[0]["content"] for c in completions], gold)]

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.time()

        def on_step_end(self, *a, **k):
            times.append(time.time() - self.t0)

    G = args.num_generations
    config = GRPOConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.prompts_per_step * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=args.max_response_length,
        temperature=1.0, learning_rate=3e-6, weight_decay=1e-2, warmup_steps=0.1, lr_scheduler_type="constant_with_warmup",
        beta=args.beta, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False,
        gradient_checkpointing=args.gradient_checkpointing == "True", model_init_kwargs={"dtype": torch.float32},
        seed=0)
    # a path: TRL picks the class (AutoModelForImageTextToText for the VL model) and the processor itself
    trainer = GRPOTrainer(model=args.model, args=config, reward_funcs=accuracy, train_dataset=ds,
                          callbacks=[Timer()])
    trainer.train()
    mean = sum(times[1:]) / max(len(times) - 1, 1)
    print(f"TRL GRPOTrainer: {mean:.2f} s/step")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--kind", default="text", choices=["text", "vl"], help="tiny model made by make_tiny_model.py")
    p.add_argument("--model", default=None, help="a model folder instead of a fresh tiny one")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts_per_step", type=int, default=8)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--max_response_length", type=int, default=64)
    p.add_argument("--micro_batch_size", type=int, default=16)
    p.add_argument("--beta", type=float, default=1e-2)
    p.add_argument("--gradient_checkpointing", default="False", choices=["True", "False"],
                   help="on both sides (rl.py's default is True; recompute only costs time on a tiny model)")
    p.add_argument("--trl", action="store_true", help="also time TRL's GRPOTrainer, whole process")
    p.add_argument("--trl_python", default=sys.executable, help="a Python that can import trl")
    p.add_argument("--reps", type=int, default=1, help="runs of each, alternating (rl.py first on odd reps)")
    p.add_argument("--trl_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "model")
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_model.py"), "--output_dir", model,
                            "--kind", args.kind], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data = os.path.join(tmp, "adder.json")
        adder_data(data)
        print(f"{args.steps} steps of {args.prompts_per_step} prompts x {args.num_generations} completions, "
              f"<= {args.max_response_length} tokens, beta {args.beta}, gradient checkpointing "
              f"{args.gradient_checkpointing}, {args.kind} model; means over steps 2..{args.steps}")
        print("load average before: %.2f %.2f %.2f" % os.getloadavg())
        walls = {"rl": [], "trl": []}
        for rep in range(args.reps):
            order = ["rl", "trl"] if args.trl else ["rl"]
            for who in order if rep % 2 == 0 else order[::-1]:
                bench = bench_rl if who == "rl" else bench_trl
                walls[who].append(bench(args, model, data, os.path.join(tmp, f"{who}{rep}")))
        print("load average after: %.2f %.2f %.2f" % os.getloadavg())
        if args.trl:
            ours, theirs = min(walls["rl"]), min(walls["trl"])
            print(f"whole process, best of {args.reps}: rl.py {ours:.1f} s, TRL {theirs:.1f} s, "
                  f"rl.py / TRL = {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
