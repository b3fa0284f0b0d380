"""The copy task: a small Transformer learns to copy (or reverse) random token sequences.

    attn-jax train --config experiments/copy_task.py --workdir runs/copy
    attn-jax train --config experiments/copy_task.py:reverse --workdir runs/reverse
    attn-jax train --config experiments/copy_task.py --workdir runs/copy_rnnsearch --config.model.family=rnnsearch

Measured on 2 CPU cores (2026-11-22): 2 min 16 s for the 1200 steps and the evaluation; held-out exact
match 99.6% on validation and on test (255 of 256 sequences each; tests require >= 99%). With Adam's beta2
0.999 (2026-12-01, a loaded machine): Transformer 100% / 100% in 2 min 10 s; RNNsearch (model.family=rnnsearch)
100% / 100% on seeds 0-2 in 45-55 s. The RNN encoder-decoder (model.family=rnn_encdec) reaches only 50% (48%
validation) in the 1200 steps: its one fixed vector is the bottleneck. Its best probe (2026-12-02, 2-core AMD
EPYC): 95.3% on test after 3600 steps with --config.model.d_model=256 --config.model.rnn.reverse_source=true
--config.data.copy.train_examples=500000, short of 99% (experiments/results/copy_rnn_encdec/; tests/test_families.py
learns 3-5 tokens).
A sanity check of the whole path (data, model, loss, schedule, beam search) with no files to fetch.
"""

from attn_jax import defaults
from attn_jax.config import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, reverse=False, steps=1200)
    c = defaults.base_config()
    c.data = defaults.data_config(name="copy", max_length=16, tokens_per_batch=1024, eval_tokens_per_batch=1024)
    c.data.copy = defaults.copy_task_config(reverse=args.reverse)
    c.model = defaults.model_config(
        d_model=64, num_heads=4, d_ff=256, num_encoder_layers=2, num_decoder_layers=2, max_len=64, dropout_rate=0.0
    )
    c.train.steps = args.steps  # enough to copy perfectly
    c.train.warmup_steps = 100  # short warm-up for a tiny model
    c.train.learning_rate_scale = 0.5  # peak ~5e-3 at d_model 64
    c.train.label_smoothing = 0.0  # exact copies need confident predictions
    c.train.b2 = 0.999  # with the paper's 0.98 a near-zero loss jumps every few hundred steps (recurrent models)
    c.train.log_every = 50
    c.train.eval_every = 600
    c.train.checkpoint_every = 600
    c.eval.bleu_examples = 256  # copy reports exact match on all held-out sequences
    c.eval.extra_length = 4  # outputs are as long as inputs
    c.eval.attention_plots = 1
    return c
