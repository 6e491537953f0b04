"""Which samples of a LatentDataset a training stage takes: its ``data`` selection (``common.config.DataSelection``)
applied to the dataset's index.

A LatentDataset holds every kept clip at every resolution its source covers and at every clip length up to its
own (its first n frames), plus images (image files and key frames of kept clips: one frame). The index says which
sample is which (``SAMPLE_COLUMNS``): ``resolution`` (a name of curate.resolutions), ``num_frames`` (pixel frames; 1
for an image), ``height``/``width`` (pixels), ``kind`` ("clip", "image", "keyframe") and whether the sample is its
source's largest resolution (``top_resolution``) and full length (``full_length``). A selection keeps the rows whose
resolution, frame count and aspect ratio it lists; an empty list keeps each source's largest resolution (for
resolutions), each clip at its full length and no images (for frames), every aspect (for aspect ratios).

    mask = select(index, stage.data)                     # boolean Series over the index rows
    missing_buckets(index[index.split == "train"], stage.data)   # ["32px", "frames 1"]: selected, but no sample
    describe(stage.data)                                 # "resolutions 32px; frames 1, 9; every aspect"

A dataset written before samples had these columns is every clip once at its largest resolution and full length:
the default selection takes all of it, any other is an error that says to re-run the compress stage.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List

from common.config import DataSelection, aspect_matches

SAMPLE_COLUMNS = ("resolution", "num_frames", "height", "width", "kind", "top_resolution", "full_length")
IMAGE_KINDS = ("image", "keyframe")


def has_sample_columns(index: Any) -> bool:
    return all(c in index.columns for c in SAMPLE_COLUMNS)


def select(index: Any, sel: DataSelection, where: str = "the LatentDataset") -> Any:
    """Boolean Series over ``index``'s rows: the samples ``sel`` takes (see the module docstring)."""
    import pandas as pd

    if not has_sample_columns(index):
        if not (sel.resolutions or sel.frames or sel.aspect_ratios):
            return pd.Series(True, index=index.index)
        missing = sorted(set(SAMPLE_COLUMNS) - set(index.columns))
        raise ValueError(f"{where} has no {missing} columns (written before datasets held several resolutions, "
                         "lengths and images): re-run the compress stage, or remove the stage's data selection")
    mask = index["top_resolution"].astype(bool) if not sel.resolutions else index["resolution"].isin(sel.resolutions)
    if sel.frames:
        mask &= index["num_frames"].astype(int).isin(sel.frames)
    else:
        mask &= index["full_length"].astype(bool) & ~index["kind"].isin(IMAGE_KINDS)
    if sel.aspect_ratios:
        mask &= pd.Series([any(aspect_matches(int(h), int(w), a) for a in sel.aspect_ratios)
                           for h, w in zip(index["height"], index["width"])], index=index.index, dtype=bool)
    return mask


def missing_buckets(index: Any, sel: DataSelection, where: str = "the LatentDataset") -> List[str]:
    """What ``sel`` names that no row of ``index`` (e.g. the train split) provides: each selected resolution,
    frame count and aspect ratio with no sample in the selection, as readable labels; ["everything"] for an empty
    selection with nothing named. [] = every named bucket has samples."""
    if not (sel.resolutions or sel.frames or sel.aspect_ratios):
        return [] if select(index, sel, where).any() else ["everything"]
    if not has_sample_columns(index):
        select(index, sel, where)   # raises: the dataset cannot be selected from
    # each named bucket against the others' choice (an aspect the data lacks is the aspect, not every resolution)
    def taken(**kw: Any) -> bool:
        return bool(select(index, dataclasses.replace(sel, **kw), where).any())

    out = [r for r in sel.resolutions if not taken(resolutions=[r], aspect_ratios=[])]
    out += [f"frames {f}" for f in sel.frames if not taken(frames=[f], aspect_ratios=[])]
    out += [f"aspect {a}" for a in sel.aspect_ratios if not taken(aspect_ratios=[a])]
    return out


def describe(sel: DataSelection) -> str:
    """One line for logs and MLflow: "resolutions 32px; frames 1, 9; every aspect"."""
    res = ", ".join(sel.resolutions) if sel.resolutions else "each clip's largest"
    frames = ", ".join(str(f) for f in sel.frames) if sel.frames else "each clip's full length (no images)"
    aspects = ", ".join(sel.aspect_ratios) if sel.aspect_ratios else "every aspect"
    return f"resolutions {res}; frames {frames}; {aspects}"


def bucket_counts(index: Any) -> dict:
    """{"<resolution> x <frames>": samples} of ``index`` (for logs and MLflow)."""
    if not has_sample_columns(index):
        return {"all": int(len(index))}
    keys = [f"{r}x{int(n)}" for r, n in zip(index["resolution"], index["num_frames"])]
    out: dict = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))
