"""A deterministic, resumable synthetic token stream.

Tokens come from a fixed random Markov chain (each token has a handful of likely successors),
so there is real structure to learn and the loss falls quickly from ln(vocab). Micro-batch ``i``
is generated from a generator seeded with ``(seed, i)`` alone, so the stream can resume at any
position without replaying it, and every rank generates the same global batch and keeps its own
slice: the data order does not depend on the number of ranks.

The position that goes into a checkpoint is ``{"seed": int, "consumed": int}``.
"""

from __future__ import annotations

from typing import Any

import torch

_BRANCHING = 4        # successors per token
_VAL_OFFSET = 1 << 40  # validation batches live far away from the training stream


class TokenStream:
    """Yields ``(inputs, targets)`` micro-batches of shape ``(batch, seq_len)`` for one rank."""

    def __init__(self, vocab_size: int, seq_len: int, global_batch: int, *, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} not divisible by world size {world_size}")
        self.vocab_size, self.seq_len, self.global_batch = vocab_size, seq_len, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.consumed = 0
        g = torch.Generator().manual_seed(seed)
        self._successors = torch.randint(0, vocab_size, (vocab_size, _BRANCHING), generator=g)

    def _generate(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n, t = self.global_batch, self.seq_len + 1
        tokens = torch.empty(n, t, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab_size, (n,), generator=g)
        choice = torch.randint(0, _BRANCHING, (n, t), generator=g)
        noise = torch.rand(n, t, generator=g) < 0.05  # a little entropy so it is not trivial
        random_tok = torch.randint(0, self.vocab_size, (n, t), generator=g)
        for j in range(1, t):
            nxt = self._successors[tokens[:, j - 1], choice[:, j]]
            tokens[:, j] = torch.where(noise[:, j], random_tok[:, j], nxt)
        per_rank = n // self.world_size
        mine = tokens[self.rank * per_rank:(self.rank + 1) * per_rank]
        return mine[:, :-1].contiguous(), mine[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training micro-batch for this rank; advances the position."""
        batch = self._generate(self.consumed)
        self.consumed += 1
        return batch

    def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed validation micro-batch ``i`` (never seen in training, same on every call)."""
        return self._generate(_VAL_OFFSET + i)

    def state_dict(self) -> dict[str, Any]:
        """The position: small, plain data."""
        return {"seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; refuses a position from a different stream."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data position is for seed {state['seed']}, this stream uses {self.seed}; "
                             "resume with the same --seed")
        self.consumed = int(state["consumed"])
