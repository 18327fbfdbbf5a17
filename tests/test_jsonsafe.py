"""One JSON codec for host state with bytes: the data iterator's state and the checkpoint's host item."""
import numpy as np
import pytest

from gold_jax import jsonsafe


def test_round_trip_bytes_numpy_and_nesting():
    state = {"a": b"\x00\xffgrain", "n": np.int64(3), "f": np.float32(1.5), "ok": np.bool_(True),
             "l": [b"x", {"k": (1, 2)}], 7: None}
    back = jsonsafe.loads(jsonsafe.dumps(state))
    assert back == {"a": b"\x00\xffgrain", "n": 3, "f": 1.5, "ok": True, "l": [b"x", {"k": [1, 2]}], "7": None}
    assert jsonsafe.decode(jsonsafe.encode(state)) == back
    with pytest.raises(TypeError, match="object"):
        jsonsafe.encode({"x": object()})


def test_iterator_state_and_checkpoint_share_the_codec():
    import gold_jax.checkpoint as ckpt
    from gold_jax.data.pipeline import iterator_state_from_json, iterator_state_to_json
    state = {"pos": np.int64(5), "rng": b"\x01\x02"}
    assert iterator_state_to_json(state) == jsonsafe.dumps(state)
    assert iterator_state_from_json(iterator_state_to_json(state)) == {"pos": 5, "rng": b"\x01\x02"}
    assert iterator_state_from_json('{"rng": {"__bytes__": "AQI="}}') == {"rng": b"\x01\x02"}  # older runs
    assert not hasattr(ckpt, "_encode") and not hasattr(ckpt, "_decode")
