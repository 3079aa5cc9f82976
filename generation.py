"""Generation shared by rl.py, distill.py and evaluate.py: one interface, two backends.

    engine = load_engine("Qwen/Qwen2.5-VL-7B-Instruct", backend="vllm")     # or backend="hf"
    prompts = [{"prompt": chat_prompt(engine.processor, messages), "images": [pil_image]}]
    outs = generate(engine, prompts, n=8, temperature=1.0, max_new_tokens=4096, return_logprobs=True)
    outs[i][j].text, outs[i][j].token_ids, outs[i][j].logprobs      # prompt i, sample j
    sync_weights(engine, model)   # after an optimizer step (the hf backend shares the model)

- `vllm`: a vLLM engine colocated with the trainer, in this process (tensor parallel, GPU memory
  fraction, sleep/wake on GPUs). Under torchrun / accelerate each rank hosts its own engine.
- `hf`: transformers `generate`, for the CPU, tests and models vLLM cannot load.

Both return, per prompt, n `Completion`s with token ids, text and (on request) per-token log-probs
of the sampled tokens *after temperature and top-p* (the distribution the sampler drew from: what
GRPO's importance ratio needs). vLLM gives these only with `logprobs_mode="processed_logprobs"`
(set below; its default, raw log-probs, ignores temperature). Greedy (temperature 0) log-probs are
those of the unscaled logits. The trainer's side of the comparison is
`log_softmax(logits / temperature)` (top-p 1.0, no top-k, as in the paper's RL).

The paper's forced exit (`think_budget`), identical in both backends:
  phase 1: sample at most `think_budget` tokens, stopping early at EOS or at `</think>`;
  phase 2: unless the model ended on its own (EOS) while thinking, append `</think>` if the model
           did not write it, then continue from prompt + phase-1 ids + `</think>` ids (token ids,
           not re-tokenized text) with the tokens left of `max_new_tokens`.
The total never exceeds `max_new_tokens`. Forced tokens were not sampled: `forced_mask` flags them and
their log-probs are 0.0 (mask them out of the policy loss).

Weight sync (vLLM): `sync_weights` streams the state dict (tied `lm_head.weight` included: the CPU
backend keeps a separate copy of the head) one tensor at a time, in vLLM's dtype, into every worker with
`collective_rpc("reload_weights")`, then resets the prefix cache, whose KV entries were computed by the
old weights. FSDP2 shards are all-gathered one tensor at a time. A GRPO step with a colocated engine:

    engine = load_engine(path, "vllm", gpu_memory_utilization=0.3, enable_sleep_mode=True)
    outs = generate(engine, prompts, n=8, return_logprobs=True)   # old log-probs for the ratio
    sleep(engine)                                                  # level 2: GPU memory to the trainer
    ...loss, backward, optimizer step...
    wake_up(engine, ["weights"]); sync_weights(engine, model); wake_up(engine, ["kv_cache"])
"""

import os
from dataclasses import dataclass, field
from typing import Any

import torch

import common

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
    except Exception:  # text-only checkpoints without a processor config, or no torchvision
        processor = AutoTokenizer.from_pretrained(model_name_or_path)
    tokenizer = getattr(processor, "tokenizer", processor)
    return processor, tokenizer


def load_engine(model_name_or_path: str, backend: str = "vllm", *, model=None, processor=None,
                tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                max_model_len: int | None = None, seed: int = 0, dtype: str = "auto",
                enable_sleep_mode: bool = False, kv_cache_memory_bytes: int | None = None,
                max_images_per_prompt: int = 8, **vllm_kwargs) -> Engine:
    """Create a generation engine. For `hf`, pass `model` to generate with a model already in memory
    (the policy in rl.py: then weight sync is free); otherwise it is loaded from `model_name_or_path`.

    vllm: `gpu_memory_utilization` is the fraction of the GPU vLLM may take (weights + KV cache; leave
    room for the trainer when colocated); `kv_cache_memory_bytes` sets the KV cache size directly
    (CPU tests: 256 << 20); `enable_sleep_mode` lets `sleep` free the GPU while the trainer works;
    other keyword arguments go to `vllm.LLM` as they are (e.g. enforce_eager=True).
    """
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
        # The engine runs in this process (no engine-core subprocess): weight sync hands the trainer's
        # tensors to the workers directly instead of serialising ~15 GB through a socket.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Colocated with a multi-process trainer (torchrun / accelerate launch): every rank hosts an
            # engine; consecutive ranks form a tensor-parallel group and must pass the same prompts.
            vllm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            seed += int(os.environ.get("RANK", "0")) // tensor_parallel_size  # same within a TP group
        if is_vlm:  # 0 images (text-only RL): vLLM neither profiles nor reserves memory for images
            vllm_kwargs.setdefault("limit_mm_per_prompt", {"image": max_images_per_prompt, "video": 0})
        llm = LLM(model_name_or_path, tensor_parallel_size=tensor_parallel_size,
                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                  dtype=dtype, enable_sleep_mode=enable_sleep_mode,
                  kv_cache_memory_bytes=kv_cache_memory_bytes,
                  logprobs_mode="processed_logprobs",  # log-probs after temperature / top-p (see top)
                  **vllm_kwargs)
        return Engine("vllm", processor, tokenizer, llm=llm, seed=seed, is_vlm=is_vlm)
    raise ValueError(f"unknown backend {backend!r}: use 'vllm' or 'hf'")


