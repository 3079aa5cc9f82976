"""Make the toy datasets: two-digit additions, in the shapes of the real datasets the scripts read.

    python scripts/make_toy_data.py --output_dir data/toy [--seed 0] [--n_train 2000]

Every file has the *real* dataset's shape, so the stage scripts run on it exactly as on the hub data:

    sft/openthoughts.jsonl     OpenThoughts-114k: system, conversations [{from: user}, {from: assistant}]
                               with <|begin_of_thought|> ... <|end_of_solution|> (text-only CoT: stage 1;
                               not verified: the teacher's slips are in, see below)
    sft/cot_messages.jsonl     the same text-only CoT rows as plain chat `messages` (the toy's stage 1)
    sft/direct_messages.jsonl  the same problems answered directly, no chain (the non-CoT ablation)
    sft/messages.jsonl         plain chat `messages` + `images` (paths relative to the file): the toy
                               "base VLM" lessons (stage 0): read the drawn problem, restate it, answer
    sft/images/*.png
    rl/orz_math.json           Orz-math-57k: a JSON list of pairs [{from: human, value}, {from: assistant,
                               ground_truth: {value}}] (text-only: stage 2)
    eval/gsm8k.jsonl           GSM8K: question, answer ending "#### N"
    eval/mmlu_pro.jsonl        MMLU-Pro: question, options (list), answer (letter), answer_index, category
    eval/mmmu_val.jsonl        MMMU: id, question with <image 1>, options (a *stringified* list), image_1..7
    eval/mathvista_testmini.jsonl  MathVista: pid, question, decoded_image, choices, answer (option text)...
    eval/medqa_4opt.jsonl      MedQA 4-option: question, options {A..D}, answer (text), answer_idx
    eval/toy_text.jsonl        the toy test set as text (GSM8K shape)
    eval/toy_image.jsonl       the same problems shown only as images (MathVista free_form shape)
    eval/images/*.png

A problem is "a + b" with two-digit a and b; its chain of thought adds digit by digit with carries,
which a ~2M-parameter model learns in minutes but cannot do reliably by answering directly. The stage-1
chains come from an imperfect teacher: in --slip_rate (0.3) of the problems with a carry it forgets to
carry the 1 into the tens, and its answer is 10 short. Fine-tuning imitates the slip (sampled, the model
forgets the carry about as often); a verifiable reward is what removes it (GRPO, or distill.py's
rejection sampling). --slip_rate 0 gives a perfect teacher.

Images are the problem drawn in DejaVu Sans Mono Bold on a 168x28 white canvas, one character per 28-px
cell: 6 image tokens for the tiny VLM, one per text token of "a + b".

--question_forms varied states each training question's problem in one of FORMS ("41 + 58", "forty-one plus
fifty-eight", "What is 41 plus 58?", "Add 58 to 41.", "Find the sum of 41 and 58."); the chains always restate
it as "41 + 58", and the test set always asks "41 + 58".

The split is by problem: every test problem (and its commuted twin, b + a) is kept out of all the
training files. Deterministic: the same seed writes byte-identical files.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys

from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rewards  # noqa: E402  (the answer format and prompts every stage shares)

IMAGE_SIZE = (168, 28)  # 12x2 patches of 14 px -> 6 image tokens after Qwen2.5-VL's 2x2 merge
FONT_SIZE = 22
# The toy questions. The text question carries the problem where the image question has its picture,
# so that one chain of thought ("restate the problem, then work it out") fits both modalities. The
# image question is MathVista-shaped; evaluate.py adds INTEGER_HINT to integer-answer MathVista items,
# so the text questions carry the same words and both modalities are asked exactly the same thing.
SOLVE = "Solve the problem."
INTEGER_HINT = "\n(Answer with an integer.)"
READ = "Read the problem."
# OpenThoughts-114k's system prompt starts like this (the paper's prompt format drops it).
OPENTHOUGHTS_SYSTEM = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic long "
    "thinking process before providing the final precise and accurate solutions. Please structure your "
    "response into two main sections: Thought and Solution."
)
MMMU_SUBJECTS = ["Math", "Math", "Clinical_Medicine", "Basic_Medical_Science"]  # health subsets too
LETTERS = "ABCDEFGHIJ"


# ----------------------------------------------------------------------------- problems

def problem_text(a: int, b: int) -> str:
    return f"{a} + {b}"


# --question_forms varied: training questions say the problem in one of these forms (the test set and
# every restatement use "a + b"), so the restatement is the only place the chain can always find its digits.
FORMS = ("digits", "words", "plus", "add_to", "sum_of")
_ONES = "zero one two three four five six seven eight nine".split()
_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """10..99 in English words: "forty-one", "sixty", "thirteen"."""
    if n < 20:
        return _TEENS[n - 10]
    return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")


def problem_form(a: int, b: int, form: str = "digits") -> str:
    """The problem as a question states it; the chain of thought always restates it as "a + b"."""
    return {"digits": problem_text(a, b), "words": f"{number_words(a)} plus {number_words(b)}",
            "plus": f"What is {a} plus {b}?", "add_to": f"Add {b} to {a}.",
            "sum_of": f"Find the sum of {a} and {b}."}[form]


def text_question(a: int, b: int, form: str = "digits") -> str:
    return f"{problem_form(a, b, form)}\n{SOLVE}{INTEGER_HINT}"


def chain_of_thought(a: int, b: int, slip: bool = False) -> str:
    """Restate the problem, then add column by column with carries: what stage 1 teaches.
    slip=True: the teacher forgets to carry the 1 into the tens (its answer is then wrong, by 10)."""
    lines = [problem_text(a, b)]
    ones = a % 10 + b % 10
    carry = ones // 10
    lines.append(f"Ones: {a % 10} + {b % 10} = {ones}" + (f", write {ones % 10} carry 1." if carry else "."))
    if slip:
        carry = 0
    tens = a // 10 + b // 10 + carry
    lines.append(f"Tens: {a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {tens}."
                 + (" Carry 1 to the hundreds." if tens >= 10 else ""))
    lines.append(f"So {problem_text(a, b)} = {teacher_answer(a, b, slip)}.")
    return "\n".join(lines)


def has_carry(a: int, b: int) -> bool:
    """The ones column carries into the tens (what the stage-1 teacher sometimes forgets)."""
    return a % 10 + b % 10 >= 10


def teacher_answer(a: int, b: int, slip: bool = False) -> int:
    """The answer the teacher's chain ends with: 10 short where it forgot a carry."""
    return a + b - 10 if slip and has_carry(a, b) else a + b


