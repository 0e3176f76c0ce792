"""HDKD on the Brain Tumor MRI data set, end to end.

    accelerate launch examples/hdkd_brain.py                  # CPU preset, about 45 min on 2 cores
    accelerate launch examples/hdkd_brain.py --preset paper   # 224 px, 200 epochs, for GPUs

Trains the pure-CNN HDKD teacher on the whole training set, then the hybrid student alone
and distilled from the teacher at 50, 100 and 150 images per class, and writes
``results.json``, ``results.md`` (the paper's Table 3) and the figures to ``--output-dir``.
``--help`` lists every flag.
"""

from kdkit_zoo.hdkd.cli import main

if __name__ == "__main__":
    main("brain_tumor_mri")
