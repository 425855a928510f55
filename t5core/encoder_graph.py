"""CUDA graphs of the encoder forward, for inference on short inputs.

Below ~16k tokens an encoder forward is bound by the host, not the GPU: ~200 kernel launches
and the Python around them (BENCHMARKS.md: a flan-t5-base-shaped encoder at 1 x 4k does 2-3 ms
of GPU work in 7-28 ms, by mode). A captured graph replays all of them in one launch.

- **Shapes.** A graph holds one input shape. The length is right-padded to `padded_length`
  (a multiple of 1/8 of its power of two, at least 64), so inputs of similar lengths share a
  graph. Padding changes nothing at the real tokens in any mode: padded keys are hidden, and
  transient-global's extra side tokens summarise padding, which no real token sees (the mask
  is what the layout is built from). Tested against unpadded runs on the CPU.
- **When.** In eval mode without gradients on CUDA, up to `GRAPH_MAX_TOKENS` batch x padded
  tokens (`cuda_graph=True` lifts the limit, False turns graphs off). The first call of a shape
  runs eagerly (padded, so it compiles the kernels the capture needs); the second captures;
  later ones replay. A one-off shape never pays for a capture.
- **Memory.** Each graph keeps its own pool: the activations of one forward at its shape. At
  most `MAX_GRAPHS` graphs are kept per model (least recently used dropped, once its last
  replay is done: its pool may be reused at once); `clear()` frees them.
- **Weights.** A graph reads the parameters at the addresses it was captured with. A model
  moved or cast since (new storage) gets a new capture, never a replay of freed memory.
- **Threads and streams.** One lock per model around capture and replay; a replay's stream
  first waits for the previous replay of that graph (its output copied out), so calls from
  several threads or streams never overwrite a graph's buffers while another reads them.
- Where capture fails (an op that cannot be captured), a warning says why and the model
  encodes eagerly from then on. Under `torch.compile` the encoder runs as traced (no graph here).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

GRAPH_MAX_TOKENS = 16384  # batch x padded length up to which graphs are used by default
MAX_GRAPHS = 4  # graphs kept per model
_MAX_SEEN = 256  # shapes remembered as seen once


def padded_length(length: int) -> int:
    """`length` rounded up to a multiple of max(64, 1/8 of its power of two): at most 1/8 padding
    above 512 tokens, 8 graph lengths per octave."""
    step = max(64, (1 << (length.bit_length() - 1)) // 8)
    return -(-length // step) * step


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    ids: Tensor  # [B, Lp] static inputs, written before each replay
    mask: Tensor  # [B, Lp] bool
    out: Tensor  # [B, Lp, d_model] static output
    weights: tuple[int, ...]  # parameter addresses at capture
    done: list  # [the event after the last replay's output copy, or None]


class EncoderGraphs:
    """The captured encoder graphs of one model, by (batch, padded length, mode, dtype, device)."""

    def __init__(self) -> None:
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.seen: OrderedDict[tuple, None] = OrderedDict()
        self.disabled: str | None = None  # why capture failed, if it did
        self.replays = 0
        self.lock = threading.Lock()

    def clear(self) -> None:
        """Drop every graph (and its memory pool)."""
        with self.lock:
            self._drop_graphs()
            self.seen.clear()

    def _drop_graphs(self, keep: int = 0) -> None:
        """Drop the least recently used graphs until `keep` are left, each once its last replay is
        done (its pool may be reused at once, by any stream)."""
        while len(self.graphs) > keep:
            _, entry = self.graphs.popitem(last=False)
            if entry.done[0] is not None:
                entry.done[0].synchronize()

    def usable(self, ids: Tensor, model: nn.Module, cuda_graph: bool | None) -> bool:
        """Whether this call goes through `encode` (else the caller runs the encoder eagerly)."""
        if cuda_graph is False or self.disabled is not None or not ids.is_cuda or torch.compiler.is_compiling():
            return False
        if model.training or torch.is_grad_enabled():
            return False
        return cuda_graph is True or ids.shape[0] * padded_length(ids.shape[1]) <= GRAPH_MAX_TOKENS

    def encode(self, run: Callable[[Tensor, Tensor], Tensor], ids: Tensor, mask: Tensor | None, key: tuple,
               weights: tuple[int, ...]) -> Tensor:
        """run(ids, mask) -> [B, Lp, d_model] on inputs padded to `padded_length`; returns the rows of
        the real length, [B, L, d_model], in a tensor of their own."""
        batch, length = ids.shape
        key = (batch, padded_length(length), *key)
        with self.lock:
            entry = self.graphs.get(key)
            if entry is not None and entry.weights != weights:  # the model's storage moved: all stale
                self._drop_graphs()
                entry = None
            if entry is None and key in self.seen:
                entry = self._capture(run, key, ids, weights)
            if entry is None:  # first sighting: eager, padded (compiles what a capture will need)
                self.seen[key] = None
                while len(self.seen) > _MAX_SEEN:
                    self.seen.popitem(last=False)
            else:
                self.graphs.move_to_end(key)
                stream = torch.cuda.current_stream(ids.device)
                if entry.done[0] is not None:  # the last replay's output is copied out before we write
                    stream.wait_event(entry.done[0])
                _fill(entry.ids, entry.mask, ids, mask)
                entry.graph.replay()
                out = entry.out[:, :length].clone()
                entry.done[0] = stream.record_event()
                self.replays += 1
                return out
        padded_ids, padded_mask = _padded(ids, mask, key[1])
        return run(padded_ids, padded_mask)[:, :length].contiguous()

    def _capture(self, run, key: tuple, ids: Tensor, weights: tuple[int, ...]) -> _Graph | None:
        batch, padded = key[0], key[1]
        static_ids = torch.zeros(batch, padded, dtype=ids.dtype, device=ids.device)
        static_mask = torch.zeros(batch, padded, dtype=torch.bool, device=ids.device)
        graph = torch.cuda.CUDAGraph()
        try:  # thread_local: other threads may keep working on the GPU meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = run(static_ids, static_mask)
        except Exception as err:  # noqa: BLE001 - any capture failure means: encode eagerly
            self.disabled = f"{type(err).__name__}: {err}"
            warnings.warn(f"CUDA graph capture of the encoder failed ({self.disabled}); encoding eagerly",
                          stacklevel=4)
            return None
        entry = _Graph(graph, static_ids, static_mask, out, weights, [None])
        self.graphs[key] = entry
        self._drop_graphs(keep=MAX_GRAPHS)
        return entry


def _padded(ids: Tensor, mask: Tensor | None, padded: int) -> tuple[Tensor, Tensor]:
    """ids and a bool mask right-padded to `padded` tokens (pad id 0, masked)."""
    out_ids = ids.new_zeros(ids.shape[0], padded)
    out_mask = torch.zeros(ids.shape[0], padded, dtype=torch.bool, device=ids.device)
    _fill(out_ids, out_mask, ids, mask)
    return out_ids, out_mask


def _fill(static_ids: Tensor, static_mask: Tensor, ids: Tensor, mask: Tensor | None) -> None:
    """Write a call's inputs into padded buffers: [:, :L] the call's, the rest pad id 0, masked."""
    length = ids.shape[1]
    static_ids[:, :length].copy_(ids)
    static_ids[:, length:].zero_()
    if mask is None:
        static_mask[:, :length].fill_(True)
    else:
        static_mask[:, :length].copy_(mask)
    static_mask[:, length:].fill_(False)


def weights_key(model: nn.Module) -> tuple[int, ...]:
    """The addresses of a model's parameters and buffers: a graph replays only while they hold."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
