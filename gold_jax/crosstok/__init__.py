"""Cross-tokenizer distillation: align two tokenizations of one text, map shared vocabulary (issue 15).

Host-side only (numpy + the `tokenizers` library): the jit'd losses live in
`gold_jax.losses.uld`.
"""
