"""Throughput of rewards.accuracy_reward on mixed math + multiple-choice items, next to a plain loop of
Math-Verify calls (parse gold, parse completion, verify) on the same items.

    python scripts/bench_rewards.py                    # 10,000 items, like 1,250 RL prompts x 8 rollouts
    python scripts/bench_rewards.py --n 2000 --baseline_n 500

The items look like RL rollouts: a <think> block of a few hundred words, then <answer>...</answer>
(sometimes \\boxed{} or "Answer: X", sometimes nothing); golds repeat across a prompt's rollouts; about
half the answers are right. Mix: integers, fractions/decimals, sets/equations/intervals (these need
sympy), other LaTeX expressions, multiple choice.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402

WORDS = "so we add the numbers then subtract and check the result carefully again wait".split()


def thinking(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 600)))


def wrap(rng, answer):
    style = rng.random()
    think = f"<think>\n{thinking(rng)}\n</think>\n"
    if style < 0.75:
        return think + f"<answer>{answer}</answer>"
    if style < 0.85:
        return think + f"The result is $\\boxed{{{answer}}}$."
    if style < 0.92:
        return think + f"**Answer:** {answer}"
    return f"<think>\n{thinking(rng)} {thinking(rng)}"  # cut while thinking: no answer


def make_items(n, rollouts, seed):
    """Returns completions, golds, options (None for math items)."""
    rng = random.Random(seed)
    comps, golds, opts = [], [], []
    while len(comps) < n:
        kind = rng.random()
        if kind < 0.5:  # integer answers (GSM8K / most of Orz-math)
            g = str(rng.randint(0, 5000))
            right = [g, f"{int(g):,}", f"{g}.0", f"x = {g}"]
            wrong = [str(int(g) + rng.randint(1, 50)), str(-int(g) - 1)]
            opt = None
        elif kind < 0.7:  # fractions and decimals
            a, b = rng.randint(1, 40), rng.randint(2, 41)
            g = f"\\frac{{{a}}}{{{b}}}"
            right = [g, f"{a}/{b}", f"\\dfrac{{{a}}}{{{b}}}", f"{a / b:.8f}"]
            wrong = [f"\\frac{{{a + 1}}}{{{b}}}", f"{b}/{a}" if a != b else "0"]
            opt = None
        elif kind < 0.75:  # sets, equations, intervals: these need sympy (Math-Verify in the workers)
            k = rng.randint(2, 30)
            g = rng.choice([f"\\{{{k},{k + 1},{k + 2}\\}}", f"y={k}x+1", f"[{k},{k + 1})"])
            right = {f"\\{{{k},{k + 1},{k + 2}\\}}": [f"\\{{{k + 2},{k},{k + 1}\\}}"], f"y={k}x+1": [f"y=1+{k}x"],
                     f"[{k},{k + 1})": [f"[{k}, {k + 1})"]}[g]
            wrong = [f"\\{{{k},{k + 1}\\}}", f"y={k + 1}x+1", f"({k},{k + 1}]"]
            opt = None
        elif kind < 0.85:  # LaTeX expressions (decided without sympy when they evaluate to numbers)
            k = rng.randint(2, 30)
            g = rng.choice([f"{k}\\sqrt{{2}}", f"{k}\\pi", f"x^2+{k}x", f"\\sqrt{{{k * k * 3}}}", f"({k},{k + 1})"])
            right = {f"{k}\\sqrt{{2}}": [f"\\sqrt{{{2 * k * k}}}", f"{k}\\sqrt2"],
                     f"{k}\\pi": [f"\\pi {k}", f"{k}\\pi"],
                     f"x^2+{k}x": [f"x(x+{k})", f"{k}x+x^2"], f"\\sqrt{{{k * k * 3}}}": [f"{k}\\sqrt{{3}}"],
                     f"({k},{k + 1})": [f"({k}, {k + 1})"]}[g]
            wrong = [f"{k + 1}\\sqrt{{3}}", f"x^2+{k + 1}", f"({k + 1},{k})"]
            opt = None
        else:  # multiple choice, 4-10 options
            m = rng.randint(4, 10)
            opt = [f"option text {i} {rng.choice(WORDS)}" for i in range(m)]
            gi = rng.randrange(m)
            g = "ABCDEFGHIJ"[gi]
            right = [g, f"{g}: {opt[gi]}", f"({g})", opt[gi]]
            wrong = ["ABCDEFGHIJ"[(gi + 1) % m], "A ribosome"]
        for _ in range(rollouts):
            comps.append(wrap(rng, rng.choice(right if rng.random() < 0.5 else wrong)))
            golds.append(g)
            opts.append(opt)
    return comps[:n], golds[:n], opts[:n]


def plain_math_verify(comps, golds, opts):
    """What a simple harness does: Math-Verify on every item, one by one, in this process."""
    from math_verify import parse, verify
    out = []
    for c, g, o in zip(comps, golds, opts):
        gp = parse(f"${g}$" if o is None else g, parsing_timeout=None)
        pp = parse(c, parsing_timeout=None)
        out.append(float(bool(gp) and bool(pp) and verify(gp, pp, timeout_seconds=None)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="items")
    ap.add_argument("--rollouts", type=int, default=8, help="completions per gold (RL's group size)")
    ap.add_argument("--baseline_n", type=int, default=None, help="items for the Math-Verify loop (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    comps, golds, opts = make_items(args.n, args.rollouts, args.seed)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.n} items ({sum(o is None for o in opts)} math, {sum(o is not None for o in opts)} multiple choice), "
          f"{cores} cores")

    rewards.get_pool()  # start-up is part of neither number: it happens once per run
    t = time.perf_counter()
    scores = rewards.accuracy_reward(comps, golds, opts)
    dt = time.perf_counter() - t
    slow = len(rewards._CACHE)
    print(f"rewards.accuracy_reward   : {args.n / dt:9.0f} items/s  ({dt:.2f} s; {slow} distinct items needed "
          f"Math-Verify; mean reward {sum(s for s in scores if s is not None) / len(scores):.3f})")
    rewards._CACHE.clear()
    t = time.perf_counter()
    rewards.accuracy_reward(comps[:1024], golds[:1024], opts[:1024])
    dt = time.perf_counter() - t
    print(f"  one RL step (1024 items): {dt * 1000:7.0f} ms")
    rewards._CACHE.clear()
    t = time.perf_counter()
    rewards.accuracy_reward(comps, golds, opts, lenient=True)
    dt = time.perf_counter() - t
    print(f"  lenient=True (evaluate.py): {args.n / dt:7.0f} items/s  ({dt:.2f} s)")

    # Items the fast path leaves to Math-Verify (rearranged equations, a set against a tuple, e^x...):
    # the worker pool's own throughput.
    hard_p = [f"y-{k}=2x" for k in range(100)] + [f"({k},{k + 1})" for k in range(100)] + [f"e^{k}" for k in range(100)]
    hard_g = [f"y=2x+{k}" for k in range(100)] + [f"\\{{{k},{k + 1}\\}}" for k in range(100)] + \
        [f"e^{{{k + k % 2}}}" for k in range(100)]
    rewards._CACHE.clear()
    t = time.perf_counter()
    got = rewards.accuracy_reward([f"<answer>{p}</answer>" for p in hard_p], hard_g)
    dt = time.perf_counter() - t
    print(f"  {len(hard_p)} items only Math-Verify can decide: {len(hard_p) / dt:6.0f} items/s "
          f"({rewards.get_pool().n} worker processes; mean reward {sum(got) / len(got):.2f})")

    nb = args.baseline_n or args.n
    t = time.perf_counter()
    base = plain_math_verify(comps[:nb], golds[:nb], opts[:nb])
    dt = time.perf_counter() - t
    agree = sum(a == b for a, b in zip(base, scores)) / nb
    print(f"plain Math-Verify loop    : {nb / dt:9.0f} items/s  ({dt:.2f} s on {nb} items; "
          f"agrees with accuracy_reward on {agree:.1%}: it reads letters as symbols and thinking as answers)")
    rewards.close()


if __name__ == "__main__":
    main()
