"""RNNsearch (Bahdanau et al. 2014) English -> German on the Ding sentences, on a 2-core CPU: the recurrent model
with attention, beside the Transformer (experiments/ding_en_de.py) and the RNN encoder-decoder
(experiments/rnn_encdec_ding_en_de.py) at equal wall-clock budgets.

    attn-jax train --config experiments/rnnsearch_ding_en_de.py --workdir runs/families/rnnsearch
    attn-jax train --config experiments/rnnsearch_ding_en_de.py:score=general --workdir runs/rnnsearch_general
    attn-jax bench families --runs runs/families/transformer runs/families/rnnsearch runs/families/rnn_encdec

A bidirectional GRU encoder (256 per direction, annotations 512), a 256-unit GRU decoder, 128-wide embeddings,
alignment width 256, maxout 128, the shared 4k BPE vocabulary of experiments/ding_en_de.py; Adam with beta2 0.999
(with the paper's 0.98 a recurrent model's loss jumps once it is small: tests/test_families.py), the rsqrt
schedule at a peak of 1.1e-3, gradient norm clipped to 1 (Bahdanau et al. rescale to 1), dropout 0.3 on
embeddings and the maxout output against the small data's overfitting, batches of ~2k tokens. 20 minutes of
training (``minutes``), then beam search (4, alpha 0.6) on the test split: under 25 minutes in all. A checkpoint
every 100 steps, all kept, so ``attn-jax bench families`` can score the model as it stood at 5 and 10 minutes.

The sizes are a first choice, not tuned on this machine (its load was not steady enough to compare 5-minute
probes); `attn-jax bench families` over probes with other ``--config.model.d_model``,
``--config.data.tokens_per_batch`` or ``--config.train.learning_rate_scale`` values is how to tune them.
Measured (2026-12-02, idle 2-core AMD EPYC, experiments/results/families.md): 1,351 steps in 20 minutes at 1.8k
target tokens/s, validation perplexity 68.9, test sacreBLEU 2.17 (0.19 at 5 minutes, 0.66 at 10); the
Transformer of experiments/ding_en_de.py:minutes=20 scored 5.14 on its raw 20-minute checkpoint.
"""

from attn_jax import defaults
from attn_jax.config import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, minutes=20.0, score="additive")
    c = defaults.base_config()
    c.data = defaults.data_config(
        name="ding_en_de", vocab_size=4000, max_length=48, tokens_per_batch=2048, eval_tokens_per_batch=2048
    )
    c.model = defaults.model_config(family="rnnsearch", d_model=256, max_len=128, dropout_rate=0.3)
    c.model.rnn.embed_dim = 128  # M: word embeddings
    c.model.rnn.encoder_dim = 256 if args.score != "dot" else 128  # E per direction; dot needs 2 E = d_model
    c.model.rnn.alignment_dim = 256  # A: the additive score's width
    c.model.rnn.maxout_dim = 128  # R: maxout units of the readout
    c.model.rnn.score = args.score  # "additive" (Bahdanau), "dot" or "general" (Luong et al. 2015)
    c.train.steps = 1_000_000  # the time budget ends training first
    c.train.time_budget_minutes = args.minutes  # wall-clock budget of the comparison
    c.train.warmup_steps = 300  # short warm-up for a short run
    c.train.learning_rate_scale = 0.3  # peak 0.3 * 256^-0.5 * 300^-0.5 = 1.1e-3
    c.train.b2 = 0.999  # Adam's second-moment decay (the paper's 0.98 makes small recurrent losses jump)
    c.train.grad_clip_norm = 1.0  # Bahdanau et al.: gradients rescaled to norm 1
    c.train.log_every = 50  # steps between logged training metrics
    c.train.eval_every = 1_000_000  # no mid-run BLEU: the final evaluation scores everything
    c.train.checkpoint_every = 100  # fine-grained, for the 5- and 10-minute scores of `attn-jax bench families`
    c.train.keep_checkpoints = 1000  # keep them all (about 40 MB each)
    c.eval.batch_size = 128  # sentences per decoding batch
    return c
