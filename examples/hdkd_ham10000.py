"""HDKD on HAM10000 (7 skin-lesion classes, heavily imbalanced), end to end.

    accelerate launch examples/hdkd_ham10000.py

The same experiment as ``hdkd_brain.py``: the teacher is trained on a SMOTE-balanced
training set, the split keeps all images of one lesion on the same side, and the best
epoch is chosen on balanced accuracy. ``--help`` lists every flag.
"""

from kdkit_zoo.hdkd.cli import main

if __name__ == "__main__":
    main("ham10000")
