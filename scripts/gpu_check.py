"""The pieces of scripts/gpu_check.sh: a random-weight Qwen2.5-VL at the real 3B / 7B shapes, synthetic SFT and
RL data, a wrapper that runs sft.py / rl.py in-process and records GPU memory, and the report.

    python scripts/gpu_check.py model --size 7b --output_dir /tmp/gpu_check/model-7b
    python scripts/gpu_check.py data --output_dir /tmp/gpu_check/data
    python scripts/gpu_check.py run --name sft-7b --results results.jsonl --plan "--stage sft ..." -- sft.py --model_name_or_path ...
    python scripts/gpu_check.py report --results results.jsonl

Nothing is downloaded: the tokenizer and processor are scripts/make_tiny_model.py's (a small byte-level BPE
with Qwen's special tokens and chat template); the model has the real config (vocabulary 152064 / 151936
included) with random weights, so throughput and memory are the real model's, the text it writes is noise.
"""

import argparse
import json
import os
import random
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)
GiB = 2 ** 30
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "GH200": 989.0}


# ----------------------------------------------------------------------------------------------------
# model: the real config, random weights, made on the GPU (seconds) and saved in bf16


def make_model(size: str, output_dir: str, num_layers: int = 0, vision_depth: int = 0, device: str = "") -> None:
    import torch
    from make_tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer
    from memory_plan import PRESETS
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    raw = json.loads(json.dumps(PRESETS[f"qwen2.5-vl-{size}"]))
    # the tokenizer's own ids for the special tokens (the model's vocabulary stays the real one)
    raw.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
               image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
               vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
               vision_token_id=ids["<|vision_pad|>"])
    if num_layers:  # smoke tests on a CPU only
        raw["num_hidden_layers"] = raw["max_window_layers"] = num_layers
    if vision_depth:
        raw["vision_config"] = {**raw["vision_config"], "depth": vision_depth,
                                "fullatt_block_indexes": list(range(vision_depth))}
    config = Qwen2_5_VLConfig.from_dict(raw)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=262144, max_pixels=262144),  # the paper's 512x512
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"random Qwen2.5-VL-{size}: {n / 1e9:.3f}B parameters, saved to {output_dir} in {time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------------------------------
# data: text-only SFT rows of ~`tokens` tokens (chat `messages`), and RL question/answer rows

WORDS = ("First add the ones then the tens carry one so the answer is let me check the problem again "
         "which of the following is correct the patient presents with fever cough and a rash").split()


