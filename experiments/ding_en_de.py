"""The default run: English -> German on the Ding dictionary's 20.7k example sentences, on a 2-core CPU.

    make train                     # = attn-jax train --config experiments/ding_en_de.py --workdir runs/ding_en_de
    attn-jax translate --workdir runs/ding_en_de "Where is the station?"

A Transformer sized for the budget (d_model 256, 3+3 layers, 4 heads, d_ff 1024, shared 8k BPE
vocabulary) trained for at most 20 minutes on 2 CPU cores, then beam search (4, alpha 0.6) on the
held-out test split. Expected: see the README's results table (measured test sacreBLEU and the log).
Run it again and it resumes from the newest checkpoint in runs/ding_en_de.
"""

from attn_jax import defaults
from attn_jax.config import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, phrases=False, minutes=16.0)
    c = defaults.base_config()
    c.data = defaults.data_config(
        name="ding_en_de", phrases=args.phrases, vocab_size=8000, max_length=48, tokens_per_batch=3072,
        eval_tokens_per_batch=2048,
    )  # fmt: skip
    c.model = defaults.model_config(
        d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3, num_decoder_layers=3, max_len=128,
        dropout_rate=0.1,
    )  # fmt: skip
    c.train.steps = 100_000  # the time budget ends training first
    c.train.time_budget_minutes = args.minutes  # leaves time for set-up and the final evaluation
    c.train.warmup_steps = 800  # a short run warms up faster than the paper's 4000
    c.train.learning_rate_scale = 1.0  # peak d_model^-0.5 * warmup^-0.5 = 2.2e-3
    c.train.log_every = 25
    c.train.eval_every = 100_000  # no mid-run BLEU: the final evaluation scores everything
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.eval.batch_size = 128
    return c
