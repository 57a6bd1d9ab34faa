"""Run under mpiexec by tests/test_mpi.py: `minivae train ARGS...`, except that after its
second epoch the rank named by $PERTURB_RANK changes one parameter by one ulp, as a rank with
another NumPy or a flipped bit would. The trainer's per-epoch checksum must stop the run."""
import os
import sys

import numpy as np

from minivae import cli
from minivae.train import Trainer

rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
real = Trainer._train_epoch


def train_epoch(self):
    row = real(self)
    if row is not None and row["epoch"] == 2 and rank == int(os.environ["PERTURB_RANK"]):
        p = self.model.params.data
        p[0] = np.nextafter(p[0], np.inf)
    return row


Trainer._train_epoch = train_epoch
sys.exit(cli.main(sys.argv[1:]))