def make_data(output_dir: str, sft_rows: int, sft_tokens: int, rl_rows: int, seed: int = 0) -> None:
    from make_tiny_model import build_tokenizer

    tok = build_tokenizer()
    rng = random.Random(seed)
    os.makedirs(output_dir, exist_ok=True)

    def text(n_tokens: int) -> str:
        parts, n = [], 0
        while n < n_tokens:
            chunk = " ".join(rng.choice(WORDS) if rng.random() < 0.7 else str(rng.randint(0, 999)) for _ in range(64))
            parts.append(chunk)
            n += len(tok(chunk, add_special_tokens=False)["input_ids"])
        return " ".join(parts)

    with open(os.path.join(output_dir, "sft.jsonl"), "w") as f:
        for i in range(sft_rows):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            # the answer runs past max_length, so sft.py truncates every row to exactly max_length tokens
            messages = [{"role": "user", "content": f"What is {a} + {b}?"},
                        {"role": "assistant", "content": f"<think>{text(sft_tokens)}</think> <answer>{a + b}</answer>"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    rows = []
    for i in range(rl_rows):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    with open(os.path.join(output_dir, "rl.json"), "w") as f:
        json.dump(rows, f)
    print(f"wrote {sft_rows} SFT rows of >= {sft_tokens} tokens and {rl_rows} RL rows to {output_dir}")


# ----------------------------------------------------------------------------------------------------
# run: a stage script in this process, with its GPU memory recorded (rl.py: generation and the rest apart)


def plan_for(plan_args: str, gpu_gib: float) -> dict:
    """The planner's prediction, for one GPU without FSDP (how `python script.py` runs) and with FSDP2."""
    import memory_plan

    out = {}
    for fsdp in ("off", "on"):
        a = memory_plan.parse_args(plan_args.split() + ["--num_gpus", "1", "--gpu_memory_gib", str(gpu_gib),
                                                        "--fsdp", fsdp])
        r = memory_plan.plan(a)
        out[fsdp] = {name: ph["total_gib"] for name, ph in r["phases"].items()}
    return out


def run(name: str, results: str, plan_args: str, argv: list[str], no_save: bool = True) -> int:
    import torch

    script = argv[0]
    out_dir = argv[argv.index("--output_dir") + 1]
    cuda = torch.cuda.is_available()
    peaks = {"generate": 0, "other": 0}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:  # rl.py: the generation's peak apart from the training's
        import generation
        inner = generation.generate

        def generate(*a, **k):
            if cuda:
                peaks["other"] = max(peaks["other"], torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            try:
                return inner(*a, **k)
            finally:
                if cuda:
                    peaks["generate"] = max(peaks["generate"], torch.cuda.max_memory_allocated())
                    torch.cuda.reset_peak_memory_stats()
        generation.generate = generate
    except (ImportError, AttributeError):
        pass
    if no_save:  # a 7B's training state (fp32 weights + AdamW) is ~100 GB: more than the lent machine's disk
        import common
        for fn in ("save_checkpoint", "save_pretrained", "save_training_state"):
            if hasattr(common, fn):
                setattr(common, fn, lambda *a, **k: None)
    def killed(signum, frame):  # `timeout` stops a run that hangs: record it all the same
        raise TimeoutError("stopped by a timeout (SIGTERM)")

    signal.signal(signal.SIGTERM, killed)
    error, t0 = None, time.time()
    sys.argv = list(argv)
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        error = None if e.code in (0, None) else f"exit {e.code}"
    except BaseException as e:  # an OOM is a result too
        error = f"{type(e).__name__}: {str(e)[:300]}"
    wall = time.time() - t0
    rec = {"name": name, "script": script, "argv": argv[1:], "wall_s": wall, "error": error, "saving_skipped": no_save}
    if cuda:
        peaks["other"] = max(peaks["other"], torch.cuda.max_memory_allocated())
        props = torch.cuda.get_device_properties(0)
        rec.update(device=props.name, gpu_gib=props.total_memory / GiB,
                   max_allocated_gib=max(peaks.values()) / GiB, max_reserved_gib=torch.cuda.max_memory_reserved() / GiB)
        if peaks["generate"]:
            rec.update(generate_max_allocated_gib=peaks["generate"] / GiB, train_max_allocated_gib=peaks["other"] / GiB)
    try:
        rec["plan"] = plan_for(plan_args, round(rec.get("gpu_gib", 80.0), 1))
    except BaseException as e:  # the planner's flags may have moved on
        rec["plan_error"] = f"{type(e).__name__}: {e}"
    log = os.path.join(out_dir, "log.jsonl")
    if os.path.exists(log):
        with open(log) as f:
            rec["log"] = [json.loads(line) for line in f if line.strip()]
    rec["trainable_params"] = trainable_params(argv)
    with open(results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{name}: {'OK' if error is None else error} in {wall:.0f} s")
    return 0


def trainable_params(argv: list[str]) -> int:
    """Parameters trained with the vision tower frozen (the scripts' default), from the model's config."""
    import memory_plan

    model = argv[argv.index("--model_name_or_path") + 1]
    return memory_plan.count_parameters(memory_plan.load_config(model))["trainable"]


# ----------------------------------------------------------------------------------------------------
# report: tokens/s, MFU, measured peak next to the planner's


def report(results: str) -> None:
    with open(results) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    print(f"\n{'run':10s} {'status':>8s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>9s}  planner GiB (no FSDP | FSDP2 on 1 GPU)")
    for r in recs:
        log = r.get("log", [])
        steady = log[1:] or log  # the first step pays for warm-up
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in r.get("device", "")), None)
        if r["script"] == "sft.py":
            tps = sum(x["tokens_per_s"] for x in steady) / len(steady) if steady else None
        else:  # response tokens per second of the update (the reference pass included); prompts not counted
            tps = sum(x["train_tokens_per_s"] for x in steady) / len(steady) if steady else None
        mfu = 6 * r["trainable_params"] * tps / (peak * 1e12) if tps and peak else None
        status = "ok" if r["error"] is None else "FAILED"
        measured = f"{r['max_allocated_gib']:9.1f}" if "max_allocated_gib" in r else "        -"
        plan = r.get("plan", {})
        planned = " | ".join(", ".join(f"{k} {v:.1f}" for k, v in plan[m].items()) for m in ("off", "on")) if plan else r.get("plan_error", "-")
        print(f"{r['name']:10s} {status:>8s} {tps or 0:10.0f} {mfu or 0:6.1%} {measured}  {planned}")
        if "generate_max_allocated_gib" in r:
            print(f"{'':10s} measured: generate {r['generate_max_allocated_gib']:.1f}, training {r['train_max_allocated_gib']:.1f} GiB")
        if r["error"]:
            print(f"{'':10s} {r['error']}")
    print("\nMFU = 6 x trained parameters x tokens/s / peak bf16 FLOP/s (dense, attention not counted); rl.py's counts "
          "only response tokens and its time includes the reference pass. Peak = torch.cuda.max_memory_allocated.")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("--size", choices=["3b", "7b"], required=True)
    m.add_argument("--output_dir", required=True)
    m.add_argument("--num_layers", type=int, default=0, help="fewer decoder layers (CPU smoke tests only)")
    m.add_argument("--vision_depth", type=int, default=0, help="fewer vision blocks (CPU smoke tests only)")
    m.add_argument("--device", default="")
    d = sub.add_parser("data")
    d.add_argument("--output_dir", required=True)
    d.add_argument("--sft_rows", type=int, default=16)
    d.add_argument("--sft_tokens", type=int, default=4200)
    d.add_argument("--rl_rows", type=int, default=64)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True)
    r.add_argument("--results", required=True)
    r.add_argument("--plan", default="", help="memory_plan.py flags for the same run")
    r.add_argument("--save", action="store_true", help="let the script save its checkpoints (skipped by default)")
    r.add_argument("argv", nargs=argparse.REMAINDER, help="-- script.py and its flags")
    s = sub.add_parser("report")
    s.add_argument("--results", required=True)
    a = p.parse_args()
    if a.cmd == "model":
        make_model(a.size, a.output_dir, a.num_layers, a.vision_depth, a.device)
    elif a.cmd == "data":
        make_data(a.output_dir, a.sft_rows, a.sft_tokens, a.rl_rows)
    elif a.cmd == "run":
        argv = a.argv[1:] if a.argv and a.argv[0] == "--" else a.argv
        sys.exit(run(a.name, a.results, a.plan, argv, no_save=not a.save))
    else:
        report(a.results)


if __name__ == "__main__":
    main()
