"""The memory format of a shared dictionary: the one description that both of its
implementations read, Python's (dictionary.py) and LuaJIT's FFI (lua/shared.lua, given
INDEX).

A dictionary is one block of `capacity` bytes:

    [mutex: MUTEX bytes][header][buckets: u32 x nbuckets][chunks: CHUNK bytes x nchunks]

Entries live in chains of fixed-size chunks, so any free chunk serves any entry: memory
never fragments, and the capacity bounds it whatever the keys. A chunk is named by its
index from 1 (0 is none). An entry's first chunk holds its ENTRY fields and the first
FIRST bytes of its data (the key, then the value); each further chunk holds `next` and
REST bytes more. Free chunks are a list through `next`; chunks never used yet start at
`bump`, so that creating a large dictionary touches none of its pages. Entries are found by
a CRC-32 of the key (zlib's) through bucket chains (`hnext`) and kept in least recently used
order (`prev` towards the head, the most recent; `lnext` towards the tail).
"""

import struct

CHUNK = 128
MUTEX = 64           # room for a pthread_mutex_t (40 bytes on x86-64 glibc, 48 on arm64)
MAGIC = 0x4C534431   # "LSD1"
MAX_KEY = 65535      # as ngx.shared.DICT

# (name, C type): the C types map to struct codes below.
HEADER = (("magic", "uint32_t"), ("nchunks", "uint32_t"), ("nbuckets", "uint32_t"),
          ("buckets_at", "uint32_t"), ("chunks_at", "uint32_t"), ("bump", "uint32_t"),
          ("free", "uint32_t"), ("nfree", "uint32_t"), ("head", "uint32_t"),
          ("tail", "uint32_t"), ("count", "uint32_t"),
          # set while the structure is being changed: an operation interrupted then (its
          # process killed, its call stopped at request_timeout) leaves it for the next
          # owner of the mutex, which empties the dictionary rather than trust it
          ("dirty", "uint32_t"))
ENTRY = (("next", "uint32_t"), ("hnext", "uint32_t"), ("prev", "uint32_t"),
         ("lnext", "uint32_t"), ("hash", "uint32_t"), ("klen", "uint16_t"),
         ("vtype", "uint8_t"), ("pad", "uint8_t"), ("vlen", "uint32_t"),
         ("flags", "uint32_t"),
         # CLOCK_MONOTONIC seconds (one clock for every process); 0 never, < 0 flushed
         ("expires", "double"))

# value types
STRING, NUMBER, BOOLEAN, INTEGER = 1, 2, 3, 4

_CODES = {"uint32_t": "I", "uint16_t": "H", "uint8_t": "B", "double": "d"}


def _offsets(fields, start):
    offsets, at = {}, start
    for name, ctype in fields:
        offsets[name] = at
        at += struct.calcsize(_CODES[ctype])
    return offsets, at


HEADER_AT, HEADER_END = _offsets(HEADER, MUTEX)
ENTRY_AT, HEAD = _offsets(ENTRY, 0)   # HEAD: the entry fields' size in the first chunk
FIRST = CHUNK - HEAD                  # data bytes in an entry's first chunk
REST = CHUNK - 4                      # data bytes in each further chunk
assert HEAD % 8 == 0 and ENTRY_AT["expires"] % 8 == 0


def chunks_for(length):
    """Chunks an entry with `length` bytes of key and value takes."""
    return 1 if length <= FIRST else 1 + -(-(length - FIRST) // REST)


def geometry(capacity):
    """(nbuckets, buckets_at, chunks_at, nchunks) of a dictionary of `capacity` bytes: about
    one bucket for every two chunks (a power of two), the rest chunks."""
    estimate = max(1, (capacity - HEADER_END) // CHUNK)
    nbuckets = 16
    while nbuckets * 4 <= estimate:
        nbuckets *= 2
    buckets_at = -(-HEADER_END // 8) * 8
    chunks_at = -(-(buckets_at + 4 * nbuckets) // CHUNK) * CHUNK
    return nbuckets, buckets_at, chunks_at, (capacity - chunks_at) // CHUNK


def _index():
    """Where each field is, in the view of the memory that reads its type (as numbers, so
    that LuaJIT's interpreter boxes nothing): header fields as word indices; an entry's
    relative to its first word e: the words e + NEXT ..., the half-word 2e + KLEN, the byte
    4e + VTYPE, the double e / 2 + EXPIRES, its data from the byte 4e + DATA. Chunk i's
    first word is E0 + i * WORDS, with E0 = chunks_at / 4 - WORDS."""
    index = {name.upper(): at // 4 for name, at in HEADER_AT.items()}
    index.update({name.upper(): ENTRY_AT[name] // 4
                  for name in ("next", "hnext", "prev", "lnext", "hash", "vlen", "flags")})
    index.update(KLEN=ENTRY_AT["klen"] // 2, VTYPE=ENTRY_AT["vtype"],
                 EXPIRES=ENTRY_AT["expires"] // 8, DATA=HEAD, WORDS=CHUNK // 4)
    return index


INDEX = _index()
