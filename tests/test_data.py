"""Data pipeline: formats, masks, bad rows, determinism, resumption, process slices."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gold_jax.data import (DatasetStats, default_data_config, iterator_state_from_json, iterator_state_to_json,
                           load_rows, load_tokenizer, make_iterator, tokenize_files, train_tokenizer)
from gold_jax.data.config import make_buckets
from gold_jax.fingerprint import tokenizer_fingerprint
from gold_jax.types import SequenceBatch
from tiny_tokenizer import tiny_corpus, tiny_tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def chatml(msgs, gen=False):
    s = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in msgs)
    return s + (f"{IM_START}assistant\n" if gen else "")


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def cfg_for(files, **kw):
    cfg = default_data_config()
    cfg.train_files = files
    cfg.shuffle = False
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def unpad(batch, i):
    """(prompt ids, completion ids) of row i taken through the masks only."""
    p = batch["prompt_ids"][i][batch["prompt_mask"][i] == 1]
    c = batch["completion_ids"][i][batch["completion_mask"][i] == 1]
    return p.tolist(), c.tolist()


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def question(i):
    return f"what is {i} plus {i + 1}?"


def answer(i):
    return f"the answer is {2 * i + 1}."


# ---------------------------------------------------------------- tokenizer

def test_train_tokenizer_specials_template_and_roundtrip(tmp_path):
    tok = train_tokenizer(tiny_corpus(100), 300, out_dir=str(tmp_path / "tok"))
    assert tok.eos_token == IM_END and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    for special in ("<|endoftext|>", IM_START, IM_END, "<|pad|>"):
        assert tok.convert_tokens_to_ids(special) < 4  # registered as single tokens
        assert len(enc(tok, f"hi{special}there")) >= 3 and tok.convert_tokens_to_ids(special) in enc(tok, f"a{special}b")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == chatml(msgs, gen=True)
    assert tok.decode(enc(tok, "one two 345 three.")) == "one two 345 three."
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id
    assert loaded.apply_chat_template(msgs, tokenize=False) == chatml(msgs)


def test_tokenizer_bad_input(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(TypeError, match="texts"):
        train_tokenizer("abc")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))


# ---------------------------------------------------------------- formats and masks

def _check_rows(tok, cfg, expected, batch_size=4):
    """expected[i] = (prompt text, completion text, eos appended?) in file order."""
    it = make_iterator(cfg, tok, global_batch_size=batch_size, num_epochs=1)
    got = []
    for batch in it:
        SequenceBatch(**batch)  # the shared container accepts the batch as-is
        for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
            assert batch[k].dtype == np.int32 and batch[k].shape[0] == batch_size
        P, R = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
        for i in range(batch_size):
            pm, cm = batch["prompt_mask"][i], batch["completion_mask"][i]
            # left-padded prompt, right-padded completion, pad id off the masks
            n, m = int(pm.sum()), int(cm.sum())
            assert pm.tolist() == [0] * (P - n) + [1] * n and cm.tolist() == [1] * m + [0] * (R - m)
            assert (batch["prompt_ids"][i][pm == 0] == tok.pad_token_id).all()
            assert (batch["completion_ids"][i][cm == 0] == tok.pad_token_id).all()
            got.append(unpad(batch, i))
    assert len(got) == len(expected) // batch_size * batch_size
    for (p, c), (p_text, c_text, plain) in zip(got, expected):
        assert p == enc(tok, p_text)
        # loss positions are exactly the completion tokens, ending with EOS
        assert c == enc(tok, c_text) + ([tok.eos_token_id] if plain else [])
        assert c[-1] == tok.eos_token_id


def test_verl_parquet_dotted_response_key(tok, tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "think"}, {"role": "user", "content": question(i)}],
             "extra_info": {"answer": answer(i), "index": i}, "data_source": "toy"} for i in range(8)]
    cfg = cfg_for(write_parquet(tmp_path / "v.parquet", rows), format="auto", response_key="extra_info.answer")
    expected = [(chatml(r["prompt"], gen=True), answer(i) + IM_END, False) for i, r in enumerate(rows)]
    _check_rows(tok, cfg, expected)


def test_messages_jsonl(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": question(i)}, {"role": "assistant", "content": "hm"},
                          {"role": "user", "content": "sure?"}, {"role": "assistant", "content": answer(i)}]}
            for i in range(8)]
    cfg = cfg_for(write_jsonl(tmp_path / "m.jsonl", rows))
    expected = [(chatml(r["messages"][:-1], gen=True), answer(i) + IM_END, False) for i, r in enumerate(rows)]
    _check_rows(tok, cfg, expected)


def test_prompt_completion_plain_and_conversational(tok, tmp_path):
    plain = [{"prompt": question(i), "completion": " " + answer(i)} for i in range(8)]
    cfg = cfg_for(write_jsonl(tmp_path / "p.jsonl", plain), chat_template=False)
    _check_rows(tok, cfg, [(question(i), " " + answer(i), True) for i in range(8)])
    # plain strings with the chat template on: a user turn and an assistant turn
    cfg = cfg_for(str(tmp_path / "p.jsonl"), format="prompt_completion", chat_template=True)
    _check_rows(tok, cfg, [(chatml([{"role": "user", "content": question(i)}], gen=True),
                            " " + answer(i) + IM_END, False) for i in range(8)])
    conv = [{"prompt": [{"role": "user", "content": question(i)}],
             "completion": [{"role": "assistant", "content": answer(i)}]} for i in range(8)]
    cfg = cfg_for(write_parquet(tmp_path / "c.parquet", conv))
    _check_rows(tok, cfg, [(chatml(r["prompt"], gen=True), answer(i) + IM_END, False) for i, r in enumerate(conv)])


def test_text_format(tok, tmp_path):
    rows = [{"text": answer(i) + " " + question(i)} for i in range(8)]
    cfg = cfg_for(write_jsonl(tmp_path / "t.jsonl", rows))
    _check_rows(tok, cfg, [("<|endoftext|>", r["text"], True) for r in rows])


def test_truncation_left_right_and_counts(tok, tmp_path):
    long_q = " ".join(["one two three"] * 20)
    rows = [{"prompt": long_q, "response": answer(i) * 6} for i in range(4)]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    p_full, c_full = enc(tok, long_q), enc(tok, answer(0) * 6) + [tok.eos_token_id]
    assert len(p_full) > 10 and len(c_full) > 8
    for trunc, rtrunc in (("left", "right"), ("right", "left")):
        cfg = cfg_for(path, chat_template=False, max_prompt_length=10, max_response_length=8,
                      truncation=trunc, response_truncation=rtrunc)
        examples, stats = tokenize_files(path, tok, cfg)
        ex = examples[0]
        assert ex[0].tolist() == (p_full[-10:] if trunc == "left" else p_full[:10])
        assert ex[1].tolist() == (c_full[:8] if rtrunc == "right" else c_full[-8:])
        assert stats.truncated_prompts == 4 and stats.truncated_responses == 4 and stats.rows_dropped == 0


def test_bad_rows_counted_with_file_and_index(tok, tmp_path):
    good = {"prompt": [{"role": "user", "content": question(1)}], "response": answer(1)}
    rows = [good,
            {"prompt": [{"role": "user", "content": "q"}]},                       # 1 missing column
            {"prompt": [{"role": "user", "content": "q"}], "response": ""},       # 2 empty completion
            {"prompt": [{"role": "user", "content": "q"}], "response": 7},        # 3 wrong type
            {"prompt": [{"role": "user", "content": "one two " * 40}], "response": "x"},  # 4 prompt too long
            "{not json",                                                           # 5 invalid json
            {"prompt": [{"role": "user"}], "response": "x"},                       # 6 message without content
            good]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = cfg_for(path, max_prompt_length=32, truncation="drop")
    examples, stats = tokenize_files(path, tok, cfg)
    assert isinstance(stats, DatasetStats)
    assert stats.rows_read == 8 and stats.rows_kept == 2 == len(examples) and stats.rows_dropped == 6
    got = {i: reason for f, i, reason, _ in stats.bad_rows if f == path}
    # jsonl positions are 1-based line numbers
    assert got == {2: "missing_column", 3: "empty_completion", 4: "wrong_type", 5: "prompt_too_long",
                   6: "invalid_json", 7: "wrong_type"}
    assert stats.to_dict()["dropped"]["wrong_type"] == 2
    # a messages row whose last turn is not the assistant's
    mpath = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"}]},
                                               {"messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": "a"}]}])
    _, mstats = tokenize_files(mpath, tok, cfg_for(mpath))
    assert mstats.bad_rows[0][1:3] == (1, "no_assistant_completion")


def test_file_without_usable_rows_is_an_error(tok, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "one two"}] * 4)
    bad = write_jsonl(tmp_path / "empty_rows.jsonl", [{"text": ""}, {"text": 3}])
    with pytest.raises(ValueError, match="empty_rows.jsonl.*no usable rows"):
        tokenize_files([good, bad], tok, cfg_for([good, bad]))
    with pytest.raises(ValueError, match="cannot detect"):
        path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
        tokenize_files(path, tok, cfg_for(path))
    with pytest.raises(ValueError, match="does not exist"):
        tokenize_files(str(tmp_path / "missing.jsonl"), tok, cfg_for("x"))


def test_config_validation_names_the_key(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two"}] * 4)
    for key, value in (("format", "csv"), ("truncation", "middle"), ("max_prompt_length", 0)):
        with pytest.raises(ValueError, match=f"data.{key}"):
            make_iterator(cfg_for(path, **{key: value}), tok, global_batch_size=2)
    with pytest.raises(ValueError, match="process_count"):
        make_iterator(cfg_for(path), tok, global_batch_size=3, process_count=2)
    with pytest.raises(ValueError, match="data.val_files"):
        make_iterator(cfg_for(path), tok, split="val", global_batch_size=2)


def test_load_rows_parquet_and_jsonl(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", [{"text": "x"}, {"text": "y"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "z"}])
    rows = load_rows(f"{a},{b}")
    assert [(os.path.basename(f), i, r["text"]) for f, i, r in rows] == [
        ("a.parquet", 0, "x"), ("a.parquet", 1, "y"), ("b.jsonl", 0, "z")]


def test_buckets():
    assert make_buckets(None, 100, 16, "k") == [16, 32, 64, 100]
    assert make_buckets(None, 8, 16, "k") == [8]
    assert make_buckets([64, 32], 64, 16, "k") == [32, 64]
    with pytest.raises(ValueError, match="k"):
        make_buckets([16], 64, 16, "k")


# ---------------------------------------------------------------- order, resumption, processes

N_ROWS = 24


@pytest.fixture(scope="module")
def varied_file(tmp_path_factory):
    """Rows with distinct, varied lengths so order and buckets are observable."""
    rng = np.random.default_rng(0)
    rows = [{"prompt": " ".join(["one"] * int(rng.integers(1, 30))) + f" {i}",
             "response": " ".join(["two"] * int(rng.integers(1, 40))) + f" {i}"} for i in range(N_ROWS)]
    return write_jsonl(tmp_path_factory.mktemp("d") / "v.jsonl", rows)


def _keys(batch):
    """Row identity: the prompt token ids through the mask."""
    return [tuple(unpad(batch, i)[0]) for i in range(batch["prompt_ids"].shape[0])]


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_shuffle_deterministic_per_epoch_and_buckets(tok, varied_file):
    cfg = cfg_for(varied_file, shuffle=True, seed=3, prompt_buckets=[8, 16, 64], response_buckets=[16, 64],
                  max_prompt_length=64, max_response_length=64)
    a = _take(make_iterator(cfg, tok, global_batch_size=4, seed=1), 12)  # 2 epochs
    b = _take(make_iterator(cfg, tok, global_batch_size=4, seed=1), 12)
    c = _take(make_iterator(cfg, tok, global_batch_size=4, seed=2), 12)
    ka, kb, kc = ([k for x in run for k in _keys(x)] for run in (a, b, c))
    assert ka == kb and ka != kc
    ordered = [k for x in _take(make_iterator(cfg_for(varied_file), tok, global_batch_size=4), 6) for k in _keys(x)]
    epoch1, epoch2 = ka[:N_ROWS], ka[N_ROWS:]
    assert sorted(epoch1) == sorted(ordered) == sorted(epoch2)   # each epoch sees every row once
    assert epoch1 != ordered and epoch1 != epoch2                # shuffled, and reshuffled per epoch
    for x in a:
        P, R = x["prompt_ids"].shape[1], x["completion_ids"].shape[1]
        assert P in (8, 16, 64) and R in (16, 64)
        need_p, need_r = x["prompt_mask"].sum(1).max(), x["completion_mask"].sum(1).max()
        assert P == min(v for v in (8, 16, 64) if v >= need_p) and R == min(v for v in (16, 64) if v >= need_r)


def test_state_save_restore_resumes_exactly(tok, varied_file):
    cfg = cfg_for(varied_file, shuffle=True)
    full = _take(make_iterator(cfg, tok, global_batch_size=4), 10)
    it = make_iterator(cfg, tok, global_batch_size=4)
    _take(it, 4)
    text = iterator_state_to_json(it.get_state())
    _take(it, 3)  # run on, then rewind a fresh iterator from the saved state
    resumed = make_iterator(cfg, tok, global_batch_size=4)
    resumed.set_state(iterator_state_from_json(text))
    for want, got in zip(full[4:], _take(resumed, 6)):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_two_processes_disjoint_slices_cover_global_batch(tok, varied_file):
    cfg = cfg_for(varied_file, shuffle=True)
    whole = _take(make_iterator(cfg, tok, global_batch_size=8), 4)
    parts = [_take(make_iterator(cfg, tok, global_batch_size=8, process_index=p, process_count=2), 4)
             for p in range(2)]
    for step, w in enumerate(whole):
        p0, p1 = parts[0][step], parts[1][step]
        assert p0["prompt_ids"].shape == p1["prompt_ids"].shape == (4, w["prompt_ids"].shape[1])
        assert not set(_keys(p0)) & set(_keys(p1))
        for k in w:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), w[k])


def test_val_split_pads_final_partial_batch(tok, varied_file, tmp_path):
    cfg = cfg_for(varied_file)
    cfg.val_files = write_jsonl(tmp_path / "val.jsonl", [{"prompt": question(i), "response": answer(i)}
                                                         for i in range(5)])
    batches = list(make_iterator(cfg, tok, split="val", global_batch_size=4, num_epochs=1))
    assert len(batches) == 2
    assert batches[1]["completion_mask"][1:].sum() == 0 and batches[1]["completion_mask"][0].sum() > 0


# ---------------------------------------------------------------- audit additions

def test_multiple_files_mixed_formats_in_file_order(tok, tmp_path):
    a = write_parquet(tmp_path / "a.parquet", [{"prompt": [{"role": "user", "content": question(i)}],
                                               "response": answer(i)} for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": question(i)},
                                                        {"role": "assistant", "content": answer(i)}]}
                                          for i in range(3, 6)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": answer(i)} for i in range(6, 8)])
    expected = [(chatml([{"role": "user", "content": question(i)}], gen=True), answer(i) + IM_END, False)
                for i in range(6)] + [("<|endoftext|>", answer(i), True) for i in range(6, 8)]
    _check_rows(tok, cfg_for(f"{a},{b}, {c}"), expected)
    _check_rows(tok, cfg_for([a, b, c]), expected)


def test_bad_first_row_does_not_hide_the_format(tok, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "q"}]},          # 0: no response column
            *({"prompt": [{"role": "user", "content": question(i)}], "response": answer(i)} for i in range(3))]
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    examples, stats = tokenize_files(path, tok, cfg_for(path))
    assert len(examples) == 3 and [(i, r) for _, i, r, _ in stats.bad_rows] == [(1, "missing_column")]


def test_invalid_utf8_line_and_corrupt_parquet_are_named(tok, tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "one two"}\n{"text": "\xff\xfe"}\n{"text": "three four"}\n')
    examples, stats = tokenize_files(str(path), tok, cfg_for(str(path)))
    assert len(examples) == 2 and [(i, r) for _, i, r, _ in stats.bad_rows] == [(2, "invalid_utf8")]
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="broken.parquet"):
        tokenize_files(str(bad), tok, cfg_for(str(bad)))
    with pytest.raises(ValueError, match="unsupported data file"):
        tokenize_files(write_jsonl(tmp_path / "x.csv", ["a,b"]), tok, cfg_for("x"))


def test_response_drop_policy_and_drops_logged(tok, tmp_path, caplog):
    from absl import logging as absl_logging
    rows = [{"prompt": question(i), "response": answer(i) * (8 if i % 2 else 1)} for i in range(6)]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    cfg = cfg_for(path, chat_template=False, max_response_length=12, response_truncation="drop")
    absl_logging.get_absl_handler()  # make absl log through the std logging tree that caplog watches
    with caplog.at_level("INFO"):
        examples, stats = tokenize_files(path, tok, cfg)
    assert len(examples) == 3 and stats.dropped == {"response_too_long": 3}
    assert sorted(i for _, i, _, _ in stats.bad_rows) == [2, 4, 6]
    text = caplog.text
    assert "dropped line 2 of" in text and "r.jsonl" in text and "'rows_dropped': 3" in text
    assert all(len(c) <= 12 for _, c in examples)


def test_conversational_without_chat_template_names_the_file(tok, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValueError, match="m.jsonl.*chat_template"):
        tokenize_files(path, tok, cfg_for(path, chat_template=False))


def test_completion_mask_marks_exactly_the_completion_tokens(tok, tmp_path):
    """Per-position check on the concatenated model input, as the loss sees it."""
    rows = [{"prompt": question(i) * (1 + i % 3), "completion": answer(i) * (1 + i % 2)} for i in range(8)]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    batch = next(make_iterator(cfg_for(path, chat_template=False), tok, global_batch_size=8))
    sb = SequenceBatch(**batch)
    ids, mask = sb.input_ids, sb.attention_mask
    P = sb.completion_start
    for i, r in enumerate(rows):
        comp = enc(tok, r["completion"]) + [tok.eos_token_id]
        loss_pos = np.flatnonzero(batch["completion_mask"][i]) + P
        assert ids[i, loss_pos].tolist() == comp               # the loss sees exactly the completion
        assert mask[i, :P].sum() == len(enc(tok, r["prompt"]))  # prompt tokens attend but carry no loss


@pytest.mark.slow
def test_worker_processes_resume_exactly(tok, varied_file):
    cfg = cfg_for(varied_file, shuffle=True, num_workers=2)
    full = _take(make_iterator(cfg_for(varied_file, shuffle=True), tok, global_batch_size=4), 8)
    it = make_iterator(cfg, tok, global_batch_size=4)
    got = _take(it, 3)
    state = iterator_state_to_json(it.get_state())
    resumed = make_iterator(cfg, tok, global_batch_size=4)
    resumed.set_state(iterator_state_from_json(state))
    for want, have in zip(full, got + _take(resumed, 5)):
        for k in want:
            np.testing.assert_array_equal(want[k], have[k])


# ------------------------------------------- tokenizers and datasets as shipped (issue 12)

from shipped_tokenizers import build_llama3, build_qwen  # noqa: E402

from gold_jax.data.special_tokens import eos_token_ids  # noqa: E402
from gold_jax.data.tokenizer import save_tokenizer  # noqa: E402
from gold_jax.fingerprint import compare_tokenizers  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_llama3(str(tmp_path_factory.mktemp("llama3")))


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    return (build_qwen(str(tmp_path_factory.mktemp("qwen_instruct")), instruct=True),
            build_qwen(str(tmp_path_factory.mktemp("qwen_base")), instruct=False))


def test_tokenizer_without_pad_gets_one_as_the_ecosystem_does(llama_dir, tmp_path):
    """Issue 12.1: a reserved special token pads; else the EOS; only a tokenizer without EOS is refused."""
    tok = load_tokenizer(llama_dir)
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.pad_token_id not in eos_token_ids(tok)
    llama30 = load_tokenizer(build_llama3(str(tmp_path / "l30"), finetune_pad=False))
    assert llama30.pad_token == "<|reserved_special_token_0|>"
    bare = load_tokenizer(build_llama3(str(tmp_path / "bare"), reserved=False))
    assert bare.pad_token == "<|eot_id|>" and bare.pad_token_id == bare.eos_token_id
    # The pipeline pads with it and the masks say which positions are real.
    rows = [{"prompt": [{"role": "user", "content": question(i)}], "response": answer(i)} for i in range(4)]
    batch = next(make_iterator(cfg_for(write_parquet(tmp_path / "v.parquet", rows)), bare, global_batch_size=4))
    eot = bare.convert_tokens_to_ids("<|eot_id|>")
    for i in range(4):
        p, c = unpad(batch, i)
        assert p[0] == bare.bos_token_id and c[-1] == eot and c.count(eot) == 1
    # No EOS anywhere: refused, naming the folder.
    none_dir = build_llama3(str(tmp_path / "noeos"), reserved=False)
    with open(os.path.join(none_dir, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc.pop("eos_token")
    with open(os.path.join(none_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    for name in ("config.json", "generation_config.json"):
        os.remove(os.path.join(none_dir, name))
    with pytest.raises(ValueError, match="noeos.*no EOS"):
        load_tokenizer(none_dir)


def test_eos_set_read_whole_from_config_and_generation_config(llama_dir, qwen_dirs, tmp_path):
    """Issue 12.2: Llama 3.2 Instruct-style [end_of_text, eom, eot] and Qwen2.5 Instruct's two EOS ids."""
    tok = load_tokenizer(llama_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    assert eos_token_ids(tok) == (ids["<|eot_id|>"], ids["<|end_of_text|>"], ids["<|eom_id|>"])
    qi = load_tokenizer(qwen_dirs[0])
    assert eos_token_ids(qi) == tuple(qi.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    # A tokenizer folder apart from the model: the model folder's lists count too.
    tok_only = str(tmp_path / "tok_only")
    save_tokenizer(tok, tok_only)
    assert eos_token_ids(load_tokenizer(tok_only)) == (ids["<|eot_id|>"],)
    assert eos_token_ids(load_tokenizer(tok_only, model_dir=llama_dir)) == eos_token_ids(tok)
    # A templated completion ends at the last id of the set it holds (here <|eot_id|>, not the trailing text).
    rows = [{"prompt": [{"role": "user", "content": question(i)}], "response": answer(i)} for i in range(2)]
    path = write_parquet(tmp_path / "v.parquet", rows)
    examples, _ = tokenize_files(path, tok, cfg_for(path))
    assert [c[-1] for _, c in examples] == [ids["<|eot_id|>"]] * 2
    assert all(c[:-1].tolist() == enc(tok, answer(i)) for i, (_, c) in enumerate(examples))


def test_save_tokenizer_writes_no_loader_keys_nor_the_picked_pad(llama_dir, tmp_path):
    """Issue 12.16: the exported tokenizer_config.json reads as the shipped one."""
    tok = load_tokenizer(llama_dir)
    out = str(tmp_path / "export")
    save_tokenizer(tok, out)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        saved = json.load(f)
    assert not {"is_local", "local_files_only", "pad_token"} & set(saved)
    assert saved["eos_token"] == "<|eot_id|>" and saved["bos_token"] == "<|begin_of_text|>"
    assert load_tokenizer(out).get_vocab() == tok.get_vocab()
    # a pad the tokenizer shipped with is kept
    q = str(tmp_path / "q")
    save_tokenizer(load_tokenizer(build_qwen(str(tmp_path / "qsrc"))), q)
    with open(os.path.join(q, "tokenizer_config.json")) as f:
        assert json.load(f)["pad_token"] == "<|endoftext|>"


def test_prompt_only_rows_accepted_only_without_dataset_completions(tok, tmp_path):
    """Issue 12.3: a verl RL-style parquet (prompt, no response) for gold.lmbda=1 / seq_kd."""
    rows = [{"prompt": [{"role": "user", "content": question(i)}], "data_source": "x", "ability": "math"}
            for i in range(4)]
    path = write_parquet(tmp_path / "rl.parquet", rows)
    with pytest.raises(ValueError, match=r"data\.response_key='response'.*gold\.lmbda"):
        tokenize_files(path, tok, cfg_for(path))
    examples, stats = tokenize_files(path, tok, cfg_for(path), require_response=False)
    assert stats.rows_kept == 4 and stats.rows_dropped == 0
    for i, (p, c) in enumerate(examples):
        assert p.tolist() == enc(tok, chatml(rows[i]["prompt"], gen=True)) and c.tolist() == [tok.eos_token_id]
    batch = next(make_iterator(cfg_for(path), tok, global_batch_size=4, require_response=False))
    assert batch["prompt_mask"].sum() == sum(len(p) for p, _ in examples)
    # plain-string prompts as well; rows that do have a response keep it
    mixed = [{"prompt": question(0)}, {"prompt": question(1), "response": answer(1)}]
    mpath = write_jsonl(tmp_path / "plain.jsonl", mixed)
    ex, _ = tokenize_files(mpath, tok, cfg_for(mpath, format="prompt_completion"), require_response=False)
    assert [c.tolist() for _, c in ex] == [[tok.eos_token_id], enc(tok, answer(1)) + [tok.eos_token_id]]


def test_bad_rows_report_jsonl_line_numbers_and_parquet_row_indices(tok, tmp_path, caplog):
    """Issue 12.6: blank lines do not shift the reported position; the message says line or row."""
    from absl import logging as absl_logging
    good = {"text": "one two"}
    lines = [good, "", {"text": ""}, "", "", {"text": 3}, good, "", "{oops", {"text": ""}]
    path = write_jsonl(tmp_path / "gaps.jsonl", lines)
    absl_logging.get_absl_handler()
    with caplog.at_level("INFO"):
        _, stats = tokenize_files(path, tok, cfg_for(path))
    assert [(i, r) for _, i, r, _ in stats.bad_rows] == [
        (3, "empty_completion"), (6, "wrong_type"), (9, "invalid_json"), (10, "empty_completion")]
    assert "dropped line 6 of" in caplog.text
    ppath = write_parquet(tmp_path / "p.parquet", [{"text": "one"}, {"text": ""}, {"text": "two"}, {"text": ""}])
    with caplog.at_level("INFO"):
        _, pstats = tokenize_files(ppath, tok, cfg_for(ppath))
    assert [i for _, i, _, _ in pstats.bad_rows] == [1, 3] and "dropped row 3 of" in caplog.text
    # a setting that cannot work for the file names the line too
    conv = write_jsonl(tmp_path / "m.jsonl", ["", {"messages": [{"role": "user", "content": "q"},
                                                                {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValueError, match="m.jsonl.*line 2"):
        tokenize_files(conv, tok, cfg_for(conv, chat_template=False))


def test_plain_rows_are_not_templated_by_default(tok, tmp_path):
    """Issue 12.10: as TRL, only conversational rows get the chat template unless data.chat_template=True."""
    plain = [{"prompt": question(i), "completion": " " + answer(i)} for i in range(4)]
    path = write_jsonl(tmp_path / "p.jsonl", plain)
    assert default_data_config().chat_template == "auto"
    examples, _ = tokenize_files(path, tok, cfg_for(path))
    for i, (p, c) in enumerate(examples):
        assert p.tolist() == enc(tok, question(i)) and c.tolist() == enc(tok, " " + answer(i)) + [tok.eos_token_id]
    templated, _ = tokenize_files(path, tok, cfg_for(path, chat_template=True))
    assert templated[0][0].tolist() == enc(tok, chatml([{"role": "user", "content": question(0)}], gen=True))
    conv = [{"prompt": [{"role": "user", "content": question(0)}], "completion": [
        {"role": "assistant", "content": answer(0)}]}] * 2
    cpath = write_jsonl(tmp_path / "c.jsonl", conv)
    (p, _), *_ = tokenize_files(cpath, tok, cfg_for(cpath))[0]
    assert p.tolist() == enc(tok, chatml(conv[0]["prompt"], gen=True))
    with pytest.raises(ValueError, match="data.chat_template"):
        make_iterator(cfg_for(path, chat_template="yes"), tok, global_batch_size=2)


def test_chat_template_kwargs_reach_the_template(qwen_dirs, tmp_path):
    """Issue 12.16: data.chat_template_kwargs, e.g. Qwen3's enable_thinking=False."""
    tok = load_tokenizer(qwen_dirs[0])
    rows = [{"prompt": [{"role": "user", "content": question(i)}], "response": answer(i)} for i in range(2)]
    path = write_parquet(tmp_path / "v.parquet", rows)
    think = enc(tok, "<think>\n\n</think>\n\n")
    for kw in ({"enable_thinking": False}, '{"enable_thinking": false}'):
        examples, _ = tokenize_files(path, tok, cfg_for(path, chat_template_kwargs=kw))
        p = examples[0][0].tolist()
        assert p[-len(think):] == think and examples[0][1].tolist()[:-1] == enc(tok, answer(0))
    plain, _ = tokenize_files(path, tok, cfg_for(path))
    assert plain[0][0].tolist()[-len(think):] != think
    with pytest.raises(ValueError, match="data.chat_template_kwargs"):
        tokenize_files(path, tok, cfg_for(path, chat_template_kwargs="[1, 2]"))


def test_messages_row_with_empty_user_turn_is_treated_like_verl(tok, tmp_path):
    """Issue 12.16: the same empty prompt gives the same verdict in both formats."""
    good = [{"role": "user", "content": question(1)}]
    verl = [{"prompt": [{"role": "user", "content": ""}], "response": "x"}, {"prompt": good, "response": answer(1)}]
    msgs = [{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]},
            {"messages": good + [{"role": "assistant", "content": answer(1)}]}]
    _, vs = tokenize_files(p := write_jsonl(tmp_path / "v.jsonl", verl), tok, cfg_for(p))
    _, ms = tokenize_files(p := write_jsonl(tmp_path / "m.jsonl", msgs), tok, cfg_for(p))
    assert [(i, r) for _, i, r, _ in vs.bad_rows] == [(i, r) for _, i, r, _ in ms.bad_rows] == [(1, "empty_prompt")]


def test_tokenizer_check_compares_the_vocabulary_not_special_roles(llama_dir, qwen_dirs):
    """Issue 12.11: Qwen2.5 Base vs Instruct (same vocabulary, other EOS) pass with a warning."""
    instruct, base = load_tokenizer(qwen_dirs[0]), load_tokenizer(qwen_dirs[1])
    assert instruct.eos_token != base.eos_token
    assert tokenizer_fingerprint(instruct) == tokenizer_fingerprint(base)
    warnings = compare_tokenizers(instruct, base)
    assert len(warnings) == 1 and "eos_token '<|endoftext|>'" in warnings[0] and "'<|im_end|>'" in warnings[0]
    llama = load_tokenizer(llama_dir)
    assert tokenizer_fingerprint(llama) != tokenizer_fingerprint(instruct)
    with pytest.raises(ValueError, match=r"sizes differ: student 312 ids, teacher 303.*ids differ, first 300: "
                                         r"student '<\|begin_of_text\|>' vs teacher '<\|endoftext\|>'.*special tokens"):
        compare_tokenizers(llama, instruct)


def test_components_require_completions_only_when_off_policy_steps_use_them(tok, tmp_path):
    """Issue 12.3: the trainer's data wiring passes require_response from gold.lmbda / gold.seq_kd."""
    from gold_jax import config as config_lib
    from gold_jax.components import make_data
    rows = [{"prompt": [{"role": "user", "content": question(i)}]} for i in range(4)]
    cfg = config_lib.base_config()
    cfg.data.train_files = write_parquet(tmp_path / "rl.parquet", rows)
    cfg.trainer.global_batch_size = 4
    cfg.gold.lmbda = 1.0
    assert len(make_data(cfg, tok)) > 0
    cfg.gold.lmbda = 0.5
    with pytest.raises(ValueError, match=r"data\.response_key.*gold\.lmbda"):
        make_data(cfg, tok)
    cfg.gold.seq_kd = True
    assert len(make_data(cfg, tok)) > 0
