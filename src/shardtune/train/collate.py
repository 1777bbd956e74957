"""Batches of prepared rows for training.

Rows come out of the prepare step already tokenized, labelled and (usually) packed: one row
holds several conversations and lists their lengths in `seq_lengths`. How a batch of them
reaches the model depends on the attention kernel:

- flash_attention_2: TRL's padding-free collator flattens the batch into one sequence; the
  variable-length kernel reads the boundaries from the restarting position ids and computes
  nothing across them.
- sdpa and eager: `PackedRowsCollator` keeps the rows as [batch, longest row]. Position ids
  restart at every conversation and no attention mask is passed, so transformers builds a
  block-diagonal causal mask per row from the position ids (`find_packed_sequence_indices`).
  Flattening instead would make these kernels score all (batch x L)^2 token pairs, batch
  times the work and memory of batch x L^2 (BENCHMARKS.md, "Where time and memory go").
"""

import torch

from shardtune.inputs.modeling import packed_position_ids


class PackedRowsCollator:
    """[batch, longest row] input ids, labels and restarting position ids; no attention mask.

    The padding after a row is a sequence of its own (positions from 0), so no real token
    attends to it; labels are -100 on padding and on the first token of every sequence (its
    label would be predicted from the previous conversation), as TRL's padding-free collator.
    """

    def __init__(self, pad_token_id):
        self.pad = pad_token_id

    def __call__(self, rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            positions[i, :n] = packed_position_ids(row["seq_lengths"])
            positions[i, n:] = torch.arange(width - n)
        labels[positions == 0] = -100
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def flattens_batches(attn):
    """Whether batches are flattened padding-free (only the varlen flash kernel gains from it)."""
    return attn == "flash_attention_2"
