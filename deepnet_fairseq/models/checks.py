"""Checks run when a checkpoint is loaded into a deepnet model."""

from torch import nn

from deepnet_fairseq.schemes import DeepNetConfigError

EMBEDDINGS = {
    "encoder.embed_tokens.weight": "source",
    "decoder.embed_tokens.weight": "target",
    "encoder.sentence_encoder.embed_tokens.weight": "source",  # deepnet_roberta
}


def check_vocabulary_matches(model: nn.Module, state_dict) -> None:
    """Refuse a checkpoint whose embedding tables do not fit the dictionaries the model was built with.

    fairseq builds the model from the data directory's ``dict.*.txt`` and only then loads the
    weights, so a different dictionary surfaces as a tensor "size mismatch"; this names the cause.
    """
    own = model.state_dict()
    for key, side in EMBEDDINGS.items():
        if key in state_dict and key in own and state_dict[key].shape[0] != own[key].shape[0]:
            raise DeepNetConfigError(
                f"the checkpoint's {side} dictionary has {state_dict[key].shape[0]} entries but the data "
                f"directory's has {own[key].shape[0]}: use the data directory (dict.*.txt) the model was trained with"
            )
