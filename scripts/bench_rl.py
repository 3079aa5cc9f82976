"""Seconds per GRPO step of rl.py, and its split (generation / scoring / training / weight sync), on a tiny
model and a toy adder dataset; optionally the same for TRL's GRPOTrainer with the same model, data and
settings (needs `trl` importable; nothing here installs it).

    python scripts/bench_rl.py                       # rl.py, hf backend, tiny text model
    python scripts/bench_rl.py --kind vl --steps 6   # the tiny Qwen2.5-VL
    python scripts/bench_rl.py --trl                 # also TRL's GRPOTrainer, and the ratio
    .venv-vllm/bin/python scripts/bench_rl.py --backend vllm   # rl.py with a vLLM engine

The first step (warm-up) is left out of the means. Numbers depend on the machine and its load: compare
runs made back to back.
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
           "--beta", str(args.beta)]
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
          f"mean response {mean['response_length_mean']:.1f} tokens; whole run {wall:.1f} s")
    return mean["time_step"]


def bench_trl(args, model, data, out):
    """TRL's GRPOTrainer on the same model and data: same prompt, reward, group size, lengths, loss."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, ROOT)
    import rewards

    with open(data) as f:
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
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.prompts_per_step * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=args.max_response_length,
        temperature=1.0, learning_rate=3e-6, beta=args.beta, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False,
        gradient_checkpointing=False,  # rl.py does not checkpoint either
        seed=0)
    tok = AutoTokenizer.from_pretrained(model)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=config,
                          reward_funcs=accuracy, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    mean = sum(times[1:]) / len(times[1:])
    print(f"TRL GRPOTrainer: {mean:.2f} s/step")
    return mean


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
    p.add_argument("--trl", action="store_true", help="also time TRL's GRPOTrainer (text models)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "model")
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_model.py"), "--output_dir", model,
                            "--kind", args.kind], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data = os.path.join(tmp, "adder.json")
        adder_data(data)
        print(f"{args.steps} steps of {args.prompts_per_step} prompts x {args.num_generations} completions, "
              f"<= {args.max_response_length} tokens, beta {args.beta}; means over steps 2..{args.steps}")
        ours = bench_rl(args, model, data, os.path.join(tmp, "rl"))
        if args.trl:
            theirs = bench_trl(args, model, data, os.path.join(tmp, "trl"))
            print(f"TRL / rl.py time per step: {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
