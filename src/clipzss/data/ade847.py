"""ADE20K-full: the 847 classes of the open-vocabulary benchmark "ADE-847" (ADE20K 2021 release, 17 Jan 2021).

The selection, its order (the trainIds 0..846) and the class names are those of detectron2's
``prepare_ade20k_full_sem_seg.py`` (MaskFormer, used by every ADE-847 result since), so label files prepared by
either tool hold the same ids. The table is the data file ``ade847_classes.txt`` beside this module (shipped in the
wheel): line i after the ``#`` comments is trainId i, as the ADE20K object id (the value ``R / 10 * 256 + G`` of the
official ``*_seg.png``), a space, and the class name with its WordNet synonyms, which is also what the text
classifier reads.
"""

from __future__ import annotations

from importlib.resources import files

TABLE_FILE = "ade847_classes.txt"


def _read_table() -> tuple[tuple[int, ...], tuple[str, ...]]:
    text = files(__package__).joinpath(TABLE_FILE).read_text(encoding="utf-8")
    rows = [line.split(" ", 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return tuple(int(object_id) for object_id, _ in rows), tuple(name for _, name in rows)


ADE847_OBJECT_IDS, ADE847_CLASSES = _read_table()
