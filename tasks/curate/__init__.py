"""Curation stage: list inputs, decode, split scenes, cut and filter clips, write a ClipManifest folder."""
