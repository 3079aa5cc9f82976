"""Generation shared by rl.py, distill.py and evaluate.py: one interface, two backends.

    engine = load_engine("Qwen/Qwen2.5-VL-7B-Instruct", backend="vllm")     # or backend="hf"
    prompts = [{"prompt": chat_prompt(engine.processor, messages), "images": [pil_image]}]
    outs = generate(engine, prompts, n=8, temperature=1.0, max_new_tokens=4096)
    outs[i][j].text, outs[i][j].token_ids, outs[i][j].logprobs      # prompt i, sample j
    sync_weights(engine, model)     # after an optimizer step (vLLM; the hf backend shares the model)

- `vllm`: a colocated vLLM engine (tensor parallel, GPU memory fraction, sleep/wake on GPUs).
- `hf`: transformers `generate`, for the CPU, tests and models vLLM cannot load.

Both return, per prompt, n `Completion`s with token ids, text and (on request) per-token log-probs
*after temperature* (what the sampler drew from; what GRPO's importance ratio needs).

The paper's forced exit (`think_budget`): when the thinking reaches the budget without `</think>`,
append `</think>` and let the model continue to write its answer, within the total cap
`max_new_tokens`. Forced tokens were not sampled: `Completion.forced_mask` flags them.
"""

from dataclasses import dataclass, field
from typing import Any

import torch

THINK_END = "</think>"


@dataclass
class Completion:
    text: str  # decoded completion, special tokens skipped
    token_ids: list[int]  # completion token ids, forced `</think>` tokens included
    logprobs: list[float] | None = None  # per token, after temperature (0.0 on forced tokens)
    forced_mask: list[int] = field(default_factory=list)  # 1 where a token was appended, not sampled
    finish_reason: str = "stop"  # "stop": ended itself (EOS / stop string); "length": hit the cap
    forced_exit: bool = False  # `</think>` was appended at the thinking budget


@dataclass
class Engine:
    backend: str  # "vllm" or "hf"
    processor: Any  # AutoProcessor for VLMs, else the tokenizer (has apply_chat_template)
    tokenizer: Any
    model: Any = None  # hf: the torch model that generates
    llm: Any = None  # vllm: vllm.LLM
    seed: int = 0
    is_vlm: bool = False


