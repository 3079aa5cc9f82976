"""The toy pipeline's random tiny VLM: scripts/make_tiny_model.py's Qwen2.5-VL, with a tokenizer that
also learned the project's prompts (rewards.py) and the toy's chains of thought.

    python scripts/toy_model.py --output_dir runs/toy/random

Why: on a CPU the cost of a step is its token count. With the generic 320-token vocabulary a toy question
and its chain of thought cost ~110 tokens; merges learned on these strings (and on the paper's prompts,
for runs with --prompt_template paper) cut that to ~80, so the whole toy pipeline fits its time budget.
Nothing else changes (same sizes and the same three settings that let the tiny VLM read its images).
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_tiny_model  # noqa: E402
import make_toy_data  # noqa: E402
import rewards  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=512)
    args = parser.parse_args()

    question = make_toy_data.text_question(37, 48)
    make_tiny_model.CORPUS += [
        rewards.train_prompt(question), rewards.math_prompt(question), rewards.mcq_prompt(question, ["85", "84"]),
        make_toy_data.chain_of_thought(37, 48), make_toy_data.chain_of_thought(76, 58),
        make_toy_data.SOLVE + make_toy_data.INTEGER_HINT, make_toy_data.READ,
        *(make_toy_data.problem_form(37, 48, form) for form in make_toy_data.FORMS),
        " ".join(make_toy_data.number_words(n) for n in range(10, 100)),
    ]
    build = make_tiny_model.build_tokenizer
    make_tiny_model.build_tokenizer = lambda vocab_size=args.vocab_size: build(vocab_size)
    os.makedirs(args.output_dir, exist_ok=True)
    make_tiny_model.make_vl(args.output_dir, args.seed)
    print(f"saved the toy's tiny VLM to {args.output_dir}")
