"""The decoder's first pass as curation's main pass: scenes analysed as frames arrive, and each scene's windows
curated, on a thread of their own, as soon as the scene's bounds are final, from the frames still held.

    first = FirstPass(cfg, make_curator)                  # make_curator(fps, height, width) -> a curator, or raises
    info = decode.scan_video(path, first.start, cfg.max_pixels, cfg.max_frames, on_timestamps=first.timestamps)
    first.close()                                         # waits for the curating thread; raises its error
    scenes = first.stream.finish()                        # first.settled: the scenes already curated (a prefix)
    first.deferred                                        # windows whose frames had left the buffer: a later pass

The buffer holds the frames from the start of the first scene that is not settled yet (``SceneStream.settled``),
at most ``cfg.buffer_mb`` MB; a window that needs a frame already dropped (a scene longer than the buffer) is
deferred. A curator has ``windows(scene_index, start, end)`` (its windows: (scene index, window index, start, span,
length bucket), none for a scene too short) and ``curate(items, changes)``, which curates items (scene index, start,
end, None) for a scene without windows and (window, its source frames) otherwise; ``discard()`` removes what it
wrote. Memory: the buffer, the decoder's read-ahead, and the windows of up to ``MAX_PENDING`` jobs (each the scenes
settled at one look) being curated. The buffer counts its frames' bytes; with decord (``curate.decoder``) frames are
views of 8-frame chunk arrays, so a chunk lives while any of its frames is buffered or held by a job (up to 7 frames
more per chunk); PyAV's frames are arrays of their own.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Deque, List, Optional, Tuple

import numpy as np

from common.config import CurateConfig
from tasks.curate.decode import CHUNK_FRAMES, DecodeError

# Settled scenes are looked for once per decoder chunk: each look merges the cuts found so far, and the buffer holds
# up to this many frames more than the scenes need.
SETTLE_EVERY = CHUNK_FRAMES
# Scenes handed to the curating thread and not finished: one being curated, one ready. A higher value holds more
# windows' frames (they stay alive after the buffer drops them) for no gain: the decoder is the slower stage.
MAX_PENDING = 2

Window = Tuple[int, int, int, int, int]   # (scene index, window index in the scene, start frame, span, length bucket)


class FirstPass:
    """The sink factory for ``decode.scan_video`` (module docstring). ``make_curator(fps, height, width)`` builds the
    curator when the first frame arrives; a DecodeError from it (no clip fits this video) turns curation off for
    the pass: the caller raises it again once the decoder has checked the whole file."""

    def __init__(self, cfg: CurateConfig, make_curator: Callable[[float, int, int], Any]) -> None:
        self.cfg, self.make_curator = cfg, make_curator
        self.curator: Any = None
        self.stream: Any = None
        self.pool: Optional[ThreadPoolExecutor] = None
        self.pending: Deque[Future] = deque()
        self.variable_rate = False   # known before decoding (the packet index): nothing to curate in this pass

    def timestamps(self, times_T: np.ndarray, fps: float) -> None:
        """``decode.scan_video``'s ``on_timestamps``: a variable-rate stream is curated from its constant-rate frames
        after the pass (its frames here are the source's), so this pass only decodes."""
        from tasks.curate.decode import to_constant_rate

        self.variable_rate = to_constant_rate(times_T, fps)[1] if fps > 0 else False

    def start(self, fps: float) -> Callable[[np.ndarray], None]:
        """A fresh pass (called again when PyAV starts over after decord failed part-way): what an earlier start
        curated is discarded."""
        from tasks.curate.scenes import SceneStream

        self.discard()
        self.fps, self.off = fps, fps <= 0 or self.variable_rate   # no rate: scan_video refuses the file at the end
        self.stream = SceneStream(fps, self.cfg) if fps > 0 else None
        self.buffer: Deque[np.ndarray] = deque()
        self.first = self.nbytes = 0          # frame index of buffer[0]; bytes buffered
        self.settled: List[Tuple[int, int]] = []
        self.deferred: List[Window] = []
        return self.push

    def push(self, frame_HWC: np.ndarray) -> None:
        """The next decoded frame, uint8 RGB [H,W,3]."""
        if self.off:
            return
        if self.curator is None:
            try:
                self.curator = self.make_curator(self.fps, frame_HWC.shape[0], frame_HWC.shape[1])
            except DecodeError:
                self.off = True
                return
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curate-windows")
        self.stream.push(frame_HWC)
        if self.cfg.buffer_mb:
            self.buffer.append(frame_HWC)
            self.nbytes += frame_HWC.nbytes
        if self.stream.num_frames % SETTLE_EVERY == 0:
            settled = self.stream.settled()
            todo = [(i, s, e) for i, (s, e) in enumerate(settled) if i >= len(self.settled)]
            self.settled = settled
            if todo:
                self._submit(todo)
                self._drop(settled[-1][1])
        while self.nbytes > self.cfg.buffer_mb * 2**20 and self.buffer:   # a long scene: its windows come later
            self._drop(self.first + 1)

    def items(self, scenes: List[Tuple[int, int, int]]) -> List[Tuple[Any, Optional[List[np.ndarray]]]]:
        """The curator's items for the scenes [(scene index, start, end)] from the buffer; windows whose frames
        are no longer buffered go to ``deferred``."""
        out: List[Tuple[Any, Optional[List[np.ndarray]]]] = []
        for scene_index, s, e in scenes:
            windows = self.curator.windows(scene_index, s, e)
            if not windows:
                out.append(((scene_index, s, e), None))
            for w in windows:
                _, _, start, span, _ = w
                if start < self.first or start + span > self.first + len(self.buffer):
                    self.deferred.append(w)
                else:
                    out.append((w, [self.buffer[i - self.first] for i in range(start, start + span,
                                                                                self.cfg.frame_stride)]))
        return out

    def close(self) -> None:
        """Wait for the curating thread; its error, if any, is raised here."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self._stop()

    def release(self) -> None:
        """Drop the buffered frames (the pass has ended and its last items are built)."""
        self.buffer, self.nbytes = deque(), 0

    def discard(self) -> None:
        """Stop curating and remove what this pass wrote (a restart, a variable-rate input, an error)."""
        try:
            for job in self.pending:   # not started: never run; the running one is waited for
                job.cancel()
            self._stop()
        finally:
            if self.curator is not None:
                self.curator.discard()
            self.curator = None
            self.release()

    def _stop(self) -> None:
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _submit(self, scenes: List[Tuple[int, int, int]]) -> None:
        items = self.items(scenes)
        if not items:
            return
        while self.pending and (len(self.pending) >= MAX_PENDING or self.pending[0].done()):
            self.pending.popleft().result()   # raises the curating thread's error here, early
        changes = np.asarray(self.stream.changes, np.float32)   # a snapshot: the stream keeps appending
        assert self.pool is not None
        self.pending.append(self.pool.submit(self.curator.curate, items, changes))

    def _drop(self, before: int) -> None:
        while self.buffer and self.first < before:
            self.nbytes -= self.buffer.popleft().nbytes
            self.first += 1
