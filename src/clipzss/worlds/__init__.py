"""Controlled worlds where the zero-shot answer is known: the evidence, quick start and CI guard of the method.

No pretrained CLIP weights exist on our machines, so the claim "the student learns unseen classes from its teacher"
is measured in worlds with a teacher that plays CLIP (it knows every class, seen and unseen) and students trained by
the ordinary ``clipzss.train``. ``synthetic`` generates textured scenes with an aligned teacher;
``camvid`` uses real photographs and labels (CamVid) with a teacher aligned to a real text encoder (MiniLM).
"""
