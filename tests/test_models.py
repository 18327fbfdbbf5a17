"""Decoder parity with transformers (PyTorch), HF round trip, KV cache, sharding.

One module-scoped fixture per architecture: a tiny random HF model whose every
parameter (norms and biases included) is perturbed, saved with HF's own
save_pretrained and loaded by gold_jax without torch.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gold_jax.models import Decoder, ModelConfig, default_positions, hf_io  # noqa: E402
from gold_jax.models.partition import shard_model, state_shardings  # noqa: E402
from gold_jax.sharding import make_mesh  # noqa: E402

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=128)
HF_CONFIGS = {
    # llama3 rope scaling with a short original context so every frequency band is hit
    "llama": lambda: transformers.LlamaConfig(
        **TINY, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, rope_theta=1000000.0),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, tie_word_embeddings=True),
}
ARCHS = sorted(HF_CONFIGS)


def _hf_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = HF_CONFIGS[arch]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # random norms and biases too, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """(arch, hf_model, hf_dir, our Decoder loaded from hf_dir)."""
    arch = request.param
    hf = _hf_model(arch)
    path = str(tmp_path_factory.mktemp(f"hf_{arch}"))
    hf.save_pretrained(path)
    return arch, hf, path, hf_io.load_pretrained(path)


def _batch(seed=0, b=3, length=12, vocab=300):
    """Rows: left-padded, right-padded, both."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(b, length)).astype(np.int32)
    mask = np.ones((b, length), np.int32)
    mask[0, :4] = 0
    mask[1, -3:] = 0
    mask[2, :2] = 0
    mask[2, -2:] = 0
    return ids, mask


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def _hf_logits(hf, ids, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


def test_config_from_hf(pair):
    arch, hf, _, model = pair
    cfg = model.config
    assert cfg.architecture == arch
    assert cfg.qk_norm == (arch == "qwen3")
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.tie_word_embeddings == (arch == "qwen3")
    assert cfg.rope_type == ("llama3" if arch == "llama" else "default")
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (2, 16, 2)


def test_parity_with_transformers(pair):
    arch, hf, _, model = pair
    ids, mask = _batch()
    ours = np.asarray(_forward(model, ids, mask))
    ref = _hf_logits(hf, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    real = mask.astype(bool)
    err = np.abs(ours - ref)[real].max()
    assert err < 1e-4, f"{arch}: max abs logit diff {err}"
    assert np.isfinite(ours).all()  # padded positions stay finite (no NaN from empty rows)


def test_round_trip_identical_tensors(pair, tmp_path):
    arch, hf, _, model = pair
    hf_io.save_pretrained(model, str(tmp_path))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    a, b = hf.state_dict(), again.state_dict()
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    ours = hf_io.to_hf_state_dict(model)
    expected = {k for k in a if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert set(ours) == expected
    back = hf_io.config_from_hf(json.load(open(tmp_path / "config.json")))
    assert back == model.config


def test_kv_cache_decode_matches_full_forward(pair):
    """Prefill a left-padded prompt, then decode the rest one token at a time."""
    arch, _, _, model = pair
    ids, mask = _batch(seed=1)
    mask[:, -3:] = 1  # completion columns are real; left padding stays
    p, total = 6, ids.shape[1]
    max_len = total + 2
    full = np.asarray(_forward(model, ids, mask))
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tok, pos, cache, index, kv_mask):
        m = nnx.merge(graphdef, state)
        return m.forward_with_cache(tok, pos, cache, index, kv_mask)

    positions = np.asarray(default_positions(jnp.asarray(mask)))
    kv_mask = np.zeros((ids.shape[0], max_len), np.int32)
    kv_mask[:, :p] = mask[:, :p]
    cache = model.init_cache(ids.shape[0], max_len)
    logits, cache = step(state, ids[:, :p], positions[:, :p], cache, 0, kv_mask)
    real = mask[:, :p].astype(bool)
    assert np.abs(np.asarray(logits) - full[:, :p])[real].max() < 1e-4
    for t in range(p, total):
        kv_mask[:, t] = mask[:, t]
        logits, cache = step(state, ids[:, t:t + 1], positions[:, t:t + 1], cache,
                             jnp.int32(t), kv_mask)
        err = np.abs(np.asarray(logits)[:, 0] - full[:, t])[mask[:, t] == 1].max()
        assert err < 1e-4, f"{arch}: decode step {t} differs by {err}"


def test_decode_inside_scan(pair):
    """The sampler's pattern: graphdef/state closed over, decode in lax.scan (traced index)."""
    arch, _, _, model = pair
    if arch != "qwen3":
        pytest.skip("one architecture is enough for the scan pattern")
    ids, mask = _batch(seed=2)
    mask[:] = 1
    mask[0, :3] = 0
    p, total = 5, ids.shape[1]
    full = np.asarray(_forward(model, ids, mask))
    graphdef, state = nnx.split(model)
    positions = default_positions(jnp.asarray(mask))
    kv_mask = jnp.zeros((ids.shape[0], total), jnp.int32).at[:, :p].set(mask[:, :p])

    @jax.jit
    def run(state, cache, kv_mask):
        m = nnx.merge(graphdef, state)
        _, cache = m.forward_with_cache(ids[:, :p], positions[:, :p], cache, 0, kv_mask)

        def body(carry, t):
            cache, kv_mask = carry
            kv_mask = kv_mask.at[:, t].set(1)
            tok = jax.lax.dynamic_slice_in_dim(jnp.asarray(ids), t, 1, axis=1)
            pos = jax.lax.dynamic_slice_in_dim(positions, t, 1, axis=1)
            lg, cache = nnx.merge(graphdef, state).forward_with_cache(tok, pos, cache, t, kv_mask)
            return (cache, kv_mask), lg[:, 0]

        _, out = jax.lax.scan(body, (cache, kv_mask), jnp.arange(p, total))
        return jnp.swapaxes(out, 0, 1)

    out = np.asarray(run(state, model.init_cache(ids.shape[0], total), kv_mask))
    np.testing.assert_allclose(out, full[:, p:], atol=1e-4, rtol=0)


def test_sharded_forward_matches_unsharded(pair):
    arch, _, path, model = pair
    if arch != "llama":
        pytest.skip("sharding is architecture independent; llama covers it")
    ids, mask = _batch(b=4)
    ref = np.asarray(_forward(model, ids, mask))
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    sharded = shard_model(hf_io.load_pretrained(path), mesh)
    q = sharded.layers[0].self_attn.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    # 2 kv heads do not divide tensor=4: that dim stays replicated instead of failing.
    assert state_shardings(sharded, mesh)["layers"][0]["self_attn"]["k_proj"].get_value().spec == \
        jax.sharding.PartitionSpec("fsdp", None, None)
    shardings = state_shardings(sharded, mesh)
    graphdef, state = nnx.split(sharded)

    @jax.jit
    def fwd(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    fwd = jax.jit(fwd, in_shardings=(shardings, None, None))
    out = np.asarray(fwd(state, ids, mask))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
    # load_pretrained(mesh=...) places each tensor directly
    direct = hf_io.load_pretrained(path, mesh=mesh)
    assert direct.lm_head[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_sharded_safetensors_index(pair, tmp_path):
    """Split the HF state over two files with an index.json; the loader follows the map."""
    from safetensors.numpy import save_file
    arch, hf, path, model = pair
    if arch != "qwen2":
        pytest.skip("one architecture covers the index format")
    sd = hf_io.to_hf_state_dict(model)
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in chunk}, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in chunk})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(hf_io.hf_config_dict(model.config)))
    loaded = hf_io.to_hf_state_dict(hf_io.load_pretrained(str(tmp_path)))
    for k in names:
        np.testing.assert_array_equal(loaded[k], sd[k], err_msg=k)
    # transformers reads the same sharded folder
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).state_dict()
    np.testing.assert_array_equal(again["model.norm.weight"].numpy(), sd["model.norm.weight"])


