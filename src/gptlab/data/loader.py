"""``TokenLoader``: (x, y) batches from token shards, rank-strided, optionally shuffled, exactly resumable.

The split is seen as a list of *sequences*: shard ``i`` with ``n_i`` tokens holds ``(n_i - 1) // T``
sequences, sequence ``s`` being tokens ``[s*T, s*T + T + 1)`` (T + 1 tokens: y is x shifted by one),
so no sample straddles two files. An epoch orders the shards (sequentially, or permuted by
``np.random.default_rng([seed, epoch])``) and, within each shard, its sequences (sequentially, or
permuted by ``default_rng([seed, epoch, shard])``). Each step takes the next ``batch_size *
world_size`` sequences of that order; rank ``r`` gets the ``r``-th block of ``batch_size``, so ranks
never share a sequence and a batch may span two shards. The tail that cannot fill a whole global
batch is skipped and the next epoch begins. Without shuffling this is build-nanogpt's
``DataLoaderLite`` order; the validation split is always read in order (the same tokens on every
evaluation after :meth:`TokenLoader.reset`).

A chat dataset (``gptlab prepare chat``) carries a loss mask per shard and packs one row per
``seq_len`` tokens, so sequence ``s`` is exactly row ``s``; targets whose mask is 0 (prompts, user turns,
padding, the start of the next row) come out as ``IGNORE_INDEX`` (-1), which the model's loss skips.
The loader's ``seq_len`` must then equal the rows' length.

The whole state is ``(epoch, position)``, the same on every rank: :meth:`state_dict` is a tiny JSON
dict, and a restored loader yields exactly the batches the original would have yielded next. The
position counts sequences, so it stays meaningful when a run resumes with another world size.
"""

from __future__ import annotations

import collections
import glob as globlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from gptlab.data import shards as S
from gptlab.errors import GptlabError

STATE_VERSION = 1


class LoaderError(GptlabError, ValueError):
    """The loader cannot serve the requested batches; the message names the dataset and the fix."""


def _resolve_files(data: str | os.PathLike | Sequence[str | os.PathLike], split: str
                   ) -> tuple[list[Path], list[int], dict[str, Any] | None, str]:
    """(paths, token counts, manifest or None, description) for a dataset dir, a glob or a list of .bin files."""
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        m = S.open_manifest(data)  # a prepared dataset, or a directory of llm.c / build-nanogpt shards
        entries = [s for s in m["shards"] if s["split"] == split]
        if not entries:
            have = sorted({s["split"] for s in m["shards"]})
            prepared = m["source"].get("manifest", True)
            fix = ("re-run gptlab prepare with --val-fraction to make one" if prepared
                   else "name validation shards *_val_* or pass --data.val GLOB")
            raise LoaderError(f"{data}: no {split!r} split {'in manifest.json' if prepared else 'among its shards'} "
                              f"(splits: {', '.join(have) or 'none'}); {fix}")
        paths = S.shard_paths(data, split, m)
        counts = []
        for p, s in zip(paths, entries):
            n, _ = S.read_header(p)
            if n != int(s["tokens"]):
                raise LoaderError(f"{p}: header has {n} tokens but manifest.json says {s['tokens']}; re-run gptlab prepare")
            counts.append(n)
        return paths, counts, m, f"{data} [{split}]"
    if isinstance(data, (str, os.PathLike)):
        paths = sorted(Path(p) for p in globlib.glob(str(data)))
        if not paths:
            raise LoaderError(f"{data}: not found: no dataset directory or .bin shard matches; "
                              f"create one with: gptlab prepare NAME --out {data}")
        desc = str(data)
    else:
        paths = [Path(p) for p in data]
        if not paths:
            raise LoaderError("TokenLoader: empty list of shard files")
        desc = f"{len(paths)} shard files"
    counts = [S.read_header(p)[0] for p in paths]
    return paths, counts, None, desc


