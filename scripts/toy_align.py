"""Align the toy VLM's vision tower to its language model before stage 0 (ALIGN=1 in scripts/toy.sh).

    python scripts/toy_align.py --model runs/toy/random --dataset runs/toy/data/sft/messages.jsonl \\
        --output_dir runs/toy/aligned

A real base VLM's projector puts image tokens into the language model's embedding space (LLaVA trains the
projector alone for this before any instruction tuning): image tokens then sit where text tokens sit, at
the same scale. A tiny VLM that learns to read from scratch does not get that: its image tokens end up
~200x the norm of its text embeddings, in a region no text-only update ever visits. Here, with the language
model frozen, the vision tower and merger learn to map each drawn character's cell (one merged image token;
make_toy_data.draw puts one character per cell) to the input embedding of the text token it shows (MSE,
relative to the targets' mean square). Uses the images of stage 0's rows (data that stage 0 sees anyway);
the reading, answering and everything else are still learned in stage 0.
"""

import argparse
import json
import os
import random
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import open_image, vision_part  # noqa: E402

PROBLEM = re.compile(r"\b\d\d \+ \d\d\b")


def image_rows(path):
    """(image path, drawn problem) for every stage-0 row with an image; the assistant turn says the problem."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("images"):
                said = "".join(p.get("text", "") for p in row["messages"][-1]["content"])
                out.append((os.path.join(os.path.dirname(path), row["images"][0]), PROBLEM.search(said).group(0)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True, help="stage 0's messages.jsonl")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    rows = image_rows(args.dataset)
    embed = model.get_input_embeddings()
    params = [p for name, p in model.named_parameters() if vision_part(name)]  # the tower and the merger
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / args.steps))
    start = time.time()
    for step in range(args.steps):
        batch = rng.sample(rows, min(args.batch_size, len(rows)))
        pixels = processor.image_processor(images=[open_image(path) for path, _ in batch], return_tensors="pt")
        feats = torch.cat(model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output)
        ids = [processor.tokenizer(problem)["input_ids"] for _, problem in batch]
        target = embed(torch.tensor(sum(ids, []))).detach()
        if target.shape != feats.shape:
            sys.exit(f"{args.dataset}: {feats.shape[0]} image tokens for {target.shape[0]} text tokens; the toy's "
                     "images put one character per image token (make_toy_data.draw)")
        loss = (feats - target).pow(2).mean() / target.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: relative MSE {loss.item():.4f} (image-token norm {feats.norm(dim=-1).mean():.3f}, "
                  f"text-embedding norm {target.norm(dim=-1).mean():.3f}), {time.time() - start:.0f} s", flush=True)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
