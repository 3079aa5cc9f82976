"""Tiny copies of every benchmark evaluate.py knows, each in its real dataset's shape (fields, stringified
options, image fields as paths / {"bytes"} dicts / PIL via save_to_disk), with images drawn by PIL.

    write_fixtures(DIR)   # DIR/<benchmark>.jsonl|.json|.parquet|/ and DIR/images/*.png
"""

import io
import json
import os

from PIL import Image, ImageDraw


def draw(text: str, size=(84, 28)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((2, 8), text, fill="black")
    return img


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_fixtures(root: str) -> str:
    os.makedirs(os.path.join(root, "images"), exist_ok=True)

    def image(name, text, size=(84, 28)):  # a PNG under root/images, referenced by relative path
        draw(text, size).save(os.path.join(root, "images", name))
        return f"images/{name}"

    # openai/gsm8k main/test
    write_jsonl(f"{root}/gsm8k.jsonl", [
        {"question": "Tom has 37 apples and buys 48 more. How many?", "answer": "37 + 48 = <<37+48=85>>85\n#### 85"},
        {"question": "A shop sells 1,000 pens a day for 7 days and 72 more. Total?",
         "answer": "1000*7 = 7000, 7000 + 72 = 7072\n#### 7,072"},
        {"question": "What is 9 - 4?", "answer": "9 - 4 = 5\n#### 5"},
    ])

    # TIGER-Lab/MMLU-Pro test, as Parquet (the hub's own format); options padded with "N/A"
    import pyarrow as pa
    import pyarrow.parquet as pq
    mmlu = [
        {"question_id": 70, "question": "Which organ pumps blood?", "options": ["Liver", "Heart", "Lung", "N/A"],
         "answer": "B", "answer_index": 1, "cot_content": "", "category": "health", "src": "ori_mmlu-anatomy"},
        {"question_id": 71, "question": "Which vitamin comes from sunlight?",
         "options": ["Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K", "Vitamin E"],
         "answer": "C", "answer_index": 2, "cot_content": "", "category": "health", "src": "ori_mmlu-nutrition"},
        {"question_id": 72, "question": "What is 2 + 3?", "options": ["4", "5", "6", "7", "8", "9", "10", "11", "12", "13"],
         "answer": "B", "answer_index": 1, "cot_content": "", "category": "math", "src": "ori_mmlu-math"},
    ]
    pq.write_table(pa.Table.from_pylist(mmlu), f"{root}/mmlu_pro.parquet")

    # MMMU/MMMU validation: `<image k>` placeholders (also inside options), stringified options
    none_images = {f"image_{k}": None for k in range(1, 8)}
    write_jsonl(f"{root}/mmmu_val.jsonl", [
        {**none_images, "id": "validation_Clinical_Medicine_1",
         "question": "<image 1> Which finding is shown?", "options": "['Fracture', 'Normal', '<image 2>']",
         "explanation": "", "image_1": image("mmmu1a.png", "xray"), "image_2": image("mmmu1b.png", "opt C"),
         "img_type": "['X-Ray']", "answer": "A", "topic_difficulty": "Easy", "question_type": "multiple-choice",
         "subfield": "Radiology"},
        {**none_images, "id": "validation_Math_2", "question": "Compute the area of <image 1>.", "options": "[]",
         "explanation": "", "image_1": image("mmmu2.png", "4x6"), "img_type": "['Diagrams']",
         "answer": "['24', '24.0']", "topic_difficulty": "Medium", "question_type": "open", "subfield": "Geometry"},
        {**none_images, "id": "validation_Pharmacy_3",
         "question": "Compare <image 1> and <image 2>: which drug is stronger?", "options": "['Left', 'Right']",
         "explanation": "", "image_1": image("mmmu3a.png", "drug L"), "image_2": image("mmmu3b.png", "drug R"),
         "img_type": "['Tables']", "answer": "B", "topic_difficulty": "Hard", "question_type": "multiple-choice",
         "subfield": "Pharmacology"},
    ])

    # MMMU/MMMU_Pro "standard (10 options)" test, as a save_to_disk folder with an Image feature
    import datasets
    feats = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                               "options": datasets.Value("string"), "explanation": datasets.Value("string"),
                               **{f"image_{k}": datasets.Image() for k in range(1, 8)},
                               "img_type": datasets.Value("string"), "answer": datasets.Value("string"),
                               "topic_difficulty": datasets.Value("string"), "subject": datasets.Value("string")})
    pro = [{"id": "test_Pharmacy_10", "question": "<image 1> Which dose is safe?",
            "options": str([f"{d} mg" for d in range(10, 110, 10)]), "explanation": "",
            "image_1": draw("dose"), **{f"image_{k}": None for k in range(2, 8)}, "img_type": "['Tables']",
            "answer": "D", "topic_difficulty": "Easy", "subject": "Pharmacy"},
           {"id": "test_History_11", "question": "Who is on <image 1>?",
            "options": str([f"Person {i}" for i in range(10)]), "explanation": "",
            "image_1": draw("portrait"), **{f"image_{k}": None for k in range(2, 8)}, "img_type": "['Photos']",
            "answer": "J", "topic_difficulty": "Hard", "subject": "History"},
           # 7 images, mentioned 35 times (question and options): each goes into the prompt once
           {"id": "test_Art_12", "question": "Which panel continues " + " ".join(f"<image {k}>" for k in range(1, 8)) + "?",
            "options": str([" ".join(f"<image {(i + j) % 7 + 1}>" for j in range(3 if i < 8 else 2)) + f" (set {i})"
                            for i in range(10)]),
            "explanation": "", **{f"image_{k}": draw(f"panel {k}") for k in range(1, 8)}, "img_type": "['Paintings']",
            "answer": "C", "topic_difficulty": "Hard", "subject": "Art"}]
    datasets.Dataset.from_list(pro, features=feats).save_to_disk(f"{root}/mmmu_pro_standard")

    # MMMU/MMMU_Pro vision test: the question is in the image
    write_jsonl(f"{root}/mmmu_pro_vision.jsonl", [
        {"id": "test_Physics_5", "image": image("pro_vision.png", "Q: 1+1? A:2 B:3", (112, 28)),
         "options": "['2', '3']", "answer": "A", "subject": "Physics"}])

    # Lin-Chen/MMStar val: options inline in the question
    write_jsonl(f"{root}/mmstar.jsonl", [
        {"index": 0, "question": "Which shape is drawn?\nOptions: A: circle, B: square, C: a triangle, D: star",
         "image": image("mmstar0.png", "square"), "answer": "B", "category": "coarse perception",
         "l2_category": "image style & quality", "meta_info": {"source": "MMBench"}},
        # the MathVista-sourced rows (about a quarter): a hint, then "(A) 40.7" lines; here only 3 options
        {"index": 1, "question": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, "
         "D, at the end.\nQuestion: What is the value of the smallest bar?\nChoices:\n(A) 40.7\n(B) 41.2\n(C) 43.5",
         "image": image("mmstar1.png", "bars"), "answer": "A", "category": "math", "l2_category": "numeric commonsense",
         "meta_info": {"source": "MathVista"}},
        {"index": 2, "question": "Which object is the tallest?\nA. the tree\nB. the house\nC. the tower\nD. the man",
         "image": image("mmstar2.png", "tower"), "answer": "C", "category": "fine-grained perception",
         "l2_category": "object counting", "meta_info": {"source": "SEEDBench"}}])

    # AI4Math/MathVista testmini, as Parquet with decoded_image as {"bytes", "path"}
    mv = [{"pid": "1", "question": "Which bar is the tallest?", "image": "images/1.jpg",
           "decoded_image": {"bytes": png_bytes(draw("bars")), "path": None}, "choices": ["red", "green", "blue"],
           "unit": None, "precision": None, "answer": "green", "question_type": "multi_choice", "answer_type": "text",
           "query": "Hint: ...", "metadata": {"source": "FigureQA"}},
          {"pid": "2", "question": "What is the value of x?", "image": "images/2.jpg",
           "decoded_image": {"bytes": png_bytes(draw("x = 12")), "path": None}, "choices": None, "unit": None,
           "precision": None, "answer": "12", "question_type": "free_form", "answer_type": "integer",
           "query": "Hint: ...", "metadata": {"source": "Geometry3K"}},
          {"pid": "3", "question": "What is the slope?", "image": "images/3.jpg",
           "decoded_image": {"bytes": png_bytes(draw("1.25")), "path": None}, "choices": None, "unit": None,
           "precision": 2.0, "answer": "1.25", "question_type": "free_form", "answer_type": "float",
           "query": "Hint: ...", "metadata": {"source": "FunctionQA"}}]
    pq.write_table(pa.Table.from_pylist(mv), f"{root}/mathvista_testmini.parquet")

    # MathLLMs/MathVision test: `<image1>` placeholder, options [] for open questions
    write_jsonl(f"{root}/mathvision.jsonl", [
        {"id": "1", "question": "<image1>\nHow many dots?", "options": ["1", "2", "3", "4", "5"],
         "image": image("mv1.png", ". . ."), "answer": "C", "solution": None, "level": 1, "subject": "counting"},
        {"id": "2", "question": "What is the perimeter of the square in <image1>?", "options": [],
         "image": image("mv2.png", "side 3"), "answer": "12", "solution": None, "level": 2, "subject": "metric geometry"}])

    # MedQA (US, 5 options) in bigbio's source shape, and GBaker/MedQA-USMLE-4-options
    write_jsonl(f"{root}/medqa.jsonl", [
        {"meta_info": "step1", "question": "Which nerve is injured?", "answer_idx": "E", "answer": "Radial",
         "options": [{"key": k, "value": v} for k, v in zip("ABCDE", ["Ulnar", "Median", "Axillary", "Sciatic", "Radial"])]}])
    write_jsonl(f"{root}/medqa_4opt.jsonl", [
        {"question": "First-line drug for type 2 diabetes?", "answer": "Metformin",
         "options": {"A": "Insulin", "B": "Metformin", "C": "Aspirin", "D": "Warfarin"}, "meta_info": "step2&3",
         "answer_idx": "B", "metamap_phrases": ["drug"]}])

    # TsinghuaC3I/MedXpertQA MM / Text: options repeated inside the question, images as file names
    draw("ct scan").save(f"{root}/images/MM-7-a.jpeg")
    write_jsonl(f"{root}/medxpertqa_mm.jsonl", [
        {"id": "MM-7", "question": "A 45-year-old man has chest pain. What is shown?\nAnswer Choices: (A) Pneumonia "
         "(B) Effusion (C) Pneumothorax (D) Normal (E) Mass", "options": dict(zip("ABCDE", ["Pneumonia", "Effusion",
         "Pneumothorax", "Normal", "Mass"])), "label": "C", "images": ["MM-7-a.jpeg"], "medical_task": "Diagnosis",
         "body_system": "Respiratory", "question_type": "Reasoning"}])
    write_jsonl(f"{root}/medxpertqa_text.jsonl", [
        {"id": "Text-3", "question": "Best next step?\nAnswer Choices: " + " ".join(f"({L}) step {L}" for L in "ABCDEFGHIJ"),
         "options": {L: f"step {L}" for L in "ABCDEFGHIJ"}, "label": "H", "medical_task": "Treatment",
         "body_system": "Cardiovascular", "question_type": "Reasoning"}])

    # OmniMedVQA (QA_information/Open-access/*.json rows): gold is the option text
    with open(f"{root}/omnimedvqa.json", "w") as f:
        json.dump([{"dataset": "ACRIMA", "question_id": "ACRIMA_0001", "question_type": "Disease Diagnosis",
                    "question": "Is there glaucoma in this fundus image?", "option_A": "No", "option_B": "Yes",
                    "gt_answer": "Yes", "image_path": image("omni.png", "fundus"), "modality_type": "Fundus Photography"}], f)

    # NEJM Image Challenge (community dumps): option_A..E, letter answer; most dumps carry no image column,
    # the image is served by date (IC20230112.jpg): found with --nejm_image_dir, else the item is skipped
    os.makedirs(f"{root}/nejm_images", exist_ok=True)
    draw("lesion").save(f"{root}/nejm_images/IC20230112.jpg")
    with open(f"{root}/nejm.json", "w") as f:
        json.dump([{"id": "20230105", "question": "What is the diagnosis?", **{f"option_{L}": f"Disease {L}" for L in "ABCDE"},
                    "correct_answer": "D", "image": image("nejm.png", "rash")},
                   {"date": "20230112", "question": "What is the most likely diagnosis?",
                    **{f"option_{L}": f"Condition {L}" for L in "ABCDE"}, "correct_answer": "B"},
                   {"date": "20230119", "question": "What is this finding?",
                    **{f"option_{L}": f"Finding {L}" for L in "ABCDE"}, "correct_answer": "A"}], f)

    # HuggingFaceH4/MATH-500 and Idavidrein/gpqa (gpqa_diamond)
    write_jsonl(f"{root}/math500.jsonl", [
        {"problem": "What is $\\frac{2}{4}$ in lowest terms?", "solution": "...", "answer": "\\frac{1}{2}",
         "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}])
    write_jsonl(f"{root}/gpqa_diamond.jsonl", [
        {"Question": "Which particle is a lepton?", "Correct Answer": "Electron", "Incorrect Answer 1": "Proton",
         "Incorrect Answer 2": "Neutron", "Incorrect Answer 3": "Pion", "Record ID": "rec06pnAkLOr2t2mp"}])

    # The toy benchmarks (scripts/make_toy_data.py): GSM8K-shaped text, MathVista-shaped images
    write_jsonl(f"{root}/toy_text.jsonl", [{"question": "What is 12 + 30?", "answer": "12 + 30 = 42\n#### 42"}])
    write_jsonl(f"{root}/toy_image.jsonl", [
        {"pid": "toy-0", "question": "What is the answer to the problem in the image?",
         "decoded_image": image("toy0.png", "12 + 30"), "choices": None, "unit": None, "precision": None,
         "answer": "42", "question_type": "free_form", "answer_type": "integer"}])
    return root
