"""Probe how a toy model reasons: does its chain of thought work from its own restatement of the problem?

    python scripts/toy_probe.py --model runs/toy/sft --data_dir runs/toy/data/eval [--limit 100]

On held-out problems, asked as text and as images (greedy, the toy's plain prompt):
- accuracy:  the final answer is right;
- restated:  the thinking starts with the right problem ("<think>\\n41 + 58"; for an image: it read it);
- follows:   the counterfactual. The response is prefilled with "<think>\\n" + a *different* problem B;
             the fraction whose answer is B's sum. A chain that reads its operands from its restatement
             follows it (high); one that reads them from the question ignores it (low). Only a chain that
             follows its restatement can work on an image once the image is read;
- given restated: the response is prefilled with the *right* restatement; the fraction answered right
             (can the chain finish, in this modality, from a correct start?);
- OCR (images): transcribes the drawn problem when asked "Read the problem." (is reading still there?).
Prints one JSON object, {"text": {...}, "image": {...}}; toy_report.py calls probe() for each stage.
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_toy_data import READ, image_question, parts, problem_text, text_question  # noqa: E402

ANSWER = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")
PROBLEM = re.compile(r"\b(\d\d) \+ (\d\d)\b")


def read_problems(data_dir, limit):
    """(a, b) of the first `limit` toy test problems, and their images (toy_image row i draws row i)."""
    from PIL import Image

    with open(os.path.join(data_dir, "toy_text.jsonl"), encoding="utf-8") as f:
        problems = [tuple(int(x) for x in PROBLEM.search(json.loads(line)["question"]).groups())
                    for line in f if line.strip()][:limit]
    with open(os.path.join(data_dir, "toy_image.jsonl"), encoding="utf-8") as f:
        images = [Image.open(os.path.join(data_dir, json.loads(line)["decoded_image"])).convert("RGB")
                  for line, _ in zip(f, problems)]
    return problems, images


def answer(text):
    m = ANSWER.search(text)
    return int(m.group(1)) if m else None


def ask(engine, problems, images, modality, user, prefills, max_new_tokens=160):
    """Greedy completions of one chat prompt per problem (user(problem) is the question), each response
    prefilled with prefills[i]; the problem's image goes with it when modality is "image"."""
    from generation import chat_prompt, generate

    jobs = [{"prompt": chat_prompt(engine.processor, [{"role": "user", "content": parts(user(p))}]) + prefill,
             "images": [img] if modality == "image" else []} for p, img, prefill in zip(problems, images, prefills)]
    return [o[0].text for o in generate(engine, jobs, n=1, temperature=0, max_new_tokens=max_new_tokens)]


def probe(model_dir, data_dir, limit=100, engine=None):
    """The mechanism columns for one model, text and image (see the module docstring)."""
    import rewards
    from generation import load_engine

    engine = engine or load_engine(model_dir, backend="hf")
    problems, images = read_problems(data_dir, limit)
    n = len(problems)
    # the counterfactual problem for item i: the next item's, skipping one with the same sum
    other = [next(problems[(i + k) % n] for k in range(1, n) if sum(problems[(i + k) % n]) != sum(p))
             for i, p in enumerate(problems)]
    question = {"text": lambda p: rewards.pose(text_question(*p), template="plain"),
                "image": lambda p: rewards.pose(image_question(), template="plain")}
    out = {}
    for modality in ("text", "image"):
        free, given, swapped = (ask(engine, problems, images, modality, question[modality], prefills)
                                for prefills in ([""] * n, [f"<think>\n{problem_text(*p)}\n" for p in problems],
                                                 [f"<think>\n{problem_text(*q)}\n" for q in other]))
        out[modality] = {
            "accuracy": sum(answer(r) == sum(p) for r, p in zip(free, problems)) / n,
            "restated": sum(r.lstrip().startswith(f"<think>\n{problem_text(*p)}") for r, p in zip(free, problems)) / n,
            "follows": sum(answer(r) == sum(q) for r, q in zip(swapped, other)) / n,
            "ignores": sum(answer(r) == sum(p) for r, p in zip(swapped, problems)) / n,
            "given_restated": sum(answer(r) == sum(p) for r, p in zip(given, problems)) / n}
    read = ask(engine, problems, images, "image", lambda p: f"<image 1>\n{READ}", [""] * n, max_new_tokens=12)
    out["image"]["ocr"] = sum(r.strip() == problem_text(*p) for r, p in zip(read, problems)) / n
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_dir", required=True, help="the toy data's eval/ folder")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(probe(args.model, args.data_dir, args.limit)))