# ----------------------------------------------------------------------------------------------------
# generate: the forced-exit logic once, on top of one sampler per backend
# ----------------------------------------------------------------------------------------------------

def generate(engine: Engine, prompts: list[dict], *, n: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 4096, think_budget: int | None = None,
             return_logprobs: bool = False, seed: int | None = None,
             batch_size: int = 64) -> list[list[Completion]]:
    """Sample n completions per prompt. prompts[i] = {"prompt": chat-templated text, "images": [PIL]}.

    temperature 0 means greedy. think_budget: forced exit after this many tokens of thinking (None: off).
    seed: same seed, same samples. vLLM: prompt i, sample j uses seed + i * n + j; hf: each `generate`
    call is seeded with its first row's seed, so with batch_size = n prompt i's samples depend only on
    seed + i * n, not on the other prompts. Under torchrun give each data-parallel rank its own seed.
    None: the engine's running generator.
    batch_size: rows per `generate` call (hf only; vLLM schedules its own batches).
    Returns outs[i][j], the j-th completion of prompt i.
    """
    if max_new_tokens < 1 or (think_budget is not None and think_budget < 1):
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and think_budget ({think_budget}) must be >= 1")
    if engine.backend not in ("hf", "vllm"):
        raise ValueError(f"unknown backend {engine.backend!r}")
    sample = _sample_vllm if engine.backend == "vllm" else _sample_hf
    tok = engine.tokenizer
    kw = dict(temperature=temperature, top_p=top_p, return_logprobs=return_logprobs, batch_size=batch_size)

    # Phase 1: the whole completion, or (forced exit) the thinking, which stops at `</think>` or the budget.
    budget = max_new_tokens if think_budget is None else min(think_budget, max_new_tokens)
    jobs = [dict(prompt=p["prompt"], images=list(p.get("images") or []), extra=[], max_tokens=budget,
                 seed=None if seed is None else seed + i * n) for i, p in enumerate(prompts)]
    rows = sample(engine, jobs, n=n, stop=[THINK_END] if think_budget is not None else None, **kw)
    outs = [[Completion(text="", token_ids=ids, logprobs=lps, forced_mask=[0] * len(ids),
                        finish_reason="stop" if finished else "length") for ids, lps, finished in row]
            for row in rows]

    # Phase 2 (forced exit): close the thinking if the model did not, then let it write the answer.
    if think_budget is not None:
        forced_ids = tok.encode(THINK_END, add_special_tokens=False)
        todo, jobs2 = [], []
        for i, row in enumerate(outs):
            for c in row:
                closed = THINK_END in tok.decode(c.token_ids)
                if c.finish_reason == "stop" and not closed:
                    continue  # ended on its own (EOS) while thinking: nothing to force
                forced = [] if closed else forced_ids
                left = max_new_tokens - len(c.token_ids) - len(forced)
                c.finish_reason = "length"  # unless phase 2 ends on its own
                if left < 0:
                    continue  # not even `</think>` fits in the cap
                c.token_ids = c.token_ids + forced
                c.logprobs = c.logprobs + [0.0] * len(forced) if c.logprobs is not None else None
                c.forced_mask = c.forced_mask + [1] * len(forced)
                c.forced_exit = bool(forced)
                if left > 0:
                    todo.append(c)
                    jobs2.append(dict(jobs[i], extra=c.token_ids, max_tokens=left,
                                      seed=None if seed is None else seed + len(prompts) * n + len(jobs2)))
        for c, [(ids, lps, finished)] in zip(todo, sample(engine, jobs2, n=1, stop=None, **kw)):
            c.token_ids = c.token_ids + ids
            c.logprobs = c.logprobs + lps if c.logprobs is not None else None
            c.forced_mask = c.forced_mask + [0] * len(ids)
            c.finish_reason = "stop" if finished else "length"

    for row in outs:
        for c in row:
            c.text = tok.decode(c.token_ids, skip_special_tokens=True)
    return outs


