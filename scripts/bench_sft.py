"""Throughput of sft.py: tokens/s and padding fraction, packed vs plainly padded batches (and TRL's SFTTrainer).

    python scripts/bench_sft.py                       # makes a tiny model and the toy data in a temp folder
    python scripts/bench_sft.py --steps 30 --batch_size 32 --work_dir /tmp/bench

Each case is a real `sft.py` run (`--max_steps`); numbers come from its log.jsonl, the first `--warmup`
steps left out: tokens/s counts real (non-padding) tokens per second of whole optimizer steps (data,
forward, backward, optimizer), padding fraction is padding slots / all slots. Attention is sft.py's
default, sdpa_packed (sdpa once per packed sequence), but in the "masked sdpa" case: transformers' sdpa
with its block-diagonal mask over each packed row. Cases:
  text CoT  : the tiny text model on toy OpenThoughts rows (the paper's stage-1 shape)
  image+text: the tiny VLM on toy chat rows, half of them with an image (the toy's stage 0)
With `trl` importable (e.g. `pip install --no-deps --target DIR trl` and `PYTHONPATH=DIR`), TRL's
SFTTrainer runs the text CoT case too: padded, and padding-free (the batch concatenated into one row).
Prints a table; `--json PATH` also writes the numbers. This is a benchmark, not a test.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def summarise(records: list[dict], warmup: int) -> dict:
    rows = records[warmup:] or records
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "padding_fraction": statistics.mean(r["padding_fraction"] for r in rows),
            "step_time_s": statistics.median(r["step_time_s"] for r in rows),
            "final_loss": records[-1]["loss"]}


def bench_sft(model, data, out, args, *extra) -> dict:
    run("sft.py", "--model_name_or_path", model, "--dataset", data, "--output_dir", out,
        "--max_steps", str(args.steps), "--per_device_batch_size", str(args.batch_size), "--limit", "2000",
        "--learning_rate", "1e-3", "--gradient_checkpointing", "false", "--save_steps", "0", "--freeze_vision_tower", "false",
        *extra)
    with open(os.path.join(out, "log.jsonl")) as f:
        return summarise([json.loads(line) for line in f], args.warmup)


def bench_trl(model_dir: str, data: str, args, padding_free: bool) -> dict:
    """TRL's SFTTrainer on the same rows (converted like sft.py does), loss on the completion only.
    padding_free: each batch's examples are concatenated into one row with per-example position ids (TRL's
    `packing=True` would instead fill rows of max_length, so a "batch" would no longer be batch_size examples)."""
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, ROOT)
    import sft
    rows, base = sft.load_rows(data)
    convs = [sft.row_to_conversation(r, base, False)[0] for r in rows[:2000]]
    ds = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    stats = {"tokens": [], "slots": [], "t": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.time()

        def on_step_end(self, a, state, control, **kw):
            stats["t"].append(time.time() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                           learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1000, save_strategy="no",
                           report_to=[], use_cpu=True, bf16=False, max_length=None if padding_free else 4096, completion_only_loss=True,
                           padding_free=padding_free, dataloader_num_workers=0, seed=0)
        trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tokenizer, callbacks=[Timer()])
        collate = trainer.data_collator

        def counting_collator(features):
            batch = collate(features)
            ids = batch["input_ids"]
            real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int((ids != tokenizer.pad_token_id).sum())
            stats["tokens"].append(real)
            stats["slots"].append(ids.numel())
            return batch
        trainer.data_collator = counting_collator
        trainer.train()
    # batches are collated just before their step; pair them in order
    w = args.warmup
    tps = [n / t for n, t in zip(stats["tokens"][w:], stats["t"][w:])]
    pad = [1 - n / s for n, s in zip(stats["tokens"][w:], stats["slots"][w:])]
    return {"tokens_per_s": statistics.median(tps), "padding_fraction": statistics.mean(pad),
            "step_time_s": statistics.median(stats["t"][w:]), "final_loss": float("nan")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="", help="where models, data and runs go (default: a temp folder)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the numbers")
    p.add_argument("--batch_size", type=int, default=32, help="examples per step (per_device_batch_size)")
    p.add_argument("--no_trl", action="store_true", help="skip TRL even when it is importable")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()

    work = args.work_dir or tempfile.mkdtemp(prefix="bench-sft-")
    vl, text, data = (os.path.join(work, d) for d in ("tiny-vl", "tiny-text", "toy"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same thread count for sft.py runs and TRL (in process)
    env = {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]}
    if not os.path.exists(os.path.join(vl, "config.json")):
        run("scripts/make_tiny_model.py", "--output_dir", vl, "--kind", "vl")
    if not os.path.exists(os.path.join(text, "config.json")):
        run("scripts/make_tiny_model.py", "--output_dir", text, "--kind", "text")
    if not os.path.exists(os.path.join(data, "sft", "openthoughts.jsonl")):
        run("scripts/make_toy_data.py", "--output_dir", data)
    cot, chat = os.path.join(data, "sft", "openthoughts.jsonl"), os.path.join(data, "sft", "messages.jsonl")

    results = {}
    cases = [("text CoT", text, cot), ("image+text", vl, chat)]
    for name, model, rows in cases:
        for mode, extra in [("padded", ["--packing", "false"]), ("packed", []),
                            ("packed, rows of 4096", ["--pack_length", "4096"]),
                            ("packed, rows of 4096, masked sdpa", ["--pack_length", "4096", "--attn_implementation", "sdpa"])]:
            out = os.path.join(work, "runs", f"{name}-{mode}".replace(" ", "_").replace(",", "").replace("+", "_"))
            shutil.rmtree(out, ignore_errors=True)
            print(f"sft.py {name} {mode} ...", flush=True)
            results[f"sft.py | {name} | {mode}"] = bench_sft(model, rows, out, args, *extra)
    if not args.no_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not importable: skipping the SFTTrainer comparison")
        else:
            for padding_free in (False, True):
                mode = "padding-free (one row)" if padding_free else "padded"
                print(f"TRL SFTTrainer text CoT {mode} ...", flush=True)
                try:
                    results[f"TRL {trl.__version__} | text CoT | {mode}"] = bench_trl(text, cot, args, padding_free)
                except Exception as e:  # a TRL version we do not know: report it, keep our numbers
                    print(f"TRL {mode} failed: {type(e).__name__}: {e}")

    print(f"\n{args.steps} steps x {args.batch_size} examples, median of steps {args.warmup + 1}..{args.steps}, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    print(f"{'case':<58} {'tokens/s':>10} {'padding':>8} {'s/step':>8} {'loss':>7}")
    for k, r in results.items():
        print(f"{k:<58} {r['tokens_per_s']:>10.0f} {r['padding_fraction']:>8.3f} {r['step_time_s']:>8.3f} {r['final_loss']:>7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
