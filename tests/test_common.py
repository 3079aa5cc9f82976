"""common.py: the plumbing every stage shares. One data loader (a JSON object means the same thing in every
stage; CSV reads everywhere), resumable JSONL, checkpoint folders, the vision-tower rule, the chunked head."""

import json

import pytest
import torch

import common
import distill
import evaluate
import rl
import sft


def test_every_stage_reads_data_through_one_loader():
    """The four stages used to carry four loaders: a JSON object meant a split map in one, {"data": rows}
    in another, {id: row} in a third; CSV worked in one. Now none of them has its own."""
    for module in (sft, rl, distill, evaluate):
        assert not hasattr(module, "load_rows") and not hasattr(module, "read_local"), module.__name__


def test_load_rows_shapes(tmp_path):
    rows = [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}]
    cases = {"list.json": rows, "split.json": {"train": rows, "test": rows[:1]}, "data.json": {"data": rows},
             "ids.json": {"a": rows[0], "b": rows[1]}}
    for name, content in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        got, base = common.load_rows(str(tmp_path / name))
        assert [r["question"] for r in got] == ["q1", "q2"] and base == str(tmp_path), name
    assert common.load_rows(str(tmp_path / "split.json"), split="test")[0] == rows[:1]
    assert common.load_rows(str(tmp_path / "ids.json"))[0][0]["id"] == "a"
    (tmp_path / "rows.csv").write_text("question,answer\nq1,1\nq2,2\n")
    assert [r["question"] for r in common.load_rows(str(tmp_path / "rows.csv"))[0]] == ["q1", "q2"]
    (tmp_path / "bad.json").write_text(json.dumps({"train": "not rows"}))
    with pytest.raises(ValueError, match=r"bad\.json"):
        common.load_rows(str(tmp_path / "bad.json"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2"):
        common.load_rows(str(tmp_path / "bad.jsonl"))


def test_append_only_jsonl_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2, "text": "a\xe2\x80\xa8b"}\n{"id": 3, "tex')  # killed mid-write
    assert common.read_jsonl(str(path)) == ([{"id": 1}, {"id": 2, "text": "a\u2028b"}], True)
    assert len(common.repair_jsonl(str(path))) == 2
    with open(path, "a") as f:
        common.append_jsonl(f, [{"id": 3}])
    assert [r["id"] for r in common.read_jsonl(str(path))[0]] == [1, 2, 3]
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')  # a bad line in the middle is not a torn write
    with pytest.raises(ValueError, match="line 2"):
        common.read_jsonl(str(path))


def test_checkpoint_folders_and_log_truncation(tmp_path):
    out = tmp_path / "run"
    assert common.resume_dir(str(out), resume=False) is None
    for step in (10, 2, 5):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    (out / "checkpoint-7.tmp").mkdir()  # an unfinished write is never a checkpoint
    assert common.list_checkpoints(str(out)) == [str(out / f"checkpoint-{s}") for s in (2, 5, 10)]
    assert common.resume_dir(str(out), resume=True) == str(out / "checkpoint-10")
    with pytest.raises(ValueError, match="earlier run"):
        common.resume_dir(str(out), resume=False)
    log = out / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    common.truncate_log(str(log), 5)
    assert [r["step"] for r in common.read_jsonl(str(log))[0]] == [1, 2, 3, 4, 5]
    common.prune_checkpoints(str(out), keep=1)
    assert common.list_checkpoints(str(out)) == [str(out / "checkpoint-10")]


def test_token_logprobs_equal_full_logits_within_1e5():
    """The chunked head (any chunk size) equals log_softmax over full [N, vocab] logits: values, entropy
    and gradients, with temperature."""
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(1000, 32, requires_grad=True)
    t = torch.randint(0, 1000, (300,))
    full = torch.log_softmax(h @ w.t() / 0.7, -1)
    ref, ref_ent = full.gather(-1, t[:, None])[:, 0], -(full.exp() * full).sum(-1)
    g_ref = torch.autograd.grad(ref.sum(), [h, w])
    for chunk in (7, 128, 512):
        lp, ent = common.token_logprobs(h, w, t, 0.7, chunk_size=chunk, with_entropy=True)
        torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, ref_ent, atol=5e-5, rtol=1e-5)  # a diagnostic, fp32 sums
        for a, b in zip(torch.autograd.grad(lp.sum(), [h, w]), g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_sdpa_equals_separate_sequences_and_masked_sdpa(tiny_vl_dir):
    """sdpa_packed (sdpa once per packed sequence, no [W, W] mask): logits and gradients of packed rows
    equal each sequence run alone and transformers' block-diagonal-mask sdpa; padding that continues the
    last sequence's positions changes no real token; generation (padding mask, KV cache) is plain sdpa."""
    def load(impl):
        torch.manual_seed(0)
        return common.load_model(tiny_vl_dir, torch.device("cpu"), 1, torch.float32, impl)

    packed, masked = load(common.PACKED_SDPA), load("sdpa")
    assert packed.config.text_config._attn_implementation == common.PACKED_SDPA
    torch.manual_seed(1)
    lengths = [[5, 9, 3], [7, 6]]  # row 1: two sequences + 4 padding tokens continuing the last one
    W = 17
    ids = torch.randint(20, 300, (2, W))
    text = torch.tensor([sum((list(range(n)) for n in row), []) for row in [[5, 9, 3], [7, 10]]])
    pos = torch.cat([text[None], text[None].expand(3, -1, -1)])  # [4, R, W]: text + M-RoPE rows
    out = {}
    for name, model in (("packed", packed), ("masked", masked)):
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        grad = torch.autograd.grad(logits[:, :, :50].square().sum(),
                                   model.model.language_model.layers[0].self_attn.q_proj.weight)[0]
        out[name] = (logits.detach(), grad)
    torch.testing.assert_close(out["packed"][0], out["masked"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["packed"][1], out["masked"][1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for r, row in enumerate(lengths):
            t = 0
            for n in row:
                alone = masked(input_ids=ids[r:r + 1, t:t + n], use_cache=False).logits[0]
                torch.testing.assert_close(out["packed"][0][r, t:t + n], alone, atol=1e-5, rtol=0)
                t += n
        prompt, mask = ids[:, :6], torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(packed.generate(input_ids=prompt, **kwargs), masked.generate(input_ids=prompt, **kwargs))
