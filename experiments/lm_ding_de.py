"""A decoder-only Transformer language model on the German side of the Ding sentences.

    attn-jax train --config experiments/lm_ding_de.py --workdir runs/lm_ding_de

The same blocks as the encoder with a causal mask (a "decoder-only" Transformer), trained with the paper's
optimiser and schedule; reports validation perplexity. About 10 minutes on 2 CPU cores.
"""

from attn_jax import defaults
from attn_jax.config import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, minutes=10.0)
    c = defaults.base_config()
    c.task = "lm"
    c.data = defaults.data_config(name="ding_en_de", vocab_size=8000, max_length=48, tokens_per_batch=4096)
    c.model = defaults.model_config(
        d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=0, num_decoder_layers=4, max_len=128
    )
    c.train.steps = 100_000  # the time budget ends training first
    c.train.time_budget_minutes = args.minutes
    c.train.warmup_steps = 800
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.label_smoothing = 0.0  # perplexity of the data, not of a smoothed target
    return c
