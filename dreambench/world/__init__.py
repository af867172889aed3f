"""A toy world where DreamBooth's effects are real on a CPU (issue 12): procedurally drawn objects of ten
classes in sixteen contexts, twenty subjects with 3-6 photos each in DreamBench's folder layout (world.py), and
the drawing code (scene.py). `model=toy` (dreambench/models/toy.py) is pretrained on it."""