def chat_prompt(processor, messages: list[dict]) -> str:
    """Render a conversation with the model's chat template, ready for the assistant to answer.

    For a VLM, an image is an item {"type": "image"} in a message's content list; the template writes
    its placeholder and the image itself travels in the prompt dict's "images".
    """
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_processor(model_name_or_path: str):
    """AutoProcessor for VLMs (it has an image processor), AutoTokenizer otherwise."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(model_name_or_path)
    except Exception:  # text-only checkpoints without a processor config on older transformers
        processor = AutoTokenizer.from_pretrained(model_name_or_path)
    tokenizer = getattr(processor, "tokenizer", processor)
    return processor, tokenizer


def load_engine(model_name_or_path: str, backend: str = "vllm", *, model=None, processor=None,
                tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                max_model_len: int | None = None, seed: int = 0, dtype: str = "auto",
                enable_sleep_mode: bool = False, kv_cache_memory_bytes: int | None = None) -> Engine:
    """Create a generation engine. For `hf`, pass `model` to generate with a model already in memory
    (the policy in rl.py: then weight sync is free); otherwise it is loaded from `model_name_or_path`."""
    if processor is None:
        processor, tokenizer = load_processor(model_name_or_path)
    else:
        tokenizer = getattr(processor, "tokenizer", processor)
    is_vlm = hasattr(processor, "image_processor")
    if backend == "hf":
        if model is None:
            from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

            auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
            torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            model = auto.from_pretrained(model_name_or_path, dtype=torch_dtype)
            model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        return Engine("hf", processor, tokenizer, model=model, seed=seed, is_vlm=is_vlm)
    if backend == "vllm":
        raise NotImplementedError("the vLLM backend is added by the generation helper work (issue 6)")
    raise ValueError(f"unknown backend {backend!r}: use 'vllm' or 'hf'")


def generate(engine: Engine, prompts: list[dict], *, n: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 4096, think_budget: int | None = None,
             return_logprobs: bool = False, seed: int | None = None,
             batch_size: int = 64) -> list[list[Completion]]:
    """Sample n completions per prompt. prompts[i] = {"prompt": chat-templated text, "images": [PIL]}.

    temperature 0 means greedy. think_budget: forced exit after this many tokens of thinking (None: off).
    Returns outs[i][j], the j-th completion of prompt i.
    """
    if engine.backend == "hf":
        return _generate_hf(engine, prompts, n=n, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, think_budget=think_budget,
                            return_logprobs=return_logprobs, seed=seed, batch_size=batch_size)
    raise NotImplementedError(engine.backend)


@torch.no_grad()
def _hf_sample(engine: Engine, texts: list[str], images: list[list], *, temperature: float, top_p: float,
               max_new_tokens: int, return_logprobs: bool, stop_strings=None):
    """One batched `generate` call. Returns (token ids, log-probs or None, finished) per row."""
    model, tok = engine.model, engine.tokenizer
    tok.padding_side = "left"
    if engine.is_vlm and any(images):
        inputs = engine.processor(text=texts, images=[im for ims in images for im in ims] or None,
                                  return_tensors="pt", padding=True)
    else:
        inputs = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    inputs = inputs.to(model.device)
    greedy = temperature == 0
    kwargs = dict(do_sample=not greedy, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                  return_dict_in_generate=True, output_scores=return_logprobs)
    if not greedy:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tok)
    out = model.generate(**inputs, **kwargs)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]  # [batch, new_tokens]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for b in range(new.shape[0]):
        ids = new[b].tolist()
        lps = None
        if return_logprobs:
            # out.scores are the processed logits (temperature/top-p applied): log_softmax = what was sampled from.
            lps = [torch.log_softmax(out.scores[t][b].float(), -1)[ids[t]].item() for t in range(len(ids))]
        # cut at the first EOS (kept) and drop padding after it
        end = next((t + 1 for t, i in enumerate(ids) if i in eos), None)
        finished = end is not None
        if end is not None:
            ids = ids[:end]
            lps = lps[:end] if lps is not None else None
        elif stop_strings and any(s in tok.decode(ids) for s in stop_strings):
            finished = True
        rows.append((ids, lps, finished))
    return rows


def _generate_hf(engine, prompts, *, n, temperature, top_p, max_new_tokens, think_budget,
                 return_logprobs, seed, batch_size):
    if seed is not None:
        torch.manual_seed(seed)
    tok = engine.tokenizer
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]  # each prompt repeated n times
    results: list[Completion] = []
    for s in range(0, len(flat), batch_size):
        chunk = flat[s:s + batch_size]
        texts = [p["prompt"] for _, p in chunk]
        images = [list(p.get("images") or []) for _, p in chunk]
        budget = max_new_tokens if think_budget is None else min(think_budget, max_new_tokens)
        rows = _hf_sample(engine, texts, images, temperature=temperature, top_p=top_p,
                          max_new_tokens=budget, return_logprobs=return_logprobs,
                          stop_strings=[THINK_END] if think_budget is not None else None)
        for (ids, lps, finished), text, ims in zip(rows, texts, images):
            c = Completion(text="", token_ids=ids, logprobs=lps, forced_mask=[0] * len(ids))
            ended_itself = finished and THINK_END not in tok.decode(ids)
            if think_budget is not None and not ended_itself and len(ids) < max_new_tokens:
                # Phase 2: close the thinking if the model did not, then let it write the answer.
                if THINK_END not in tok.decode(ids):
                    forced = tok.encode(THINK_END, add_special_tokens=False)
                    c.token_ids = ids + forced
                    c.logprobs = (lps + [0.0] * len(forced)) if lps is not None else None
                    c.forced_mask = [0] * len(ids) + [1] * len(forced)
                    c.forced_exit = True
                left = max_new_tokens - len(c.token_ids)
                if left > 0:
                    ids2, lps2, finished = _hf_sample(
                        engine, [text + tok.decode(c.token_ids)], [ims], temperature=temperature,
                        top_p=top_p, max_new_tokens=left, return_logprobs=return_logprobs)[0]
                    c.token_ids += ids2
                    c.logprobs = c.logprobs + lps2 if lps2 is not None else None
                    c.forced_mask += [0] * len(ids2)
            c.finish_reason = "stop" if finished else "length"
            c.text = tok.decode(c.token_ids, skip_special_tokens=True)
            results.append(c)
    return [results[i * n:(i + 1) * n] for i in range(len(prompts))]


def sync_weights(engine: Engine, model) -> None:
    """Push the training model's weights into the engine (vLLM). No-op when the hf engine generates
    with that very model."""
    if engine.backend == "hf":
        if engine.model is not model:
            engine.model.load_state_dict(model.state_dict())
        return
    raise NotImplementedError(engine.backend)


def sleep(engine: Engine) -> None:
    """Free the engine's GPU memory (weights and KV cache) while the trainer works. No-op for hf."""


def wake_up(engine: Engine) -> None:
    """Take the GPU memory back before generating. No-op for hf."""