def test_missing_and_unknown(pair, tmp_path):
    from safetensors.numpy import save_file
    arch, _, path, model = pair
    if arch != "llama":
        pytest.skip("error paths are architecture independent")
    sd = hf_io.to_hf_state_dict(model)
    dropped = "model.layers.1.mlp.up_proj.weight"
    sd.pop(dropped)
    sd["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf_io.hf_config_dict(model.config)))
    with pytest.raises(ValueError, match=r"missing 1 tensors.*up_proj.*unexpected.*model.extra"):
        hf_io.load_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"supported.*llama.*qwen2.*qwen3"):
        hf_io.config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="no config.json"):
        hf_io.load_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="attention_mask"):
        model(np.zeros((2, 4), np.int32), np.ones((2, 5), np.int32))
    with pytest.raises(ValueError, match="kv_mask"):
        model.forward_with_cache(np.zeros((2, 1), np.int32), np.zeros((2, 1), np.int32),
                                 model.init_cache(2, 8), 0, np.ones((2, 7), np.int32))


def test_model_config_validation():
    base = dict(architecture="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    cfg = ModelConfig(**base)
    assert cfg.replace(remat="dots").remat == "dots" and cfg.remat == "none"
    assert hash(cfg.replace(rope_scaling={"rope_type": "default"})) is not None
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(**{**base, "architecture": "gpt2"})
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(**{**base, "remat": "some"})
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig(**{**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(TypeError, match="cfg"):
        Decoder({"architecture": "llama"}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("head_dim,theta,factor,lo,hi,orig", [
    (16, 500000.0, 8.0, 1.0, 4.0, 16),     # the parity fixture's config
    (64, 10000.0, 8.0, 1.0, 4.0, 64),      # wavelengths in all three llama3 bands
    (128, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2's values
])
def test_llama3_rope_frequencies_match_transformers(head_dim, theta, factor, lo, hi, orig):
    from gold_jax.models.layers import rope_inv_freq
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo,
               "high_freq_factor": hi, "original_max_position_embeddings": orig}
    hf_cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      rope_theta=theta, rope_scaling=scaling)
    want = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")[0].double().numpy()
    cfg = ModelConfig(architecture="llama", vocab_size=8, hidden_size=4 * head_dim, intermediate_size=8,
                      num_layers=1, num_heads=4, num_kv_heads=4, head_dim=head_dim, rope_theta=theta,
                      rope_scaling=scaling)
    got = rope_inv_freq(cfg)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))
    assert not np.allclose(got, plain), "llama3 scaling must change some frequencies"
    if orig == 64:  # every band: unchanged (high freq), divided by factor (low), smoothed between
        ratio = plain / got
        assert np.isclose(ratio, 1).any() and np.isclose(ratio, factor).any()
        assert ((ratio > 1.01) & (ratio < factor - 0.01)).any()


def test_parity_at_large_positions(pair):
    """Positions far past llama3's original context (16) and rope at 10^4: still < 1e-4."""
    arch, hf, _, model = pair
    if arch == "qwen2":
        pytest.skip("llama (llama3 rope) and qwen3 (qk-norm before rope) cover it")
    ids, mask = _batch(seed=3)
    pos = np.asarray(default_positions(jnp.asarray(mask))) + 100
    ours = np.asarray(jax.jit(lambda i, m, p: model(i, m, p))(ids, mask, pos))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()
    err = np.abs(ours - ref)[mask.astype(bool)].max()
    assert err < 1e-4, f"{arch}: max abs logit diff {err} at positions >= 100"


def _ce_grads(model):
    """Gradients of a masked next-token cross-entropy (the training-step shape of work)."""
    ids, mask = _batch(seed=4)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, mask)[:, :-1]
        lp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(lp, jnp.asarray(ids)[:, 1:, None], -1)[..., 0]
        w = jnp.asarray(mask[:, 1:] * mask[:, :-1], jnp.float32)
        return jnp.sum(nll * w) / jnp.sum(w)

    return jax.jit(jax.value_and_grad(loss)), params