class TokenLoader:
    """Batches ``(x, y)`` of int64 token ids, shape ``(batch_size, seq_len)``, on ``device``.

    ``data_dir`` is a prepared dataset directory (``manifest.json``), or a glob / list of llm.c ``.bin``
    shards (then ``split`` is only a label). ``shuffle`` is ignored for the ``val`` split.
    """

    def __init__(self, data_dir: str | os.PathLike | Sequence[str | os.PathLike], split: str, batch_size: int,
                 seq_len: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        if batch_size < 1 or seq_len < 1:
            raise LoaderError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} must be in [0, world_size={world_size})")
        self.split = split
        self.B, self.T = int(batch_size), int(seq_len)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle = bool(shuffle) and split != "val"
        self.seed = int(seed)
        self.device = torch.device(device)
        self.paths, counts, self.manifest, self._desc = _resolve_files(data_dir, split)
        self.shard_tokens = np.array(counts, dtype=np.int64)
        self.shard_seqs = np.maximum(self.shard_tokens - 1, 0) // self.T
        self.num_tokens = int(self.shard_tokens.sum())
        self.num_sequences = int(self.shard_seqs.sum())
        need = self.B * self.world_size
        if self.num_sequences == 0:
            raise LoaderError(f"{self._desc}: seq_len {self.T} is longer than the data: the largest shard has "
                              f"{int(self.shard_tokens.max(initial=0)):,} tokens and a sample needs {self.T + 1}; "
                              f"lower seq_len or prepare more data")
        if self.num_sequences < need:
            raise LoaderError(f"{self._desc}: only {self.num_sequences} sequences of {self.T + 1} tokens "
                              f"({self.num_tokens:,} tokens) but one batch needs {need} (batch_size {self.B} x "
                              f"world_size {self.world_size}); lower batch_size or seq_len, or prepare more data")
        self.vocab_size: int | None = int(self.manifest["vocab_size"]) if self.manifest else None
        self.eot_id: int | None = self.manifest.get("eot_id") if self.manifest else None
        chat = (self.manifest or {}).get("chat")
        self.mask_paths: list[Path] | None = None
        if chat:
            if int(chat.get("seq_len", 0)) != self.T:
                raise LoaderError(f"{self._desc}: chat rows were packed {chat.get('seq_len')} tokens long but seq_len "
                                  f"is {self.T}; set batch.seq_len={chat.get('seq_len')} or prepare the data again "
                                  f"with --seq-len {self.T}")
            entries = [s for s in self.manifest["shards"] if s["split"] == split]
            self.mask_paths = [Path(data_dir) / s["mask"] for s in entries]
        self._mmaps: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._perms: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
        self._plan_epoch = -1
        self.epoch = 0
        self.position = 0  # global sequence index (all ranks) of the next global batch in this epoch

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        """Steps per epoch (every rank takes one batch per step)."""
        return self.num_sequences // (self.B * self.world_size)

    @property
    def tokens_per_epoch(self) -> int:
        """Input tokens all ranks consume in one epoch (``batches_per_epoch * B * T * world_size``)."""
        return self.batches_per_epoch * self.B * self.T * self.world_size

    # -- order -------------------------------------------------------------------------------------
    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        if self._plan_epoch != self.epoch:
            n = len(self.paths)
            order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._order = order
            self._cum = np.concatenate([[0], np.cumsum(self.shard_seqs[order])])
            self._plan_epoch = self.epoch
        return self._order, self._cum

    def _perm(self, shard: int) -> np.ndarray:
        key = (self.epoch, shard)
        p = self._perms.get(key)
        if p is None:
            p = np.random.default_rng([self.seed, self.epoch, shard]).permutation(int(self.shard_seqs[shard]))
            self._perms[key] = p
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return p

    def _targets(self, shard: int) -> np.ndarray:
        """Chat data: the shard's tokens with every token whose mask is 0 replaced by -1 (int64)."""
        key = -1 - shard  # shares the bounded cache with the token maps
        t = self._mmaps.get(key)
        if t is None:
            toks = self._tokens(shard)
            mask = S.read_mask(self.mask_paths[shard], toks.size)  # type: ignore[index]
            t = np.where(np.asarray(mask) == 1, np.asarray(toks, dtype=np.int64), np.int64(-1))
            self._mmaps[key] = t
            while len(self._mmaps) > 8:
                self._mmaps.popitem(last=False)
        return t

    def _tokens(self, shard: int) -> np.ndarray:
        mm = self._mmaps.get(shard)
        if mm is None:
            mm = S.read_shard(self.paths[shard])
            self._mmaps[shard] = mm
            while len(self._mmaps) > 8:  # bounded open files on 1000-shard corpora
                self._mmaps.popitem(last=False)
        else:
            self._mmaps.move_to_end(shard)
        return mm

    def _read(self, start: int, targets: bool = False) -> np.ndarray:
        """Sequences ``[start, start + B)`` of the current epoch's order as a (B, T+1) array (``targets``:
        from :meth:`_targets`)."""
        B, T = self.B, self.T
        order, cum = self._plan()
        g = np.arange(start, start + B)
        k = np.searchsorted(cum, g, side="right") - 1  # position in the shard order
        out = np.empty((B, T + 1), dtype=np.int64)
        for kk in np.unique(k):
            rows = np.nonzero(k == kk)[0]
            shard = int(order[kk])
            local = g[rows] - cum[kk]
            if self.shuffle:
                local = self._perm(shard)[local]
            toks = self._targets(shard) if targets else self._tokens(shard)
            if not self.shuffle:  # consecutive sequences: one contiguous read, rows overlap by one token
                a = int(local[0]) * T
                flat = np.asarray(toks[a:a + len(rows) * T + 1], dtype=np.int64)
                out[rows, :T] = flat[:-1].reshape(len(rows), T)
                out[rows, T] = flat[T::T]
            else:
                for r, s in zip(rows, local):
                    out[r] = toks[int(s) * T:int(s) * T + T + 1]
            if self.vocab_size is not None and int(out[rows].max()) >= self.vocab_size:
                self._range_error(shard, out[rows], local)
        return out

    def _range_error(self, shard: int, block: np.ndarray, local: np.ndarray) -> None:
        """Name the shard and token offset of an id the model cannot embed (instead of an IndexError)."""
        r, c = np.unravel_index(int(np.argmax(block >= self.vocab_size)), block.shape)
        offset = int(local[r]) * self.T + int(c)
        raise LoaderError(f"{self.paths[shard]}: token {int(block[r, c])} at token offset {offset} is >= the "
                          f"vocabulary size {self.vocab_size} in manifest.json (corrupt shard or wrong tokenizer); "
                          f"check it with gptlab prepare --verify")

    # -- batches -----------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)``, each int64 ``(batch_size, seq_len)`` on ``device``; cycles epochs."""
        need = self.B * self.world_size
        if self.position + need > self.num_sequences:
            self.epoch += 1
            self.position = 0
        start = self.position + self.rank * self.B
        arr = self._read(start)  # (B, T+1)
        if self.mask_paths is not None:  # inputs are the tokens, targets the masked tokens
            arr = np.concatenate([arr[:, :-1], self._read(start, targets=True)[:, 1:]], axis=1)  # (B, 2T)
        buf = torch.from_numpy(arr)
        self.position += need
        if self.device.type == "cuda":
            # Page-locked host memory lets the copy run asynchronously with the compute already queued.
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            buf = buf.to(self.device)
        if self.mask_paths is not None:
            return buf[:, :self.T].contiguous(), buf[:, self.T:].contiguous()
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def reset(self) -> None:
        """Back to the first batch of epoch 0 (call before each validation pass)."""
        self.epoch = 0
        self.position = 0

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: restoring it replays exactly the batches that come next."""
        return {"version": STATE_VERSION, "split": self.split, "epoch": self.epoch, "position": self.position,
                "seed": self.seed, "shuffle": self.shuffle, "seq_len": self.T, "batch_size": self.B,
                "world_size": self.world_size, "num_sequences": self.num_sequences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a different dataset, seq_len, seed or shuffle setting is an error."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state {state!r:.80}: unknown format (expected version {STATE_VERSION})")
        for key, mine in (("seq_len", self.T), ("seed", self.seed), ("shuffle", self.shuffle),
                          ("num_sequences", self.num_sequences)):
            if state.get(key) != mine:
                raise LoaderError(f"loader state was saved with {key}={state.get(key)!r} but this loader has "
                                  f"{key}={mine!r} ({self._desc}); resume with the same data and settings")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_sequences:
            raise LoaderError(f"loader state epoch={epoch} position={position} is out of range for {self._desc}")
        self.epoch, self.position = epoch, position

    def __repr__(self) -> str:
        return (f"TokenLoader({self._desc}, B={self.B}, T={self.T}, rank={self.rank}/{self.world_size}, "
                f"shuffle={self.shuffle}, tokens={self.num_tokens:,})")