def _sample_vllm(engine: Engine, jobs: list[dict], *, n, temperature, top_p, return_logprobs, stop,
                 batch_size):
    """One vLLM `generate` over all jobs (prompt text + extra ids). Returns per job n (ids, lps, finished)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests, params = [], []
    for job in jobs:
        # Token ids, not text, so phase 2 continues from exactly the sampled ids. Image placeholders stay
        # one token each here; vLLM expands them to the image's size.
        ids = engine.tokenizer.encode(job["prompt"], add_special_tokens=False) + job["extra"]
        request = TokensPrompt(prompt_token_ids=ids)
        if job["images"]:
            request["multi_modal_data"] = {"image": job["images"]}
        requests.append(request)
        params.append(SamplingParams(
            n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
            max_tokens=job["max_tokens"], seed=job["seed"], logprobs=0 if return_logprobs else None,
            stop=stop, include_stop_str_in_output=True))
    results = engine.llm.generate(requests, params, use_tqdm=False) if requests else []
    rows = []
    for out in results:
        row = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            # logprobs=0 returns the sampled token's entry (plus none of the top-k) at every step
            lps = [step[t].logprob for step, t in zip(c.logprobs, ids)] if return_logprobs else None
            row.append((ids, lps, c.finish_reason == "stop"))
        rows.append(row)
    return rows


def _hf_inputs(engine: Engine, texts: list[str], images: list[list], extra: list[list[int]]):
    """Left-padded model inputs: each prompt (images expanded by the processor) followed by its extra ids."""
    tok = engine.tokenizer
    tok.padding_side = "left"
    if engine.is_vlm and any(images):
        inputs = engine.processor(text=texts, images=[im for ims in images for im in ims],
                                  return_tensors="pt", padding=True)
    else:
        inputs = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    if any(extra):
        keep = inputs["attention_mask"].bool()  # [batch, prompt_len]
        width = max(int(k.sum()) + len(e) for k, e in zip(keep, extra))
        for key in [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape == keep.shape]:
            pad = tok.pad_token_id if key == "input_ids" else 0
            rows = []
            for v, k, e in zip(inputs[key], keep, extra):
                # extra ids are text: attention 1, token type 0 (mm_token_type_ids of Qwen2.5-VL)
                add = e if key == "input_ids" else [1 if key == "attention_mask" else 0] * len(e)
                row = v[k].tolist() + add
                rows.append([pad] * (width - len(row)) + row)
            inputs[key] = torch.tensor(rows, dtype=inputs[key].dtype)
    return inputs.to(engine.model.device)


def _trim(ids: list[int], eos: set[int], tok, stop: list[str] | None) -> tuple[int, bool]:
    """Where a sampled row ends: after its first EOS or after the token that completes a stop string
    (generate pads finished rows, and the pad token may count as EOS). Returns (length, finished)."""
    end = next((t + 1 for t, i in enumerate(ids) if i in eos), None)
    head = ids[:end] if end is not None else ids
    if stop and any(s in tok.decode(head) for s in stop):
        lo, hi = 1, len(head)  # smallest prefix that contains a stop string (containment is monotone)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in tok.decode(head[:mid]) for s in stop):
                hi = mid
            else:
                lo = mid + 1
        return lo, True
    return (end, True) if end is not None else (len(ids), False)


class _SampledLogprobs:
    """A logits processor, last in `generate`'s list, so it sees the scores after temperature / top-p
    (what was sampled from). It keeps one step's log-softmax ([batch, vocab]) and, once the next call
    shows which token was sampled, only that token's log-prob: never `output_scores`' [batch, vocab]
    tensor per generated token (at Qwen's 152k vocabulary ~0.6 MB per token)."""

    def __init__(self, prompt_len: int):
        self.prompt_len, self.prev, self.out = prompt_len, None, []

    def _take(self, ids):
        self.out.append(self.prev.gather(-1, ids[:, -1:].to(self.prev.device))[:, 0])

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self._take(input_ids)
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences) -> torch.Tensor:
        if self.prev is not None and sequences.shape[1] - self.prompt_len > len(self.out):
            self._take(sequences)
        self.prev = None
        return torch.stack(self.out, 1) if self.out else torch.zeros(sequences.shape[0], 0)


