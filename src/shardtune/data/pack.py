"""Best-fit-decreasing packing (the bins of TRL's pack_dataset) with numpy, straight into Arrow
list arrays."""

import itertools
from bisect import bisect_left, insort
from collections import defaultdict, deque

import numpy as np
import pyarrow as pa
import xxhash  # a dependency of datasets


def _pack_bfd(lengths, max_len):
    """Best-fit decreasing bins, the same as TRL's pack_dataset(strategy="bfd") makes (longest
    first, ties in row order; each sequence goes to the bin with the least room that fits it,
    the oldest such bin; else a new bin). Returns (sequence order, sequences per bin)."""
    order = np.argsort(-lengths, kind="stable")
    spaces = []  # sorted: the room left in some bin (0 < room < max_len)
    bins_by_space = defaultdict(deque)
    members = []
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        k = bisect_left(spaces, length)
        if k < len(spaces):
            space = spaces[k]
            waiting = bins_by_space[space]
            b = waiting.popleft()
            if not waiting:
                del spaces[k]
        else:
            space, b = max_len, len(members)
            members.append([])
        members[b].append(index)
        space -= length
        if space > 0:
            waiting = bins_by_space[space]
            if not waiting:
                insort(spaces, space)
            waiting.append(b)
    sequence_order = np.fromiter(itertools.chain.from_iterable(members), dtype=np.int64, count=len(lengths))
    return sequence_order, np.fromiter(map(len, members), dtype=np.int64, count=len(members))


def fingerprint(table):
    """A content hash of an Arrow table for its Dataset: what datasets would compute by
    pickling the whole table, at a fraction of the time (xxhash over the buffers)."""
    digest = xxhash.xxh64(str(table.schema).encode())
    for column in table.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                digest.update(b"" if buffer is None else buffer)
    return digest.hexdigest()


def gather(ids, labels, starts, lengths, order):
    """The tokens of sequences `order` (each `lengths[i]` tokens from `starts[i]`), back to back."""
    if len(order) == 0:
        return ids[:0], labels[:0]
    spans = list(zip(starts[order].tolist(), (starts[order] + lengths[order]).tolist()))
    out = np.concatenate([ids[a:b] for a, b in spans])
    if labels is ids:  # full-text loss: labels are the ids
        return out, out
    return out, np.concatenate([labels[a:b] for a, b in spans])


def rows_table(ids, labels, seq_lengths, per_row):
    """input_ids, labels and seq_lengths as Arrow rows: row i holds the next `per_row[i]`
    sequences of `seq_lengths`, whose tokens lie back to back in ids/labels."""
    row_ends = np.cumsum(per_row)
    row_offsets = np.concatenate([[0], np.cumsum(seq_lengths)[row_ends - 1]])
    list_type = pa.ListArray if len(ids) < 2**31 else pa.LargeListArray
    offset_type = pa.int32() if list_type is pa.ListArray else pa.int64()
    offsets = pa.array(row_offsets, type=offset_type)
    return pa.table(
        {
            "input_ids": list_type.from_arrays(offsets, pa.array(ids)),
            "labels": list_type.from_arrays(offsets, pa.array(labels)),
            "seq_lengths": pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], row_ends]), type=pa.int32()), pa.array(seq_lengths, type=offset_type)
            ),
        }
    )


def packed_table(ids, labels, lengths, max_len, starts=None):
    """The table TRL's pack_dataset(..., strategy="bfd") returns for these sequences, built
    with numpy. Sequence i is `lengths[i]` tokens from `starts[i]` (default: back to back)."""
    if starts is None:
        starts = np.cumsum(lengths) - lengths
    keep = lengths > 0  # as TRL: empty sequences are dropped
    lengths, starts = lengths[keep], starts[keep]
    order, per_bin = _pack_bfd(lengths, max_len)
    ids, labels = gather(ids, labels, starts, lengths, order)
    return rows_table(ids, labels, lengths[order], per_bin)
