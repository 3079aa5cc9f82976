"""Make a tiny, random, deterministic model that loads like the real ones.

    python scripts/make_tiny_model.py --output_dir tiny-models/vl            # Qwen2.5-VL shape
    python scripts/make_tiny_model.py --output_dir tiny-models/text --kind text  # Qwen2 text model

kind vl:   Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor, loadable with AutoProcessor and
           AutoModelForImageTextToText; Qwen2.5-VL's chat template and special tokens.
kind text: Qwen2ForCausalLM with head_dim 64 (a shape vLLM's CPU attention kernels accept), loadable
           with AutoTokenizer and AutoModelForCausalLM.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a small built-in corpus, with
every digit its own token (tiny models learn arithmetic far more easily that way). `<think>`,
`</think>`, `<answer>`, `</answer>` are single added tokens that decode as plain text.

The sizes and three settings come from what made a ~2M-parameter VLM learn to read images on a CPU:
M-RoPE with rope_theta=10 and mrope_section=[2,4,10] (Qwen's defaults leave image tokens' horizontal
positions almost no signal at this size), image_mean=1.0 / image_std=0.5 (a white background maps to
0 instead of +1.9, which collapsed the vision features), and full attention in every vision block.
"""

import argparse
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen2.5-VL's special tokens, in its order. The first is the pad token, <|im_end|> ends a turn.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# The answer format's tags: one token each, not special, so they survive skip_special_tokens=True.
FORMAT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen2.5-VL-7B-Instruct's chat template (same structure and special tokens).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small corpus so the BPE learns merges for the words the toy task and the prompts use.
CORPUS = [
    "You will solve a problem/request. You should provide your thoughts within <think> </think> tags "
    "before providing the answer.\nWrite your final answer within <answer> </answer> tags. "
    "Here is the question: ",
    "You should provide your thoughts within <think> </think> tags, then answer with just one of the "
    "options below within <answer> </answer> tags (For example, if the question is 'Is the earth "
    "flat? A: Yes B: No', you should answer <think>...</think> <answer>B: No</answer>). "
    "Here is the question: ",
    "What is 37 + 48? Compute 12 - 5. Solve the problem. Read the problem. Options: A: 10 B: 11 C: 12",
    "First add the ones: 7 + 8 = 15, write 5 carry 1. Then the tens: 3 + 4 + 1 = 8. So the answer is 85.",
    "The answer is 85. Let me check: 85 - 48 = 37. Correct. Final Answer: \\boxed{85}",
    "Which of the following is correct? The patient presents with fever, cough and a rash.",
    "system user assistant You are a helpful assistant.",
]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Digits first, so each digit is one token; then GPT-2/Qwen style byte-level splitting.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, clean_up_tokenization_spaces=False,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.add_tokens(FORMAT_TOKENS, special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # generation pads on the left; training code sets its own side
    return fast


def make_vl(output_dir: str, seed: int) -> None:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
            rope_theta=10.0, rope_scaling={"type": "mrope", "mrope_section": [2, 4, 10]},
            rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 4, 10]},
            tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=4, hidden_size=128, num_heads=4, intermediate_size=256, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128, window_size=112,
            fullatt_block_indexes=[0, 1, 2, 3],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    # 168x28 drawings -> 12x2 patches of 14 px -> 6 image tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessor(
        min_pixels=784, max_pixels=4704, image_mean=[1.0, 1.0, 1.0], image_std=[0.5, 0.5, 0.5],
        patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    video_processor = Qwen2VLVideoProcessor(min_pixels=784, max_pixels=4704, patch_size=14, merge_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def make_text(output_dir: str, seed: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=pad, eos_token_id=eos,
        pad_token_id=pad, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [eos, pad]
    model.generation_config.pad_token_id = pad
    model.generation_config.do_sample = False
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--kind", choices=["vl", "text"], default="vl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    (make_vl if args.kind == "vl" else make_text)(args.output_dir, args.seed)
    print(f"saved a tiny {args.kind} model to {args.output_dir}")
