"""The exactly resumable streaming loader over token-shard manifests.

The training order is a pure function of ``seed`` and the manifests (:mod:`.order`); a rank reads
only its own samples, by offset (:mod:`.reading`); the training loader's state is a position in
that order, independent of world size (:mod:`.train`); the evaluation loader makes one
unshuffled pass over the validation splits (:mod:`.evaluation`).
"""
