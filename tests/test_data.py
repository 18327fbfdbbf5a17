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
    cfg = cfg_for(write_jsonl(tmp_path / "p.jsonl", plain), apply_chat_template=False)
    _check_rows(tok, cfg, [(question(i), " " + answer(i), True) for i in range(8)])
    # plain strings with the chat template on: a user turn and an assistant turn
    cfg = cfg_for(str(tmp_path / "p.jsonl"), format="prompt_completion")
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
        cfg = cfg_for(path, apply_chat_template=False, max_prompt_length=10, max_response_length=8,
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
    assert got == {1: "missing_column", 2: "empty_completion", 3: "wrong_type", 4: "prompt_too_long",
                   5: "invalid_json", 6: "wrong_type"}
    assert stats.to_dict()["dropped"]["wrong_type"] == 2
    # a messages row whose last turn is not the assistant's
    mpath = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"}]},
                                               {"messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": "a"}]}])
    _, mstats = tokenize_files(mpath, tok, cfg_for(mpath))
    assert mstats.bad_rows[0][1:3] == (0, "no_assistant_completion")


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
    assert len(examples) == 3 and [(i, r) for _, i, r, _ in stats.bad_rows] == [(0, "missing_column")]


def test_invalid_utf8_line_and_corrupt_parquet_are_named(tok, tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "one two"}\n{"text": "\xff\xfe"}\n{"text": "three four"}\n')
    examples, stats = tokenize_files(str(path), tok, cfg_for(str(path)))
    assert len(examples) == 2 and [(i, r) for _, i, r, _ in stats.bad_rows] == [(1, "invalid_utf8")]
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
    cfg = cfg_for(path, apply_chat_template=False, max_response_length=12, response_truncation="drop")
    absl_logging.get_absl_handler()  # make absl log through the std logging tree that caplog watches
    with caplog.at_level("INFO"):
        examples, stats = tokenize_files(path, tok, cfg)
    assert len(examples) == 3 and stats.dropped == {"response_too_long": 3}
    assert sorted(i for _, i, _, _ in stats.bad_rows) == [1, 3, 5]
    text = caplog.text
    assert "dropped row 1 of" in text and "r.jsonl" in text and "'rows_dropped': 3" in text
    assert all(len(c) <= 12 for _, c in examples)


def test_conversational_without_chat_template_names_the_file(tok, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValueError, match="m.jsonl.*apply_chat_template"):
        tokenize_files(path, tok, cfg_for(path, apply_chat_template=False))


def test_completion_mask_marks_exactly_the_completion_tokens(tok, tmp_path):
    """Per-position check on the concatenated model input, as the loss sees it."""
    rows = [{"prompt": question(i) * (1 + i % 3), "completion": answer(i) * (1 + i % 2)} for i in range(8)]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    batch = next(make_iterator(cfg_for(path, apply_chat_template=False), tok, global_batch_size=8))
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
