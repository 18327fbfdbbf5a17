"""Hidden-state teacher signal: the teacher head and its checksum; the server round trip."""
import numpy as np
import pytest

from gold_jax.teacher.head import check_checksum, head_checksum, head_from_model, load_head


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir):
    return tiny_model_dir("teacher", hidden=48, layers=2, seed=2)


def test_head_from_folder_equals_model_and_checksum_is_dtype_blind(teacher_dir):
    from gold_jax.models.hf_io import load_pretrained
    head, norm = load_head(teacher_dir)
    m_head, m_norm = head_from_model(load_pretrained(teacher_dir))
    np.testing.assert_array_equal(head, m_head)
    np.testing.assert_array_equal(norm, m_norm)
    # A server holding bfloat16 weights announces the checksum of the float32 folder.
    bf_head, bf_norm = head_from_model(load_pretrained(teacher_dir, dtype="bfloat16", param_dtype="bfloat16"))
    assert str(bf_head.dtype) == "bfloat16"
    assert head_checksum(bf_head, bf_norm) == head_checksum(head, norm)
    # Any change to the head or the final norm changes it.
    h2 = head.copy()
    h2[3, 5] += 0.05
    n2 = norm.copy()
    n2[0] += 0.05
    assert len({head_checksum(head, norm), head_checksum(h2, norm), head_checksum(head, n2)}) == 3
    with pytest.raises(ValueError, match="checksum mismatch"):
        check_checksum(head_checksum(h2, norm), head_checksum(head, norm), "config.model.teacher_path")


def test_load_head_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="teacher_path"):
        load_head(str(tmp_path))