def test_remat_policies_give_the_same_gradients(pair):
    """remat="full" / "dots" (by name in ModelConfig) recompute per layer; values unchanged."""
    arch, _, _, model = pair
    if arch != "qwen3":
        pytest.skip("remat wraps whole layers; one architecture (with qk-norm) covers it")
    step, params = _ce_grads(model)
    want_loss, want = step(params)
    for policy in ("full", "dots"):
        m = Decoder(model.config.replace(remat=policy), rngs=nnx.Rngs(0))
        nnx.update(m, nnx.state(model))
        step_r, params_r = _ce_grads(m)
        jaxpr = str(jax.make_jaxpr(step_r)(params_r))
        assert "remat" in jaxpr or "checkpoint" in jaxpr, f"{policy}: no remat in the jaxpr"
        got_loss, got = step_r(params_r)
        np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7,
                                       err_msg=f"{policy} {jax.tree_util.keystr(path)}")
    assert "remat" not in str(jax.make_jaxpr(step)(params))


def test_dense_vjp_matches_einsum_autodiff():
    """The hand-written VJP of layers.dense against autodiff of jnp.einsum, float64 NumPy values."""
    from gold_jax.models.layers import dense
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)   # [B, T, N, D]
    w = rng.standard_normal((4, 5, 6)).astype(np.float32)      # o_proj-like: [N, D, H]
    g = rng.standard_normal((2, 3, 6)).astype(np.float32)
    y, vjp = jax.vjp(lambda x, w: dense(x, w, n_in=2), x, w)
    dx, dw = vjp(jnp.asarray(g))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    np.testing.assert_allclose(np.asarray(y), np.einsum("btnd,ndh->bth", x64, w64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.einsum("bth,ndh->btnd", g64, w64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("btnd,bth->ndh", x64, g64), rtol=1e-5, atol=1e-5)
    # bfloat16 compute with float32 logits (the LM head): output and input grads keep their dtypes
    xb, wb = jnp.asarray(x[..., 0, :], jnp.bfloat16), jnp.asarray(w[0], jnp.bfloat16)
    yb, vjp_b = jax.vjp(lambda x, w: dense(x, w, out_dtype=jnp.float32), xb, wb)
    assert yb.dtype == jnp.float32
    dxb, dwb = vjp_b(jnp.ones_like(yb))
    assert dxb.dtype == jnp.bfloat16 and dwb.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dense"):
        dense(jnp.ones((2, 3)), jnp.ones((4, 5)))


# ------------------------------------------------ checkpoints as shipped (issue 12)

def _tiny_config(**kw):
    return ModelConfig(architecture="llama", vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8, **kw)


def test_eos_id_lists_survive_load_and_save(tmp_path):
    """Issue 12.2: Llama 3.2 Instruct-style eos_token_id lists are kept whole, read and written."""
    from gold_jax.models import init_model
    base = hf_io.hf_config_dict(_tiny_config())
    for eos in ([1, 8, 9], 9, [9]):
        cfg = hf_io.config_from_hf({**base, "eos_token_id": eos})
        assert cfg.eos_token_id == (tuple(eos) if isinstance(eos, list) else eos)
        assert hf_io.hf_config_dict(cfg)["eos_token_id"] == eos and hash(cfg)
    assert ModelConfig(**{**_tiny_config().__dict__, "eos_token_id": [1, 2]}).eos_token_id == (1, 2)
    model = init_model(_tiny_config(eos_token_id=(1, 8, 9), bos_token_id=0), seed=0)
    hf_io.save_pretrained(model, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["eos_token_id"] == [1, 8, 9]
    assert transformers.AutoConfig.from_pretrained(str(tmp_path)).eos_token_id == [1, 8, 9]
    assert hf_io.load_pretrained(str(tmp_path)).config.eos_token_id == (1, 8, 9)


def test_exported_generation_config_keeps_the_eos_list(tmp_path):
    """Issue 12.2: the student's own generation_config.json is written back unchanged, else the full set."""
    from shipped_tokenizers import build_llama3

    from gold_jax.data import load_tokenizer
    src = build_llama3(str(tmp_path / "llama"))
    with open(os.path.join(src, "generation_config.json")) as f:
        shipped = json.load(f)
    assert isinstance(shipped["eos_token_id"], list) and len(shipped["eos_token_id"]) == 3
    tok = load_tokenizer(src)
    assert hf_io.generation_config_dict(src, tok) == shipped
    os.remove(os.path.join(src, "generation_config.json"))
    built = hf_io.generation_config_dict(src, load_tokenizer(src))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert built["eos_token_id"][0] == eot and sorted(built["eos_token_id"]) == sorted(shipped["eos_token_id"])
    assert "pad_token_id" not in built   # the pad picked for training is not the model's own


def test_truncated_safetensors_names_the_file_and_size(tmp_path):
    """Issue 12.7: a cut-short copy says which file and how many bytes it should have."""
    from gold_jax.models import init_model
    hf_io.save_pretrained(init_model(_tiny_config(), seed=0), str(tmp_path))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"model.safetensors.*truncated: {len(data) - 100} bytes, "
                                         rf"expected {len(data)}"):
        hf_io.load_pretrained(str(tmp_path))
    path.write_bytes(data[:40])
    with pytest.raises(ValueError, match=r"model.safetensors.*truncated: 40 bytes, but its header alone"):
        hf_io.load_pretrained(str(tmp_path))
    path.write_bytes(data)
    assert hf_io.load_pretrained(str(tmp_path)).config == _tiny_config()