def misread(rng: random.Random, a: int, b: int, n_digits: int = 1) -> tuple[int, int]:
    """The problem with n_digits of its four digits read wrong (a tens digit stays 1-9)."""
    digits = [a // 10, a % 10, b // 10, b % 10]
    for k in rng.sample(range(4), n_digits):
        digits[k] = rng.choice([d for d in range(1 if k % 2 == 0 else 0, 10) if d != digits[k]])
    return digits[0] * 10 + digits[1], digits[2] * 10 + digits[3]


def direct_response(a: int, b: int) -> str:
    """The toy base model's answer: restate the problem (its whole "thinking"), then the sum."""
    return rewards.format_response(problem_text(a, b), str(a + b))


def distractors(rng: random.Random, answer: int, k: int) -> list[int]:
    """k distinct wrong answers near the right one (the usual slips: +-1, +-10, a lost carry)."""
    pool = sorted({answer + d for d in (-11, -10, -9, -2, -1, 1, 2, 9, 10, 11, 20, -20, 100)} - {answer})
    pool = [x for x in pool if x > 0]
    return rng.sample(pool, k)


def options_with_answer(rng: random.Random, answer: int, k: int) -> tuple[list[str], int]:
    """k option texts with the answer at a random position; returns (options, answer index)."""
    opts = distractors(rng, answer, k - 1)
    idx = rng.randrange(k)
    opts.insert(idx, answer)
    return [str(o) for o in opts], idx


# ----------------------------------------------------------------------------- images

def find_font():
    """DejaVu Sans Mono Bold (fc-match finds it; Debian/Ubuntu: apt-get install fonts-dejavu-core),
    else PIL's built-in font."""
    candidates = ["/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"]
    if shutil.which("fc-match"):
        try:
            out = subprocess.run(["fc-match", "-f", "%{file}", "DejaVu Sans Mono:bold"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            if "DejaVuSansMono-Bold" in out:
                candidates.insert(0, out)
        except (OSError, subprocess.SubprocessError):
            pass
    for path in candidates:
        if os.path.exists(path):
            return ImageFont.truetype(path, FONT_SIZE)
    print("warning: DejaVuSansMono-Bold.ttf not found; using PIL's default font", file=sys.stderr)
    return ImageFont.load_default(size=FONT_SIZE)


def draw(text: str, font) -> Image.Image:
    """The problem "a + b" in black on a white canvas, one character per 28-px cell ("4", "1", "+", blank,
    "5", "8"): the six cells are the six image tokens (14-px patches, 2x2 merge) and the six text tokens of
    "41 + 58" (digits are single tokens), so image token k shows what text token k says. Centred
    free-flowing text worked for reading too, but text-only fine-tuning then erased the reading within
    ~150 steps; with one character per token it survives (the model still restates the drawn problem)."""
    img = Image.new("RGB", IMAGE_SIZE, "white")
    d = ImageDraw.Draw(img)
    a, b = text.split(" + ")
    cell = IMAGE_SIZE[0] // 6
    for k, ch in enumerate([a[0], a[1], "+", "", b[0], b[1]]):
        if ch:
            left, top, right, bottom = d.textbbox((0, 0), ch, font=font)
            d.text((k * cell + (cell - (right - left)) // 2 - left, (IMAGE_SIZE[1] - (bottom - top)) // 2 - top),
                   ch, fill="black", font=font)
    return img


def save_image(img: Image.Image, folder: str, name: str) -> str:
    """Save under folder/images/ and return the path relative to folder (how the data files refer to it)."""
    rel = f"images/{name}.png"
    img.save(os.path.join(folder, rel), format="PNG", optimize=False)
    return rel


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- the files

def make_openthoughts(train, forms):
    rows = []
    for (a, b, slip, (ra, rb)), form in zip(train, forms):
        value = (f"<|begin_of_thought|>\n\n{chain_of_thought(ra, rb, slip)}\n\n<|end_of_thought|>\n\n"
                 f"<|begin_of_solution|>\n\n\\boxed{{{teacher_answer(ra, rb, slip)}}}\n\n<|end_of_solution|>")
        rows.append({"system": OPENTHOUGHTS_SYSTEM,
                     "conversations": [{"from": "user", "value": text_question(a, b, form)},
                                       {"from": "assistant", "value": value}]})
    return rows


def make_cot_messages(train, forms, direct=False):
    """Text-only CoT rows in the chat shape, asked as every toy stage asks: rewards.pose(question,
    template="plain"), the question alone (a ~2M-parameter model cannot find a problem behind the paper's
    ~100-token instructions; toy.sh passes --prompt_template plain to rl.py, evaluate.py and distill.py)."""
    return [{"messages": [{"role": "user", "content": rewards.pose(text_question(a, b, form), template="plain")},
                          {"role": "assistant", "content": rewards.format_response(
                              problem_text(ra, rb) if direct else chain_of_thought(ra, rb, slip),
                              str(teacher_answer(ra, rb, slip)))}]}
            for (a, b, slip, (ra, rb)), form in zip(train, forms)]


def image_question() -> str:
    """The image question: the picture stands exactly where the text question has the problem (MMMU's
    `<image 1>` placeholder, which evaluate.py honours), so both are one prompt with the problem given
    either as text tokens or as image tokens, at the same distance from the answer."""
    return f"<image 1>\n{SOLVE}{INTEGER_HINT}"


def parts(text: str) -> list[dict]:
    """A user turn as chat content parts, the image where its `<image 1>` placeholder is."""
    out = []
    for k, piece in enumerate(text.split("<image 1>")):
        if k:
            out.append({"type": "image"})
        if piece:
            out.append({"type": "text", "text": piece})
    return out


def make_base_messages(base, forms, sft_dir, font, rng):
    """Stage 0 lessons for the toy base VLM, in four kinds mixed evenly: image + "Read the problem." ->
    the transcript (twice: reading is the slow skill, and these rows are short); text question ->
    restate + answer; image question -> restate (read) + answer. Contents are lists of parts (the image
    sits inside the prompt), assistant turns included, so every row has the same JSON shape."""
    rows = []
    for i, ((a, b), form) in enumerate(zip(base, forms)):
        kind = i % 4
        if kind == 2:
            user, images, answer = rewards.pose(text_question(a, b, form), template="plain"), [], direct_response(a, b)
        else:
            images = [save_image(draw(problem_text(a, b), font), sft_dir, f"base_{i:05d}")]
            if kind == 3:
                user, answer = rewards.pose(image_question(), template="plain"), direct_response(a, b)
            else:
                user, answer = f"<image 1>\n{READ}", problem_text(a, b)
        rows.append({"messages": [{"role": "user", "content": parts(user)},
                                  {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                     "images": images})
    rng.shuffle(rows)
    return rows


def make_orz(train, forms):
    return [[{"from": "human", "value": text_question(a, b, form)},
             {"from": "assistant", "ground_truth": {"value": str(a + b)}}] for (a, b), form in zip(train, forms)]


def make_gsm8k(items):
    return [{"question": f"What is {problem_text(a, b)}?",
             "answer": f"{chain_of_thought(a, b)}\n#### {a + b}"} for a, b in items]


def make_toy_text(items):
    return [{"question": text_question(a, b), "answer": f"{chain_of_thought(a, b)}\n#### {a + b}"}
            for a, b in items]


def mathvista_row(pid, question, image, answer, choices=None):
    if choices is None:
        hint = "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end."
        query, qtype, atype = f"{hint}\nQuestion: {question}", "free_form", "integer"
    else:
        hint = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
        listed = "\n".join(f"({LETTERS[k]}) {c}" for k, c in enumerate(choices))
        query, qtype, atype = f"{hint}\nQuestion: {question}\nChoices:\n{listed}", "multi_choice", "text"
    return {"pid": str(pid), "question": question, "image": image, "decoded_image": image,
            "choices": choices, "unit": None, "precision": None, "answer": answer,
            "question_type": qtype, "answer_type": atype, "query": query,
            "metadata": {"category": "math-targeted-vqa", "context": "synthetic scene", "grade": "elementary school",
                         "language": "english", "skills": ["arithmetic reasoning"], "source": "toy",
                         "split": "testmini", "task": "math word problem"}}


def make_toy_image(items, eval_dir, font):
    # query == question: the toy test set asks exactly what the text set asks, the problem drawn instead.
    rows = []
    for i, (a, b) in enumerate(items):
        question = image_question().removesuffix(INTEGER_HINT)  # evaluate.py adds the hint back
        row = mathvista_row(f"toy{i}", question, save_image(draw(problem_text(a, b), font), eval_dir, f"toy_{i:04d}"),
                            str(a + b))
        row["query"] = question
        rows.append(row)
    return rows


def make_mathvista(items, eval_dir, font, rng):
    rows = []
    for i, (a, b) in enumerate(items):
        image = save_image(draw(problem_text(a, b), font), eval_dir, f"mathvista_{i:04d}")
        q = "What is the value of the expression in the image?"
        if i % 2 == 0:
            choices, idx = options_with_answer(rng, a + b, 4)
            rows.append(mathvista_row(i + 1, q, image, choices[idx], choices))  # gold = option TEXT
        else:
            rows.append(mathvista_row(i + 1, q, image, str(a + b)))
    return rows


def make_mmmu(items, eval_dir, font, rng):
    rows = []
    for i, (a, b) in enumerate(items):
        subject = MMMU_SUBJECTS[i % len(MMMU_SUBJECTS)]
        row = {"id": f"validation_{subject}_{i + 1}"}
        images = [save_image(draw(problem_text(a, b), font), eval_dir, f"mmmu_{i:04d}")]
        if i % 5 == 4:  # a few open questions, as in MMMU
            row.update(question="<image 1> What is the value of the expression?", options="[]",
                       answer=str(a + b), question_type="open")
        else:
            options, idx = options_with_answer(rng, a + b, 4)
            row.update(question="<image 1> Which value does the expression in the image equal?",
                       options=str(options),  # a stringified Python list, as in MMMU
                       answer=LETTERS[idx], question_type="multiple-choice")
        row.update({f"image_{k}": (images[k - 1] if k <= len(images) else None) for k in range(1, 8)})
        row.update(explanation="", img_type="['Diagrams']", topic_difficulty="Easy", subfield="Arithmetic")
        rows.append(row)
    return rows


def make_mmlu_pro(items, rng):
    rows = []
    for i, (a, b) in enumerate(items):
        health = i % 3 == 2
        q = (f"A patient drinks {a} mL of water and then {b} mL more. How many mL in total?" if health
             else f"What is {problem_text(a, b)}?")
        k = 10 if i % 4 else 4  # MMLU-Pro has up to 10 options, some fewer
        options, idx = options_with_answer(rng, a + b, k)
        rows.append({"question_id": i, "question": q, "options": options, "answer": LETTERS[idx],
                     "answer_index": idx, "cot_content": "", "category": "health" if health else "math",
                     "src": "toy"})
    return rows


def make_medqa(items, rng):
    rows = []
    for a, b in items:
        options, idx = options_with_answer(rng, a + b, 4)
        opts = {LETTERS[k]: f"{o} mg" for k, o in enumerate(options)}
        rows.append({"question": f"A patient receives {a} mg of a drug in the morning and {b} mg in the "
                                 "evening. What is the total daily dose?",
                     "answer": opts[LETTERS[idx]], "options": opts, "meta_info": "step1",
                     "answer_idx": LETTERS[idx], "metamap_phrases": ["patient", "drug", "daily dose"]})
    return rows


# ----------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=2000, help="text CoT rows (sft/openthoughts.jsonl, sft/cot_messages.jsonl)")
    parser.add_argument("--slip_rate", type=float, default=0.3,
                        help="fraction of the CoT rows with a carry in which the teacher forgets it (wrong answer)")
    parser.add_argument("--misread_rate", type=float, default=0.0,
                        help="fraction of the CoT rows whose teacher misreads one digit of the problem, then "
                             "solves what it restated")
    parser.add_argument("--misread_digits", type=int, default=1, choices=(1, 2, 3, 4),
                        help="digits a misreading gets wrong")
    parser.add_argument("--question_forms", choices=("digits", "varied"), default="digits",
                        help="training questions state the problem as digits only, or in one of FORMS per row "
                             "(the test set is always digits)")
    parser.add_argument("--n_base", type=int, default=1500, help="stage-0 rows (sft/messages.jsonl), 3/4 with images")
    parser.add_argument("--n_rl", type=int, default=1000, help="RL problems (rl/orz_math.json)")
    parser.add_argument("--n_test", type=int, default=200, help="toy_text / toy_image test problems")
    parser.add_argument("--n_bench", type=int, default=24, help="items per real-shaped benchmark file")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    out = args.output_dir
    for sub in ("sft/images", "rl", "eval/images"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    font = find_font()

    # Split by unordered pair: a test problem's commuted twin is not in training either.
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]
    rng.shuffle(pairs)
    n_test_pairs = args.n_test + 5 * args.n_bench
    if n_test_pairs >= len(pairs):
        sys.exit(f"--n_test + 5 * --n_bench must be below {len(pairs)}")
    test_pairs, train_pairs = pairs[:n_test_pairs], pairs[n_test_pairs:]
    orient = lambda ps: [(a, b) if rng.random() < 0.5 else (b, a) for a, b in ps]  # noqa: E731
    test = orient(test_pairs)
    train = [(a, b) for a, b in train_pairs] + [(b, a) for a, b in train_pairs if a != b]
    rng.shuffle(train)

    def take(n, offset):  # training problems, cycling if more are asked for than exist
        return [train[(offset + k) % len(train)] for k in range(n)]

    toy, bench = test[:args.n_test], test[args.n_test:]
    chunks = [bench[k * args.n_bench:(k + 1) * args.n_bench] for k in range(5)]

    sft_dir, eval_dir = os.path.join(out, "sft"), os.path.join(out, "eval")
    slip_rng = random.Random(args.seed + 1)
    read_rng = random.Random(args.seed + 3)  # its own stream: --misread_rate 0 leaves the rest unchanged
    cot = []
    for a, b in take(args.n_train, 0):
        read = (misread(read_rng, a, b, args.misread_digits) if args.misread_rate and read_rng.random() < args.misread_rate
                else (a, b))
        cot.append((a, b, has_carry(*read) and slip_rng.random() < args.slip_rate, read))
    form_rng = random.Random(args.seed + 2)  # its own stream: --question_forms digits leaves the rest unchanged
    forms = lambda n: [FORMS[form_rng.randrange(len(FORMS))] if args.question_forms == "varied" else "digits"  # noqa: E731
                       for _ in range(n)]
    cot_forms = forms(args.n_train)
    write_jsonl(os.path.join(sft_dir, "openthoughts.jsonl"), make_openthoughts(cot, cot_forms))
    write_jsonl(os.path.join(sft_dir, "cot_messages.jsonl"), make_cot_messages(cot, cot_forms))
    write_jsonl(os.path.join(sft_dir, "direct_messages.jsonl"), make_cot_messages(cot, cot_forms, direct=True))
    write_jsonl(os.path.join(sft_dir, "messages.jsonl"),
                make_base_messages(take(args.n_base, args.n_train), forms(args.n_base), sft_dir, font, rng))
    with open(os.path.join(out, "rl", "orz_math.json"), "w", encoding="utf-8") as f:
        json.dump(make_orz(take(args.n_rl, args.n_train + args.n_base), forms(args.n_rl)), f, ensure_ascii=False,
                  indent=1)
        f.write("\n")
    write_jsonl(os.path.join(eval_dir, "toy_text.jsonl"), make_toy_text(toy))
    write_jsonl(os.path.join(eval_dir, "toy_image.jsonl"), make_toy_image(toy, eval_dir, font))
    write_jsonl(os.path.join(eval_dir, "gsm8k.jsonl"), make_gsm8k(chunks[0]))
    write_jsonl(os.path.join(eval_dir, "mmlu_pro.jsonl"), make_mmlu_pro(chunks[1], rng))
    write_jsonl(os.path.join(eval_dir, "mmmu_val.jsonl"), make_mmmu(chunks[2], eval_dir, font, rng))
    write_jsonl(os.path.join(eval_dir, "mathvista_testmini.jsonl"), make_mathvista(chunks[3], eval_dir, font, rng))
    write_jsonl(os.path.join(eval_dir, "medqa_4opt.jsonl"), make_medqa(chunks[4], rng))
    print(f"wrote toy data to {out}: {args.n_train} CoT SFT rows, {args.n_base} base rows, {args.n_rl} RL "
          f"problems, {args.n_test} toy test problems (text + image), {args.n_bench} items per benchmark")


if __name__ == "__main__":
    main()
