"""The HDKD experiment on your own data set, end to end.

    accelerate launch examples/hdkd_experiment.py --data path/to/images        # train/ and test/, or class folders only
    accelerate launch examples/hdkd_experiment.py --data path/to/labels.csv    # path,label[,group]

Trains the teacher on the training images, then the student alone and distilled from the
teacher at 50, 100 and 150 images per class (capped by the smallest class), and writes
``results.json`` (with how the data was split), ``results.md`` (the paper's Table 3) and the
figures to ``--output-dir``. ``--teacher``, ``--student`` and ``--taps`` take any timm pair;
``--help`` lists every flag.
"""

from kdkit_zoo.hdkd.cli import main

if __name__ == "__main__":
    main(None)
