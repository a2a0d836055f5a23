"""NumPy's ``SeedSequence`` run backwards: from a spawned child's PCG64 increment to its root.

A test helper for ``tests/test_runtime.py``: it is the attack a hostile review found against
production generators spawned from one root (a worker that recovers one generator's state
from a challenge's operands, which PCG64 allows, then derives every later check's vectors).
Every step of SeedSequence's pool mixing is a bijection on 32-bit words, so it can be undone
once the spawn index is guessed. Follows numpy's ``bit_generator.pyx`` (NumPy 2).
"""

from __future__ import annotations

MASK32 = 0xFFFFFFFF
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_SHIFT = 16
_POOL = 4


def _unshift(value: int) -> int:
    # v ^ (v >> 16) on 32 bits is its own inverse.
    return value ^ (value >> _SHIFT)


def _unmix(result: int, y: int) -> int:
    """x such that SeedSequence's mix(x, y) == result."""
    r = _unshift(result)
    return ((r + _MIX_R * y) * pow(_MIX_L, -1, 1 << 32)) & MASK32


def _words(value: int) -> list[int]:
    out = []
    while value:
        out.append(value & MASK32)
        value >>= 32
    return out or [0]


def _hash_constants(count: int) -> list[int]:
    """The hash constant after each of the pool mixing's ``count`` hashmix calls."""
    constant, out = _INIT_A, []
    for _ in range(count):
        constant = (constant * _MULT_A) & MASK32
        out.append(constant)
    return out


def _hashed(value: int, before: int, constant: int) -> int:
    v = ((value ^ before) * constant) & MASK32
    return v ^ (v >> _SHIFT)


def root_from_pool(pool: list[int], spawn_index: int) -> int:
    """The 128-bit root entropy whose child ``spawn_key=(spawn_index,)`` has ``pool``."""
    spawn_words = _words(spawn_index)
    calls = _POOL + _POOL * (_POOL - 1) + _POOL * len(spawn_words)
    constants = _hash_constants(calls)

    def before(k: int) -> int:
        return constants[k - 1] if k else _INIT_A

    mixer = list(pool)
    k = calls
    for word in reversed(spawn_words):  # the spawn key's words were mixed in last
        for dst in reversed(range(_POOL)):
            k -= 1
            mixer[dst] = _unmix(mixer[dst], _hashed(word, before(k), constants[k]))
    for src in reversed(range(_POOL)):
        for dst in reversed(range(_POOL)):
            if src != dst:
                k -= 1
                mixer[dst] = _unmix(mixer[dst], _hashed(mixer[src], before(k), constants[k]))
    root = 0
    for i in reversed(range(_POOL)):
        k -= 1
        word = (_unshift(mixer[i]) * pow(constants[k], -1, 1 << 32)) & MASK32
        root = (root << 32) | (word ^ before(k))
    assert k == 0
    return root


def pools_from_increment(increment: int) -> list[list[int]]:
    """The two pools a PCG64 seeded from a SeedSequence may have had, from its increment (the
    increment keeps 127 of the 128 bits of state words 4 to 7)."""
    constant, steps = _INIT_B, []
    for _ in range(8):
        steps.append((constant, (constant * _MULT_B) & MASK32))
        constant = steps[-1][1]
    pools = []
    for top in (0, 1):
        sequence = (increment >> 1) | (top << 127)
        high, low = sequence >> 64, sequence & ((1 << 64) - 1)
        state_words = [high & MASK32, high >> 32, low & MASK32, low >> 32]
        pool = []
        for j, word in enumerate(state_words):
            prev, cur = steps[_POOL + j]
            pool.append(((_unshift(word) * pow(cur, -1, 1 << 32)) & MASK32) ^ prev)
        pools.append(pool)
    return pools
