"""Training-time data access: a streaming shard reader with a resumable cursor."""

from fusedist.data.reader import (
    META_KEYS,
    Cursor,
    DatasetMismatchError,
    ShardError,
    ShardHashError,
    ShardInfo,
    ShardReader,
    decode_sample,
    iter_tar_samples,
    load_mirrored,
    load_shards,
    shard_order,
    slot_block,
    split_member,
)

__all__ = [
    "META_KEYS",
    "Cursor",
    "DatasetMismatchError",
    "ShardError",
    "ShardHashError",
    "ShardInfo",
    "ShardReader",
    "decode_sample",
    "iter_tar_samples",
    "load_mirrored",
    "load_shards",
    "shard_order",
    "slot_block",
    "split_member",
]
