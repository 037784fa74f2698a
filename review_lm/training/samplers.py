"""Trainer's length grouping fed from the lengths a lazy dataset already knows (no sample assembled to measure it).

Owns the one use of transformers internals the project cannot avoid here: ``Trainer._get_train_sampler`` /
``_get_eval_sampler`` and ``transformers.trainer_pt_utils.LengthGroupedSampler`` (no public hook gives
``group_by_length`` precomputed lengths for a dataset that is not a ``datasets.Dataset``; TRL's trainers override
the same hook). ``tests/test_dependencies.py`` checks them against the installed transformers, naming its version.
"""

from __future__ import annotations

import numpy as np
import torch


class DatasetLengthsMixin:
    """Mix into a ``transformers.Trainer`` subclass: with ``train_sampling_strategy="group_by_length"`` and a
    dataset that has ``lengths``, build Trainer's own ``LengthGroupedSampler`` (same batch size, same generator)
    from those lengths instead of letting it assemble every sample to measure it. Anything else: unchanged."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if self.args.train_sampling_strategy != "group_by_length" or lengths is None:
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=np.asarray(lengths).tolist())

    def _get_eval_sampler(self, eval_dataset):
        lengths = getattr(eval_dataset, "lengths", None)
        if self.args.train_sampling_strategy != "group_by_length" or lengths is None:
            return super()._get_eval_sampler(eval_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(self.args.eval_batch_size, lengths=np.asarray(lengths).tolist(),
                                    generator=torch.Generator().manual_seed(seed))


def with_dataset_lengths(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`DatasetLengthsMixin` in front (works for any Trainer subclass)."""
    return type(f"{trainer_cls.__name__}WithDatasetLengths", (DatasetLengthsMixin, trainer_cls), {})
