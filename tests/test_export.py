"""Export keeps the student's own dtype (bf16 in, bf16 out) or the one --dtype names; the files load back."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

import run_builder
from tiny_tokenizer import tiny_tokenizer


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A run whose student was shipped in bfloat16; its checkpoint holds float32 weights (student + noise)."""
    root = str(tmp_path_factory.mktemp("export"))
    tok = tiny_tokenizer()
    student = run_builder.tiny_model_dir(root, "student", tok, hidden=32, layers=1, seed=1, dtype="bfloat16")
    teacher = run_builder.tiny_model_dir(root, "teacher", tok, hidden=32, layers=1, seed=2)
    train, val = run_builder.demo_task_files(root)
    cfg = run_builder.tiny_config(os.path.join(root, "run"), **{
        "model.student_path": student, "model.teacher_path": teacher, "data.train_files": train,
        "data.val_files": val})
    return dict(root=root, student=student, run=run_builder.make_run(cfg, step=3, noise=0.01))


@pytest.fixture(scope="module")
def exported(bf16_run):
    from gold_jax.export import export
    root = bf16_run["root"]
    return {d: export(bf16_run["run"], os.path.join(root, f"hf_{d}"), dtype=d)
            for d in ("auto", "float32", "float16")}


def test_model_dtype_reads_config_then_safetensors_header(bf16_run, tmp_path):
    from safetensors.numpy import save_file

    from gold_jax.export import model_dtype, resolve_export_dtype
    assert model_dtype(bf16_run["student"]) == "bfloat16"
    save_file({"w": np.ones((2, 2), np.float16)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))   # no torch_dtype: the header
    assert model_dtype(str(tmp_path)) == "float16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))     # transformers v5's key
    assert model_dtype(str(tmp_path)) == "bfloat16"
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_export_dtype("auto", str(tmp_path)) == "float32"             # nothing says: float32
    with pytest.raises(ValueError, match="--dtype"):
        resolve_export_dtype("int8", str(tmp_path))


def test_bf16_student_exports_as_bf16_at_half_the_size(exported):
    auto, f32, f16 = (os.path.join(exported[d], "model.safetensors") for d in ("auto", "float32", "float16"))
    assert {v["dtype"] for v in _header(auto).values()} == {"BF16"}
    assert {v["dtype"] for v in _header(f32).values()} == {"F32"}
    assert {v["dtype"] for v in _header(f16).values()} == {"F16"}
    assert json.load(open(os.path.join(exported["auto"], "config.json")))["torch_dtype"] == "bfloat16"
    assert json.load(open(os.path.join(exported["float32"], "config.json")))["torch_dtype"] == "float32"
    ratio = os.path.getsize(auto) / os.path.getsize(f32)
    assert 0.45 < ratio < 0.55, ratio


def test_bf16_export_holds_the_checkpoint_rounded_to_bf16(bf16_run, exported):
    """Our loader reads the export back: exactly the checkpoint's float32 weights rounded to bfloat16."""
    import ml_dtypes
    from safetensors.numpy import load_file

    from gold_jax.export import load_student
    from gold_jax.models.hf_io import to_hf_state_dict
    model, _, _ = load_student(bf16_run["run"])
    ckpt = to_hf_state_dict(model)                       # float32, HF names and layouts
    back = load_file(os.path.join(exported["auto"], "model.safetensors"))
    assert sorted(back) == sorted(ckpt)
    for name, x in ckpt.items():
        assert x.dtype == np.float32
        np.testing.assert_array_equal(back[name], x.astype(ml_dtypes.bfloat16), err_msg=name)
    # The noise added to the checkpoint survives: the export is the trained student, not the original.
    orig = load_file(os.path.join(bf16_run["student"], "model.safetensors"))
    assert any(not np.array_equal(orig[k], back[k]) for k in back)


def test_bf16_export_loads_in_transformers(bf16_run, exported):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gold_jax.data import load_tokenizer
    from gold_jax.models.hf_io import load_pretrained
    out = exported["auto"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(hf.parameters()).dtype == torch.bfloat16
    hf = hf.float()
    ours = load_pretrained(out, dtype="float32")   # the same bf16 weights, float32 compute on both sides
    ids = np.asarray([load_tokenizer(out)("Sort: 3 1 2")["input_ids"]], np.int32)
    theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(ours(ids, np.ones_like(ids))), theirs, atol=1e-4)
