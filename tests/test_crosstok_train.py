"""Cross-tokenizer distillation in the train step and the trainer (issue 15).

- one tokenizer on both sides, through the server: the hybrid loss (adaptive weights (1, 0)) is the
  top-k tail JSD of the usual path to 1e-6;
- the "uld" table row on a batch of another tokenizer's teacher: sharded step == unsharded step, and
  uld_crossentropy_weight adds the float64 NLL;
- a trainer run whose teacher (served in process) has another tokenizer: finite loss, gold/unaligned_frac
  logged and 0 on the demo task (byte-level BPEs agree on every byte boundary they share).
"""
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gold_jax.batches import train_arrays, unaligned_counts
from gold_jax.crosstok.request import CrossSpec, loss_settings, score_rows, student_request, vocab_map_for
from gold_jax.data.special_tokens import eos_token_ids
from gold_jax.fingerprint import tokenizer_fingerprint
from gold_jax.models import ModelConfig, init_model
from gold_jax.models.partition import shard_model
from gold_jax.sharding import make_mesh
from gold_jax.teacher import TeacherClient, start_local_teacher
from gold_jax.teacher import protocol as P
from gold_jax.teacher.backends.jax_backend import JaxBackend
from gold_jax.train_step import LossSpec, batch_sharding, eval_loss, grads_and_loss
from gold_jax.types import TeacherScores
from test_crosstok_wire import COMPLETIONS, PROMPTS, make_seq, teacher_model
from tiny_tokenizer import tiny_tokenizer

S_VOCAB, T_VOCAB, K, TEMP = 512, 384, 8, 0.8
ROWS_P, ROWS_C = PROMPTS * 2, COMPLETIONS + COMPLETIONS[::-1]   # 4 rows: the batch splits over data x fsdp


def gold(**kw):
    g = ml_collections.ConfigDict(dict(uld_use_hybrid_loss=True, uld_hybrid_matched_weight=None,
                                       uld_hybrid_unmatched_weight=None, uld_crossentropy_weight=0.0,
                                       uld_distillation_weight=1.0, uld_student_temperature=TEMP))
    g.update(kw)
    return g


@pytest.fixture(scope="module")
def student():
    tok = tiny_tokenizer(S_VOCAB)
    cfg = ModelConfig(architecture="qwen3", vocab_size=len(tok.get_vocab()) + 8, hidden_size=32,
                      intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, qk_norm=True,
                      max_position_embeddings=128)
    return tok, cfg


@functools.lru_cache(maxsize=None)
def other_tokenizer():
    """A teacher tokenizer trained on another corpus: some of its tokens have no student twin (hybrid's ULD part)."""
    from gold_jax.data.tokenizer import load_tokenizer, train_tokenizer
    from tiny_tokenizer import tiny_corpus
    path = tempfile.mkdtemp(prefix="gold_jax_xtok_teacher_")
    train_tokenizer(tiny_corpus(300, seed=11) + ["quantum zebra jazz quiz " * 3] * 20, T_VOCAB, out_dir=path)
    return load_tokenizer(path)


def _spec(tok, vm, **kw):
    return CrossSpec(tok, vm, eos_token_ids(tok), student_fingerprint=tokenizer_fingerprint(tok), **kw)


@pytest.fixture(scope="module")
def same_tokenizer_scores(student):
    """Cross and plain top-k scores of one batch from a teacher that shares the student's tokenizer."""
    tok, cfg = student
    backend = JaxBackend(teacher_model(len(tok.get_vocab()), seed=5), tok, model_name="same")
    seq = make_seq(tok, ROWS_P, ROWS_C)
    with start_local_teacher(None, backend=backend, workers=1, heartbeat_timeout_s=30.0) as t, \
            TeacherClient(t.address, timeout_s=60.0) as client:
        vm = vocab_map_for(tok, client.vocab(), student_vocab_size=cfg.vocab_size,
                           teacher_vocab_size=client.info()["vocab_size"])
        spec = _spec(tok, vm, skip_student_eos=False, skip_teacher_eos=False)
        cross = client.score(seq, top_k=K, temperature=TEMP, signal="cross", cross=spec).result(120)
        topk = client.score(seq, top_k=K, temperature=TEMP).result(120)
    return seq, vm, cross, topk


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_same_tokenizer_hybrid_is_the_jsd_through_the_wire(student, same_tokenizer_scores, beta):
    tok, cfg = student
    seq, vm, cross, topk = same_tokenizer_scores
    assert vm.adaptive_weights() == (1.0, 0.0)
    assert unaligned_counts(cross) == (0, int(seq.completion_mask.sum()))
    a_c, a_t = train_arrays(seq, cross), train_arrays(seq, topk)
    np.testing.assert_array_equal(a_c["loss_mask"], seq.completion_mask)   # one span per token
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    v = len(tok.get_vocab())
    s_c = LossSpec(impl="uld", beta=beta, temperature=TEMP, vocab_size=v, **loss_settings(gold(), vm))
    s_t = LossSpec(impl="topk", beta=beta, temperature=TEMP, vocab_size=v)
    got, n = eval_loss(params, {k: jnp.asarray(x) for k, x in a_c.items()}, graphdef=graphdef, spec=s_c)
    want, _ = eval_loss(params, {k: jnp.asarray(x) for k, x in a_t.items()}, graphdef=graphdef, spec=s_t)
    assert float(want) > 0
    np.testing.assert_allclose(float(got) / float(n), float(want) / float(n), atol=1e-6)


