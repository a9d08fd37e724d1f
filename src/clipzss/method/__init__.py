"""The paper's method: what the frozen teacher teaches the student, as losses of one training step.

`pseudo_labels` (PLM) clusters the teacher's dense tokens into regions with K-Means (one window size, or the
paper's several) and mask fusion; `regions` averages features over those regions; `synthesizer` makes pseudo class
weights from them; `glm` aligns the student's pooled features with the teacher's CLS token (InfoNCE against the
other images' CLS tokens, and optionally the paper's bank of past ones); `transductive` names unlabelled pixels
when the unseen names are known. `losses` holds ZegCLIP's NEL, the dense distillation of the teacher's tokens and
the objective that combines them. Nothing here runs a training loop or reads files.
"""
