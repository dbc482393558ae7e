"""Hugging Face tokenizer files that encode exactly like the sentencepiece model.

BOS/EOS: neither sentencepiece (``encode``) nor the Hugging Face tokenizer adds BOS or EOS by
default (``add_special_tokens`` has no effect); the token shards append EOS after every document
and use no BOS. Special-token strings inside text (``"</s>"``) are encoded as text by both
(``split_special_tokens=True``); put special ids in by id (``tokenizer.eos_token_id``).
Exception, unigram models only: text that literally contains a control or byte piece
(``"</s>"``, ``"<0x41>"``) is encoded differently by the Hugging Face Viterbi.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2

from crucible.errors import DataError
from crucible.fileio import atomic_write_json
from data_pipeline.tokenizer.folder import SPECIAL_PIECES


def build_hf_tokenizer(model_path: Path) -> Any:
    """A ``PreTrainedTokenizerFast`` that encodes exactly like the sentencepiece model."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab: dict | list = {p.piece: i for i, p in enumerate(proto.pieces)}
    else:
        # unigram: the Hugging Face Viterbi can match control/byte pieces ("</s>", "<0x41>") that
        # appear literally in text, sentencepiece never does (documented limitation; scores are
        # kept, since the unknown-character penalty is derived from the lowest score).
        vocab = [(p.piece, p.score) for p in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    if backend is None:
        raise DataError(f"{model_path}: unsupported sentencepiece model type")
    control = [p.piece for p in proto.pieces if p.type in (2, 3)]  # unknown, control
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_PIECES["unk"], bos_token=SPECIAL_PIECES["bos"],
        eos_token=SPECIAL_PIECES["eos"], pad_token=SPECIAL_PIECES["pad"],
        model_max_length=10**9, clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # "</s>" inside text is text, as in sentencepiece
    )


def save_hf_tokenizer(hf: Any, out_dir: Path) -> None:
    """``save_pretrained``, naming the class both transformers 4 and 5 resolve."""
    hf.save_pretrained(str(out_dir))
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_json(path, config)
