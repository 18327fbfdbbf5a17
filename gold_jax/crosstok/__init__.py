"""Cross-tokenizer distillation: a teacher whose tokenizer differs from the student's (issue 15).

How to run: point the run at a teacher of another tokenizer and set

    --config.gold.cross_tokenizer=True          # else the start-up check refuses the mismatch, naming this key
    --config.gold.uld_use_hybrid_loss=True      # optional: JSD on shared tokens + ULD on the rest (TRL's hybrid)

`loss.impl` stays "auto" (it resolves to the "uld" row) and `gold.teacher_signal` "topk" (`gold.top_k` >= 1
is the k of the aligned top-k). The other keys are TRL GOLDConfig's, same names and meanings, under gold.*:
uld_hybrid_matched_weight / uld_hybrid_unmatched_weight (both None = adaptive: shared / teacher vocab),
uld_crossentropy_weight (x the student's NLL), uld_distillation_weight, uld_student_temperature,
uld_teacher_temperature (the teacher scores at this one; gold.temperature stays the sampling temperature),
uld_skip_student_eos, uld_skip_teacher_eos, uld_token_merge_strategy (observed | bayesian). gold.beta is the
hybrid's JSD beta. A teacher with the *same* tokenizer fingerprint takes the usual path whatever the key says.
Metric: gold/unaligned_frac (scored student positions that no aligned span covers; they carry no loss).

Pieces (host-side numpy + the `tokenizers` library; the jit'd losses live in `gold_jax.losses.uld`):
- `align`: byte-offset alignment of two tokenizations (partial UTF-8 merge, unaligned counting, TRL's
  observed / bayesian span merge as `span_arrays`);
- `vocab_map`: the exact-string shared vocabulary (`VocabMap`, adaptive weights), built once per run from the
  teacher's `vocab` op;
- `fields`: per-student-position teacher fields (FIELDS) from an alignment;
- `request`: the wire: the client's text + student end offsets (`student_request`, `CrossSpec`), the
  teacher worker's tokenize / score / align (`score_rows`), the LossSpec settings (`loss_settings`).

Works with every scheduler (scores are futures like any other), the teacher score cache (keys carry the
student tokenizer's fingerprint and the uld switches), both rollout engines (rollout is student-side) and
the jax and vllm teacher backends (the worker aligns through the backend's tokenizer).
"""
