"""The networks: the frozen CLIP teacher (and its training-free dense recipes), the student, and the segmenters.

`teacher` wraps open_clip's CLIP: text embeddings of class names (cached by `text_cache`), the CLS token and the
dense tokens of the recipe `teacher.dense` names (`recipes`: MaskCLIP, ClearCLIP, SCLIP, NACLIP). `student` builds
any segmentation-models-pytorch or timm network with an embedding head, its encoder's starting weights read by
`student_weights`. `segmenter` turns a checkpoint, or the
teacher alone, into the object users call: `Segmenter`, `TrainingFreeSegmenter`.
"""