@pytest.fixture(scope="module")
def cross_batch(student):
    """A train batch scored by a teacher of another tokenizer (score_rows without a server: the wire is
    tests/test_crosstok_wire.py), its VocabMap and the student config."""
    tok, cfg = student
    t_tok = other_tokenizer()
    backend = JaxBackend(teacher_model(len(t_tok.get_vocab()), seed=6), t_tok, model_name="other")
    seq = make_seq(tok, ROWS_P, ["quantum zebra jazz, " + c for c in ROWS_C], r_len=32)
    req = student_request(tok, seq.prompt_ids, seq.prompt_mask, seq.completion_ids, seq.completion_mask,
                          eos_ids=eos_token_ids(tok))
    a = P.validate_score(P.decode(P.encode_request("r", "score", {"signal": "cross", "top_k": K, "temperature": 1.0},
                                                   req)), backend.info())
    out = score_rows(backend, t_tok, a["pieces"], a["student_ends"], top_k=K, temperature=1.0, strategy="observed",
                     skip_teacher_eos=True, eos_ids=eos_token_ids(t_tok), max_length=128)
    vm = vocab_map_for(tok, t_tok.get_vocab(), student_vocab_size=cfg.vocab_size,
                       teacher_vocab_size=len(t_tok.get_vocab()))
    scores = TeacherScores(out["logprobs"], vm.map_ids(out["ids"]), out["topk_logmass"], None,
                           cross={k: out[k] for k in ("logscale", "span_id", "span_base", "loss_mask", "unaligned",
                                                      "scored")})
    arrays = train_arrays(seq, scores)
    assert (arrays["teacher_student_ids"] >= 0).any() and (arrays["teacher_student_ids"][arrays["loss_mask"] > 0]
                                                           < 0).any()
    inside = (arrays["span_id"] >= 0) & (arrays["loss_mask"] == 0)   # positions merged into a span's base
    assert inside.any() and out["unaligned"].sum() == 0
    return arrays, vm, cfg


def test_uld_sharded_grads_match_unsharded(cross_batch, devices):
    """The "uld" row under jit on a data x tensor mesh (params and batch sharded) == unsharded: loss and grads."""
    arrays, vm, cfg = cross_batch
    spec = LossSpec(impl="uld", beta=0.5, vocab_size=S_VOCAB, **loss_settings(gold(uld_hybrid_matched_weight=0.6,
                                                                                  uld_hybrid_unmatched_weight=0.4), vm))
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}

    def run(mesh):
        m = init_model(cfg, seed=0)
        if mesh is not None:
            shard_model(m, mesh)
        graphdef, params = nnx.split(m)
        b = batch if mesh is None else jax.device_put(batch, batch_sharding(mesh))
        loss, grads, _ = jax.jit(lambda p, x: grads_and_loss(graphdef, p, x, spec, 1, mesh))(params, b)
        return float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

    l0, g0 = run(None)
    l1, g1 = run(make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=devices[:4]))
    assert np.isfinite(l0) and l0 > 0 and np.abs(g0).max() > 0
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6 * np.abs(g0).max())


def test_crossentropy_weight_adds_the_float64_nll(cross_batch):
    """uld_distillation_weight x the distillation term + uld_crossentropy_weight x the NLL (eager: no compile)."""
    from gold_jax.losses.adapters import uld_loss_sum
    arrays, vm, cfg = cross_batch
    model = init_model(cfg, seed=0)
    b = {k: jnp.asarray(v) for k, v in arrays.items()}
    r = arrays["completion_mask"].shape[1]
    hidden = model.hidden(b["input_ids"], b["attention_mask"])[:, -r - 1:-1]
    spec = lambda **kw: LossSpec(impl="uld", vocab_size=S_VOCAB, **loss_settings(gold(**kw), vm))  # noqa: E731
    base = float(uld_loss_sum(model, hidden, b, spec(), None))
    both = float(uld_loss_sum(model, hidden, b, spec(uld_crossentropy_weight=0.3, uld_distillation_weight=2.0), None))
    logits = np.asarray(model.logits_from_hidden(hidden), np.float64)[..., :S_VOCAB]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ids = arrays["input_ids"][:, -r:]
    nll = -(np.take_along_axis(logp, ids[..., None], -1)[..., 0] * arrays["completion_mask"]).sum()
    assert base > 0 and nll > 0
    np.testing.assert_allclose(both, 2.0 * base + 0.3 * nll, rtol=2e-5)


# ---------------------------------------------------------------- the trainer, end to end
@pytest.mark.slow   # 58 s: a second end-to-end trainer run; the server fields and loss tests above stay in the default suite
def test_trainer_with_a_teacher_of_another_tokenizer(tiny_run_config, tmp_path_factory):
    import run_builder
    from gold_jax.metrics import read_jsonl
    from gold_jax.trainer import Trainer
    root = tmp_path_factory.mktemp("xtok")
    teacher = run_builder.tiny_model_dir(str(root), "teacher384", other_tokenizer(), hidden=48, layers=1, seed=2)
    cfg = tiny_run_config(str(root / "run"), **{"model.teacher_path": teacher, "trainer.max_steps": 3,
                                                  "gold.cross_tokenizer": True, "gold.uld_use_hybrid_loss": True,
                                                  "teacher.cache_dir": str(root / "cache"), "checkpoint.every": 0})
    Trainer(cfg).run()
    recs = read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert np.isfinite(r["actor/jsd_loss"]) and r["actor/jsd_loss"] > 0
        assert r["gold/unaligned_frac"] == 0.0
    # a tokenizer mismatch without the key: today's refusal, naming it
    cfg2 = tiny_run_config(str(root / "run2"), **{"model.teacher_path": teacher, "trainer.max_steps": 1})
    with pytest.raises(ValueError, match="gold.cross_tokenizer"):
        Trainer(cfg2)
