"""Fixed-width stand-ins for key and event-id strings, computed a batch at a time.

The key index cannot afford a Python string per key (~60 bytes before any state), so
it keeps a 96-bit fingerprint of each key (a 64-bit hash to sort and search by, and
32 more bits to tell apart the rare keys whose first hash collides: a false match
needs both to collide, about 6e-14 across 100M keys) and, for the event-id
tie-break, the id's first 8 bytes (big-endian, so integer order is string order
wherever they differ) with a 32-bit hash of the whole id.

The hash is our own (a multiply-xorshift mix over 8-byte words of the UTF-8 bytes)
so it is the same in every version of every library: fingerprints are saved in the
index snapshot and must mean the same thing when it is loaded. It runs over the
Arrow buffers with NumPy; no Python object is made per string.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pyarrow as pa

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SEEDS = (np.uint64(0x243F6A8885A308D3), np.uint64(0x13198A2E03707344))
_CHUNK = 1 << 20  # rows per pass, so a 100M-row load never builds a 100M-row matrix


def _mix(h: U64) -> U64:
    """splitmix64's finalizer: every input bit moves every output bit."""
    h = (h ^ (h >> _S30)) * _M2
    h = (h ^ (h >> _S27)) * _M3
    return h ^ (h >> _S31)


def _words(array: pa.Array) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The strings' bytes as a zero-padded (rows × 8k) matrix, and their lengths."""
    if not isinstance(array, pa.StringArray | pa.LargeStringArray):
        array = array.cast(pa.large_string())
    width = np.int64 if isinstance(array, pa.LargeStringArray) else np.int32
    buffers = array.buffers()
    raw = np.frombuffer(buffers[1], dtype=width)[array.offset : array.offset + len(array) + 1]
    offsets: npt.NDArray[np.int64] = raw.astype(np.int64)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else None
    lengths = np.diff(offsets)
    longest = int(lengths.max()) if len(lengths) else 0
    span = max(8, -(-longest // 8) * 8)
    if data is None or not len(data):
        return np.zeros((len(array), span), np.uint8), lengths
    lanes = np.arange(span, dtype=np.int64)
    at = offsets[:-1, None] + lanes
    matrix = data[np.minimum(at, len(data) - 1)]
    matrix[lanes >= lengths[:, None]] = 0
    return matrix, lengths


def _hash(matrix: npt.NDArray[np.uint8], lengths: npt.NDArray[np.int64], seed: np.uint64) -> U64:
    """Mixes only the words a string has, so its hash never depends on the longest
    string of the batch it came in."""
    words = matrix.view("<u8")
    with np.errstate(over="ignore"):
        h = _mix(lengths.astype(np.uint64) * _M1 + seed)
        for j in range(words.shape[1]):
            h = np.where(lengths > 8 * j, _mix((h ^ words[:, j]) * _M1), h)
    return h


def _chunks(array: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return [array.slice(i, _CHUNK) for i in range(0, max(len(array), 1), _CHUNK)]


def key_fingerprints(array: pa.Array | pa.ChunkedArray) -> tuple[U64, U32]:
    """(64-bit hash, 32 more bits) of each string; nulls are not expected."""
    firsts, seconds = [], []
    for part in _chunks(array):
        matrix, lengths = _words(part)
        firsts.append(_hash(matrix, lengths, _SEEDS[0]))
        seconds.append((_hash(matrix, lengths, _SEEDS[1]) >> np.uint64(32)).astype(np.uint32))
    return np.concatenate(firsts), np.concatenate(seconds)


def event_order(array: pa.Array | pa.ChunkedArray) -> tuple[U64, U32]:
    """(first 8 bytes as a big-endian integer, 32-bit hash of the whole id)."""
    prefixes, hashes = [], []
    for part in _chunks(array):
        matrix, lengths = _words(part)
        prefixes.append(np.ascontiguousarray(matrix[:, :8]).view(">u8")[:, 0].astype(np.uint64))
        hashes.append((_hash(matrix, lengths, _SEEDS[1]) & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    return np.concatenate(prefixes), np.concatenate(hashes)
