"""Named presets; any flag of ``attnlab train`` that applies to the preset's task overrides its value."""

from __future__ import annotations

from .config import LanguageModelSettings, TrainConfig, TranslationSettings

__all__ = ["PRESETS", "get_preset"]

# Multi30k on a 2-core CPU in 60 minutes: a small post-LN Transformer with a shared BPE
# vocabulary and tied embeddings. The measured 60-minute run made 2070 updates (README, "German →
# English"), fewer than the paper's 4000 warm-up steps alone, so the warm-up is 600 steps and the
# factor 0.4 puts the peak rate at 0.4 * 256^-0.5 * 600^-0.5 = 1.0e-3, decaying as 1/sqrt(step).
_MULTI30K_TASK = dict(vocab_size=8000, shared_vocab=True, num_encoder_layers=3, num_decoder_layers=3,
                      max_tokens=3000, eval_sentences=500)
_MULTI30K = dict(
    d_model=256, num_heads=8, d_ff=1024, dropout=0.1, share_embeddings=True, schedule="noam", lr=0.4,
    warmup=600, label_smoothing=0.1, time_limit=60.0, epochs=100, keep_last=5, average_last=5, patience=0,
)

PRESETS: dict[str, TrainConfig] = {
    "multi30k-de-en": TrainConfig(
        TranslationSettings(src_lang="de", tgt_lang="en", **_MULTI30K_TASK), preset="multi30k-de-en", **_MULTI30K,
    ),
    "multi30k-en-fr": TrainConfig(
        TranslationSettings(src_lang="en", tgt_lang="fr", **_MULTI30K_TASK), preset="multi30k-en-fr", **_MULTI30K,
    ),
    # The demo: a small de-en model that trains in 6 minutes. All the data beats a quarter of it
    # seen more often (validation BLEU 27.0 against 8.0 in 6 minutes on one core); the peak
    # rate is 0.4 * 128^-0.5 * 300^-0.5 = 2.0e-3 (factor 2.0 peaked at 1.0e-2 and stalled).
    "tiny": TrainConfig(
        TranslationSettings(src_lang="de", tgt_lang="en", train_fraction=1.0, vocab_size=4000,
                            num_encoder_layers=2, num_decoder_layers=2, max_tokens=2048, eval_sentences=200),
        preset="tiny", d_model=128, num_heads=4, d_ff=256, dropout=0.1, schedule="noam", lr=0.4, warmup=300,
        time_limit=6.0, epochs=30, keep_last=3, average_last=3,
    ),
    # Character-level tiny Shakespeare, the known nanoGPT CPU configuration.
    "shakespeare-char": TrainConfig(
        LanguageModelSettings(num_layers=4, context=64, batch_size=12),
        preset="shakespeare-char", d_model=128, num_heads=4, d_ff=512, dropout=0.0, norm_first=True,
        share_embeddings=True, schedule="cosine", lr=1e-3, min_lr=1e-4, warmup=100, max_steps=2000,
        eval_every=250, epochs=100, label_smoothing=0.0, adam_beta2=0.99, adam_eps=1e-8, weight_decay=0.1,
        keep_last=2, average_last=0,
    ),
}


def get_preset(name: str) -> TrainConfig:
    """The preset called ``name``; a clear error lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