@torch.no_grad()
def _sample_hf(engine: Engine, jobs: list[dict], *, n, temperature, top_p, return_logprobs, stop,
               batch_size):
    """Batched transformers `generate` over the jobs, n rows each. Returns per job n (ids, lps, finished)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    model, tok = engine.model, engine.tokenizer
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    flat = [(k, job) for k, job in enumerate(jobs) for _ in range(n)]  # each job repeated n times
    rows: list[list] = [[] for _ in jobs]
    for s in range(0, len(flat), batch_size):
        chunk = flat[s:s + batch_size]
        if chunk[0][1]["seed"] is not None:  # the chunk's first row: job seed + its sample index
            torch.manual_seed(chunk[0][1]["seed"] + s % n)
        inputs = _hf_inputs(engine, [j["prompt"] for _, j in chunk], [j["images"] for _, j in chunk],
                            [j["extra"] for _, j in chunk])
        greedy = temperature == 0
        # repetition_penalty 1.0 overrides checkpoints' generation_config (Qwen2.5-VL-Instruct ships
        # 1.05), as vLLM's SamplingParams do: both backends sample from plain softmax(logits / T).
        kwargs = dict(do_sample=not greedy, max_new_tokens=max(j["max_tokens"] for _, j in chunk),
                      pad_token_id=tok.pad_token_id, return_dict_in_generate=True, repetition_penalty=1.0)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=tok)
        # Temperature and top-p as our own processors, so that the log-prob recorder runs after them
        # (transformers appends its own warpers after any custom processor)
        processors = LogitsProcessorList()
        if not greedy:
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        recorder = _SampledLogprobs(inputs["input_ids"].shape[1]) if return_logprobs else None
        if recorder is not None:
            processors.append(recorder)
        kwargs["logits_processor"] = processors
        out = model.generate(**inputs, **kwargs)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]  # [batch, new_tokens]
        if recorder is not None:
            step_lps = recorder.finish(out.sequences).tolist()  # [batch, new_tokens]
        for b, (k, job) in enumerate(chunk):
            ids = new[b, :job["max_tokens"]].tolist()  # rows share one call; each keeps its own cap
            end, finished = _trim(ids, eos, tok, stop)
            lps = step_lps[b][:end] if return_logprobs else None
            rows[k].append((ids[:end], lps, finished))
    return rows


# ----------------------------------------------------------------------------------------------------
# weight sync and memory
# ----------------------------------------------------------------------------------------------------

def sync_weights(engine: Engine, model) -> None:
    """Push a training model's weights (an HF model; its parameters may be FSDP2 shards) into the
    engine. vLLM: streamed one tensor at a time, all-gathered from the shards and cast to vLLM's dtype
    (common.full_weights: never the whole state dict at once; a collective under FSDP2, so every rank
    calls it), then a prefix-cache reset. hf: no-op when the engine generates with that very model."""
    if engine.backend == "hf":
        if engine.model is not model:
            engine.model.load_state_dict(dict(common.full_weights(model)))
        return
    dtype = engine.llm.llm_engine.vllm_config.model_config.dtype
    weights = common.full_weights(model, dtype)  # a generator, with HF names (tied head included)
    executor = engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    if executor not in ("uni", "external_launcher") or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        weights = list(weights)  # workers in other processes: the tensors travel serialised
    # Each vLLM model's load_weights maps HF names (Qwen2.5-VL: model.language_model.*, model.visual.*,
    # lm_head.* are accepted by its hf_to_vllm_mapper) and re-fuses q/k/v and gate/up.
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    engine.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights


def _can_sleep(engine: Engine) -> bool:
    return (engine.backend == "vllm" and torch.cuda.is_available()
            and engine.llm.llm_engine.vllm_config.model_config.enable_sleep_mode)


def sleep(engine: Engine) -> None:
    """Free the engine's GPU memory while the trainer works: sleep level 2 discards the weights (the
    trainer pushes fresh ones anyway: level 1 would copy 15 GB to host memory and back for nothing)
    and the KV cache. Needs `enable_sleep_mode=True` at load; otherwise, for hf and on the CPU a no-op."""
    if _can_sleep(engine):
        engine.llm.sleep(level=2)


def wake_up(engine: Engine, tags: list[str] | None = None) -> None:
    """Take GPU memory back: tags=["weights"] before `sync_weights`, then ["kv_cache"], so the push
    never has the KV cache allocated next to the trainer's gathered tensors. No-op where `sleep` is."""
    if _can_sleep(engine):
        torch.cuda.empty_cache()  # the trainer's freed activations go back to the GPU, not to its cache
        engine.llm.wake_up(tags=tags)
